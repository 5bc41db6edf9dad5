"""The paper's metrics (GLUE, Wang et al. 2018), in percent points like the paper's tables.

* ``matthews`` (CoLA): score = 100 * MCC; key ``mcc``.
* ``accuracy`` (SST-2, QNLI, RTE, MNLI, rotten_tomatoes): score = 100 * accuracy; key ``accuracy``.
* ``f1_accuracy`` (MRPC, QQP): score = 100 * (F1 + accuracy) / 2; keys ``f1`` (positive class = id 1)
  and ``accuracy``.
* ``pearson_spearman`` (STS-B): score = 100 * (Pearson + Spearman) / 2; keys ``pearson``, ``spearman``.

All component keys are in percent points too. Every result also has ``"metric"`` (the name above)
and ``"n"`` (number of examples).

Inputs: classification predictions are class ids ``[N]`` or raw logits/probabilities ``[N, C]`` (argmax
is taken here); regression predictions are floats ``[N]`` or ``[N, 1]``. Labels are ids / floats ``[N]``.
numpy arrays, torch tensors and lists are accepted.

Degenerate cases follow sklearn's convention for MCC: a correlation that is undefined because the
predictions or the labels are constant is reported as 0.0 (scipy would give NaN), as is F1 with no
positive prediction and no positive label.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef

from .errors import DataError
from .splits import TaskData
from .tasks import TaskSpec, get_task

__all__ = ["compute_metrics", "glue_score"]


def _to_numpy(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().float().cpu().numpy() if x.dtype.is_floating_point else x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists
        raise DataError(
            f"{what}: cannot convert to an array ({e}); pass a list, numpy array or tensor"
        ) from e
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise DataError(f"{what}: expected numbers, got dtype {arr.dtype}")
    return arr


def _class_ids(arr: np.ndarray, num_labels: int, what: str) -> np.ndarray:
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError(
                f"{what}: classification needs class ids (integers) of shape [N] or logits of shape [N, C]; "
                "got non-integer values of shape [N]"
            )
    ids = arr.astype(np.int64)
    bad = (ids < 0) | (ids >= num_labels)
    if bad.any():
        raise DataError(
            f"{what}: {int(bad.sum())} value(s) outside the class ids 0..{num_labels - 1}, "
            f"e.g. {ids[bad][:5].tolist()}"
        )
    return ids


def _safe_corr(fn, a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0 or len(a) < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = float(fn(a, b)[0])
    return 0.0 if not np.isfinite(r) else r


def compute_metrics(task: str | TaskSpec | TaskData, predictions, labels) -> dict[str, float | int | str]:
    """Score predictions with the task's paper metric; see the module docstring for the keys."""
    spec = task.spec if isinstance(task, TaskData) else get_task(task)
    preds = _to_numpy(predictions, "predictions")
    y = _to_numpy(labels, "labels")
    if y.ndim != 1:
        raise DataError(f"labels: expected shape [N], got {list(y.shape)}")
    n = y.shape[0]
    if n == 0:
        raise DataError("labels: empty; metrics need at least one example")

    if spec.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1:
            raise DataError(f"predictions: regression needs shape [N] or [N, 1], got {list(preds.shape)}")
    else:
        if preds.ndim == 2:
            if preds.shape[1] != spec.num_labels:
                raise DataError(
                    f"predictions: logits have {preds.shape[1]} columns but task {spec.name!r} has "
                    f"{spec.num_labels} classes"
                )
            preds = preds.argmax(axis=1)
        elif preds.ndim != 1:
            raise DataError(
                f"predictions: expected class ids [N] or logits [N, C], got shape {list(preds.shape)}"
            )
    if preds.shape[0] != n:
        raise DataError(f"predictions: {preds.shape[0]} predictions for {n} labels; they must match")

    out: dict[str, float | int | str] = {"metric": spec.metric}
    if spec.is_regression:
        p = preds.astype(np.float64)
        t = y.astype(np.float64)
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(t))):
            raise DataError("predictions/labels: regression values must be finite (found NaN or inf)")
        pearson = _safe_corr(stats.pearsonr, p, t)
        spearman = _safe_corr(stats.spearmanr, p, t)
        out.update(score=100 * (pearson + spearman) / 2, pearson=100 * pearson, spearman=100 * spearman)
    else:
        p = _class_ids(preds, spec.num_labels, "predictions")
        t = _class_ids(y, spec.num_labels, "labels")
        acc = float(np.mean(p == t))
        if spec.metric == "accuracy":
            out.update(score=100 * acc, accuracy=100 * acc)
        elif spec.metric == "matthews":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mcc = float(matthews_corrcoef(t, p))
            out.update(score=100 * mcc, mcc=100 * mcc)
        elif spec.metric == "f1_accuracy":
            f1 = float(f1_score(t, p, pos_label=1, average="binary", zero_division=0.0))
            out.update(score=100 * (f1 + acc) / 2, f1=100 * f1, accuracy=100 * acc)
        else:  # pragma: no cover - TaskSpec validates metric names
            raise DataError(f"unknown metric {spec.metric!r}")
    out["n"] = int(n)
    return out


def glue_score(scores: dict[str, float]) -> float:
    """Macro-average of per-task scores (the paper's "GLUE" column: the 8 tasks, MNLI = matched)."""
    if not scores:
        raise DataError("glue_score: no task scores given")
    return float(np.mean([float(v) for v in scores.values()]))
