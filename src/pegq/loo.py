"""Leave-one-out diagnosis of the activation quantizers (paper section 3, Table 2).

Setup (Table 2's caption): every weight stays FP32; every activation quantizer is 8-bit asymmetric,
per-tensor, with the *current min-max* range estimator on ONE calibration batch of ONE sequence
(``calib_batch_size=1``, ``calib_batches=1``; the calibration seed picks the sequence). Then:

* ``fp32``  -- nothing quantized (scored once, shared by every seed);
* ``all``   -- every activation quantizer on;
* ``except:KIND`` -- all on except every quantizer of one *kind*, left in FP32;
* ``except:KIND@last2`` -- the same for the residual sum after the FFN (``ffn.residual_sum``) in the last
  ``last_layers`` layers only (the paper's "layers 10, 11 only");
* ``except:KIND@I`` -- the per-layer sweep of one kind (``sweep_kind``): all on except that kind in
  layer ``I``.

Kinds are derived from the quantizer names, never hard-coded: in ``encoder.layer.3.attn.scores`` the first
all-digit component is the layer and the rest (``attn.scores``) the kind; a name without a layer number
(``embeddings.sum``, ``pooler``, ``classifier.output``) is a kind of its own. The paper's rows map onto
kinds as in :data:`PAPER_KINDS`; every other kind the adapter defines gets a row too.

Each row is scored with the task metric for every seed; the median over seeds is reported together
with the share of the ``all`` -> ``fp32`` gap it recovers. Rows that recover at least half of the gap
(and the best row) are marked. ``loo.json`` and ``loo.md`` are written atomically; while running, every
finished (row, seed) is stored in ``loo.partial.json`` in the output folder so that an interrupted run
resumes where it stopped (same command again). Scoring uses length-sorted dev batches cut to their
longest sequence (:class:`TrimmedLoader`; bit-identical logits to the 128-padded loader in our checks,
2-4x faster on rotten_tomatoes); ``trim_padding=False`` scores the 128-padded batches.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .config import CalibrationConfig, ConfigError, QuantConfig, get_preset
from .io import OutputError, atomic_write_json, atomic_write_text, prepare_output_dir

# kind -> the paper's Table 2 label, in the table's order
PAPER_KINDS: dict[str, str] = {
    "attn.scores": "softmax input",
    "embeddings.sum": "sum of embeddings",
    "attn.output": "self-attention output",
    "attn.probs": "softmax output",
    "ffn.residual_sum": "residual connections after FFN",
}
RESIDUAL_KIND = "ffn.residual_sum"
MARK_THRESHOLD = 0.5  # rows recovering at least this share of the all -> FP32 gap are marked
PARTIAL = "loo.partial.json"
RESULT = "loo.json"
FORMAT_VERSION = 1

_LAYER_RE = re.compile(r"^(?P<prefix>.*?)\.(?P<layer>\d+)\.(?P<kind>.+)$")


# --------------------------------------------------------------------------- kinds and rows
def quantizer_kind(name: str) -> tuple[str, int | None]:
    """``("attn.scores", 3)`` for ``encoder.layer.3.attn.scores``; ``(name, None)`` without a layer."""
    m = _LAYER_RE.match(name)
    if m is None:
        return name, None
    return m["kind"], int(m["layer"])


def activation_kinds(names: list[str]) -> dict[str, dict[int | None, list[str]]]:
    """``kind -> {layer -> [names]}`` over activation quantizer names, kinds in first-seen order."""
    out: dict[str, dict[int | None, list[str]]] = {}
    for n in names:
        kind, layer = quantizer_kind(n)
        out.setdefault(kind, {}).setdefault(layer, []).append(n)
    return out


def _check_kind(kind: str, kinds: dict) -> None:
    if kind not in kinds:
        close = difflib.get_close_matches(kind, list(kinds), n=4, cutoff=0.4)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown quantizer kind {kind!r}{hint}; this model has: {', '.join(kinds)}")


def plan_rows(
    names: list[str],
    kinds: list[str] | None = None,
    sweep_kind: str | None = None,
    last_layers: int = 2,
) -> list[dict]:
    """The rows of a leave-one-out run over activation quantizer ``names`` (forward order).

    Each row: ``id``, ``label``, ``kind``, ``layers`` (None = all) and ``fp32`` (the names left in FP32).
    ``kinds`` limits the ``except:KIND`` rows (all kinds if None); ``sweep_kind`` adds one row per layer;
    ``last_layers`` (0 = none) adds the ``ffn.residual_sum`` row restricted to the last layers.
    """
    by_kind = activation_kinds(names)
    chosen = list(by_kind) if kinds is None else list(dict.fromkeys(kinds))
    for k in chosen:
        _check_kind(k, by_kind)
    if sweep_kind is not None:
        _check_kind(sweep_kind, by_kind)
        if list(by_kind[sweep_kind]) == [None]:
            raise ConfigError(f"kind {sweep_kind!r} is not per layer; a layer sweep needs e.g. {RESIDUAL_KIND}")
    if last_layers < 0:
        raise ConfigError(f"last_layers must be >= 0, got {last_layers}")

    def names_of(kind: str, layers=None) -> list[str]:
        return [n for lay, ns in by_kind[kind].items() if layers is None or lay in layers for n in ns]

    def label(kind: str) -> str:
        return f"{PAPER_KINDS[kind]} ({kind})" if kind in PAPER_KINDS else kind

    rows = [
        {"id": "fp32", "label": "none (FP32 model)", "kind": None, "layers": None, "fp32": list(names)},
        {"id": "all", "label": "all", "kind": None, "layers": None, "fp32": []},
    ]
    ordered = [k for k in PAPER_KINDS if k in chosen] + [k for k in chosen if k not in PAPER_KINDS]
    for k in ordered:
        rows.append({"id": f"except:{k}", "label": f"all, except {label(k)}", "kind": k, "layers": None,
                     "fp32": names_of(k)})
        if k == RESIDUAL_KIND and last_layers:
            layers = sorted(lay for lay in by_kind[k] if lay is not None)[-last_layers:]
            if layers:
                rows.append({
                    "id": f"except:{k}@last{last_layers}",
                    "label": f"same as above, but for layers {', '.join(map(str, layers))} only",
                    "kind": k, "layers": layers, "fp32": names_of(k, set(layers)),
                })
    if sweep_kind is not None:
        for lay in sorted(x for x in by_kind[sweep_kind] if x is not None):
            rows.append({"id": f"except:{sweep_kind}@{lay}", "label": f"all, except {sweep_kind} in layer {lay}",
                         "kind": sweep_kind, "layers": [lay], "fp32": names_of(sweep_kind, {lay})})
    return rows


def loo_config(bits: int = 8, estimator: str = "current_minmax", calib_batch_size: int = 1,
               calib_batches: int = 1, seed: int = 0) -> QuantConfig:
    """Table 2's setup: weights FP32, every activation ``bits``-bit asymmetric per-tensor."""
    c = get_preset("w32a8")
    c.name = "loo"
    c.description = "leave-one-out base: FP32 weights, every activation quantized (paper Table 2)"
    c.activations = dataclasses.replace(c.activations, bits=bits, symmetric=False, granularity="tensor",
                                        estimator=estimator)
    c.calibration = CalibrationConfig(batch_size=calib_batch_size, num_batches=calib_batches, seed=seed)
    return c


# --------------------------------------------------------------------------- evaluation data
class TrimmedLoader:
    """Dev batches sorted by length and cut to their longest sequence: the same examples and labels as
    the 128-padded loader of :func:`pegq.pipeline.dev_loader`, several times faster to score.

    Exact for the tasks' scores: pad positions never reach a real token (pad keys are masked after the
    softmax-input quantizer, every other op -- LayerNorm, Linear, static per-tensor/per-dim fake
    quantization -- acts per token), so only floating-point summation order can differ.
    """

    def __init__(self, dataset, batch_size: int = 32):
        import torch

        mask = dataset.tensors["attention_mask"]
        lengths = mask.sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        self.dataset = dataset.select(order.numpy())
        self.lengths = lengths[order]
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.dataset)
        for i in range(0, n, self.batch_size):
            idx = list(range(i, min(i + self.batch_size, n)))
            b = self.dataset.__getitems__(idx)
            L = int(self.lengths[i])  # sorted descending: the first is the longest of the batch
            yield {k: (v[:, :L] if v.ndim == 2 and k != "labels" else v) for k, v in b.items()}


def eval_loader(task, tokenizer, batch_size: int = 32, max_examples: int | None = None, trim: bool = True):
    """The dev split for scoring: :class:`TrimmedLoader` (``trim``) or the 128-padded pipeline loader."""
    from .pipeline import dev_loader

    loader = dev_loader(task, tokenizer, batch_size, max_examples)
    return TrimmedLoader(loader.dataset, batch_size) if trim else loader


# --------------------------------------------------------------------------- scoring (patchable in tests)
def _score(qm, loader, task_spec, progress: bool, desc: str) -> tuple[dict, np.ndarray]:
    """``(metrics, predictions)`` of ``qm`` on ``loader``; predictions are class ids (or floats)."""
    from .api import predict
    from .data import compute_metrics

    logits, labels = predict(qm, loader, progress=progress, desc=desc)
    preds = logits.reshape(-1) if logits.ndim == 1 or logits.shape[-1] == 1 else logits.argmax(-1)
    return compute_metrics(task_spec, logits, labels), preds


def _agreement(preds: np.ndarray, ref: np.ndarray, regression: bool) -> float | None:
    if regression:
        return None
    return float(100.0 * np.mean(np.asarray(preds) == np.asarray(ref)))


@contextmanager
def _left_in_fp32(qm, names: list[str]):
    qs = qm.quantizers
    saved = {n: qs[n].bits for n in names}
    try:
        for n in names:
            qs[n].bits = None
        yield
    finally:
        for n, b in saved.items():
            qs[n].bits = b


# --------------------------------------------------------------------------- the job
def _key(row_id: str, seed: int) -> str:
    return f"{row_id}|seed={seed}"


def summarize(rows: list[dict], done: dict[str, dict], seeds: list[int], fp32: dict) -> list[dict]:
    """Per row: scores per seed, median, recovered share of the gap, and the marks."""
    out = []
    for r in rows:
        if r["id"] == "fp32":
            scores = {str(s): fp32["score"] for s in seeds}
            agree = {str(s): 100.0 for s in seeds} if fp32.get("agreement") is not None else {}
        else:
            scores = {str(s): done[_key(r["id"], s)]["score"] for s in seeds}
            agree = {str(s): done[_key(r["id"], s)]["agreement"] for s in seeds
                     if done[_key(r["id"], s)].get("agreement") is not None}
        out.append({
            "id": r["id"], "label": r["label"], "kind": r["kind"], "layers": r["layers"],
            "fp32_quantizers": len(r["fp32"]), "fp32_names": r["fp32"] if r["id"] != "fp32" else [],
            "scores": scores, "median": statistics.median(scores.values()),
            "agreement": agree, "agreement_median": statistics.median(agree.values()) if agree else None,
        })
    all_med = next(x["median"] for x in out if x["id"] == "all")
    gap = fp32["score"] - all_med
    for x in out:
        x["recovered"] = None if gap <= 0 or x["id"] in ("fp32", "all") else (x["median"] - all_med) / gap
    cands = [x for x in out if x["recovered"] is not None]
    best = max((x["recovered"] for x in cands), default=None)
    for x in out:
        rec = x["recovered"]
        x["marked"] = rec is not None and rec > 0 and (rec >= MARK_THRESHOLD or rec == best)
        x["best"] = rec is not None and rec > 0 and rec == best
    return out


def leave_one_out(
    model_dir: str,
    task_name: str,
    output_dir: str | Path | None = None,
    *,
    kinds: list[str] | None = None,
    sweep_kind: str | None = None,
    last_layers: int = 2,
    seeds: list[int] | tuple[int, ...] = (0,),
    bits: int = 8,
    estimator: str = "current_minmax",
    calib_batch_size: int = 1,
    calib_batches: int = 1,
    data_dir: str | None = None,
    eval_batch_size: int = 32,
    max_eval_examples: int | None = None,
    trim_padding: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    task_kwargs: dict | None = None,
) -> dict:
    """Run the leave-one-out analysis (see the module docstring) and return the result dict.

    With ``output_dir``: ``loo.json`` + ``loo.md`` are written there (atomically), and finished rows are
    kept in ``loo.partial.json`` while running, so calling again with the same arguments resumes.
    ``trim_padding`` scores length-sorted dev batches cut to their longest sequence
    (:class:`TrimmedLoader`: same logits as 128-padding, several times faster).
    """
    from tqdm.auto import tqdm

    from .api import calibrate, quantize
    from .peg import quantizers_off
    from .pipeline import calibration_batches, load_task_and_model

    seeds = [int(s) for s in dict.fromkeys(seeds)]
    if not seeds:
        raise ConfigError("leave-one-out needs at least one calibration seed")
    cfg = loo_config(bits, estimator, calib_batch_size, calib_batches)  # validates bits/estimator/calibration
    out = None
    if output_dir is not None:
        out = prepare_output_dir(output_dir, overwrite, marker=RESULT)
        if overwrite:
            (out / PARTIAL).unlink(missing_ok=True)
    signature = {
        "format": FORMAT_VERSION, "model": str(Path(model_dir).expanduser().resolve()) if Path(
            model_dir).expanduser().exists() else str(model_dir),
        "task": task_name, "data_dir": data_dir, "max_eval_examples": max_eval_examples, "bits": bits,
        "estimator": cfg.activations.estimator, "calib_batch_size": calib_batch_size,
        "calib_batches": calib_batches, "task_kwargs": task_kwargs or {}, "trim_padding": trim_padding,
    }
    state: dict[str, Any] = {"signature": signature, "fp32": None, "fp32_predictions": None, "done": {}}
    if out is not None and (out / PARTIAL).exists():
        try:
            prev = json.loads((out / PARTIAL).read_text())
        except ValueError:
            prev = None
        if not isinstance(prev, dict) or prev.get("signature") != signature:
            raise OutputError(
                f"{str(out / PARTIAL)!r} holds an unfinished run with other settings; re-run it with the same "
                f"arguments, or pass --overwrite to start again, or choose another --output"
            )
        state = prev

    def save() -> None:
        if out is not None:
            atomic_write_json(out / PARTIAL, state)

    task, model, tokenizer = load_task_and_model(model_dir, task_name, data_dir, **(task_kwargs or {}))
    regression = task.spec.num_labels == 1
    loader = eval_loader(task, tokenizer, eval_batch_size, max_eval_examples, trim=trim_padding)
    qm = quantize(model, cfg)
    act_names = list(qm.activation_quantizers())
    rows = plan_rows(act_names, kinds, sweep_kind, last_layers)  # bad kinds fail before any evaluation

    t_start = time.perf_counter()
    if state["fp32"] is None:
        with quantizers_off(qm):
            m, preds = _score(qm, loader, task.spec, progress, "FP32 eval")
        m = dict(m)
        m["agreement"] = None if regression else 100.0
        state["fp32"], state["fp32_predictions"] = m, np.asarray(preds).tolist()
        save()
    fp32, ref = state["fp32"], np.asarray(state["fp32_predictions"])

    todo = [(r, s) for s in seeds for r in rows if r["id"] != "fp32" and _key(r["id"], s) not in state["done"]]
    calib_cache: dict[int, list] = {}
    bar = tqdm(todo, desc="leave-one-out", disable=not progress)
    for r, s in bar:
        bar.set_postfix_str(f"{r['id']} seed {s}")
        if s not in calib_cache:
            c = dataclasses.replace(cfg, calibration=dataclasses.replace(cfg.calibration, seed=s))
            calib_cache[s] = calibration_batches(task, tokenizer, c)
        t0 = time.perf_counter()
        with _left_in_fp32(qm, r["fp32"]):
            calibrate(qm, calib_cache[s], progress=False)
            m, preds = _score(qm, loader, task.spec, False, r["id"])
        state["done"][_key(r["id"], s)] = {
            "score": float(m["score"]), "metrics": m, "agreement": _agreement(preds, ref, regression),
            "seconds": time.perf_counter() - t0,
        }
        save()

    result = {
        "task": task.spec.name,
        "metric": fp32.get("metric"),
        "model": str(model_dir),
        "family": qm.family,
        "num_layers": qm.num_layers,
        "activation_quantizers": len(act_names),
        "kinds": list(activation_kinds(act_names)),
        "setup": {"weights": "fp32", "activations": f"{bits}-bit asymmetric per-tensor",
                  "estimator": cfg.activations.estimator, "calib_batch_size": calib_batch_size,
                  "calib_batches": calib_batches, "seeds": seeds},
        "dev_examples": len(loader.dataset),
        "fp32": fp32,
        "rows": summarize(rows, state["done"], seeds, fp32),
        "mark_threshold": MARK_THRESHOLD,
        "seconds": time.perf_counter() - t_start,
    }
    if out is not None:
        atomic_write_json(out / RESULT, result)
        atomic_write_text(out / "loo.md", loo_markdown(result))
        (out / PARTIAL).unlink(missing_ok=True)
    return result


# --------------------------------------------------------------------------- reporting
def _mark(x: dict) -> str:
    return "★" if x["best"] else ("●" if x["marked"] else "")


def _rec(x: dict) -> str:
    return "" if x["recovered"] is None else f"{100 * x['recovered']:.0f}%"


def loo_markdown(result: dict) -> str:
    s = result["setup"]
    seeds = s["seeds"]
    lines = [
        f"# Leave-one-out: {result['model']} on {result['task']} ({result['metric']}, "
        f"{result['dev_examples']} dev examples)",
        "",
        f"Weights FP32; activations {s['activations']}, {s['estimator']} on {s['calib_batches']} x "
        f"{s['calib_batch_size']} calibration sequence(s); median over seeds {', '.join(map(str, seeds))}. "
        f"recovered = share of the all -> FP32 gap won back; ● >= {100 * result['mark_threshold']:.0f}%, "
        f"★ best.",
        "",
        "| quantized activations | FP32 quantizers | " + " | ".join(f"seed {x}" for x in seeds)
        + " | median | agree % | recovered | |",
        "|---|---:|" + "---:|" * len(seeds) + "---:|---:|---:|:-:|",
    ]
    for x in result["rows"]:
        med = f"{x['median']:.2f}"
        if x["marked"]:
            med = f"**{med}**"
        agree = "" if x["agreement_median"] is None else f"{x['agreement_median']:.1f}"
        lines.append(
            f"| {x['label']} | {x['fp32_quantizers']} | "
            + " | ".join(f"{x['scores'][str(sd)]:.2f}" for sd in seeds)
            + f" | {med} | {agree} | {_rec(x)} | {_mark(x)} |"
        )
    return "\n".join(lines) + "\n"


def loo_table(result: dict):
    """A rich table of a :func:`leave_one_out` result."""
    from rich.table import Table

    seeds = result["setup"]["seeds"]
    t = Table(title=f"leave-one-out: {Path(result['model']).name} on {result['task']} "
                    f"({result['metric']}, {result['dev_examples']} dev examples, median of {len(seeds)} seed(s))")
    t.add_column("quantized activations")
    t.add_column("FP32 q.", justify="right")
    t.add_column("median", justify="right")
    t.add_column("agree %", justify="right")
    t.add_column("recovered", justify="right")
    t.add_column("", justify="center")
    for x in result["rows"]:
        style = "bold green" if x["marked"] else None
        agree = "" if x["agreement_median"] is None else f"{x['agreement_median']:.1f}"
        t.add_row(x["label"], str(x["fp32_quantizers"]), f"{x['median']:.2f}", agree, _rec(x), _mark(x),
                  style=style)
    return t
