"""Quantization-aware training (paper section 4 "QAT", section 5 setup, appendix B.3/B.4, Tables 6/7).

``pegq qat`` / :func:`qat`:

1. load the fine-tuned FP32 checkpoint, score it on the dev split;
2. wrap and configure it with a preset (``qat-w8a8``, ``qat-w4a8``, ``qat-w4a8-e2``, or any config) and
   **calibrate** it exactly like PTQ (:func:`pegq.api.calibrate`): every scale and zero-point starts from
   the PTQ setup; the PTQ score is recorded as ``ptq_init_score``;
3. turn every enabled quantizer's range into trainable parameters (``Quantizer.learn_ranges``): the
   ranges of weights *and* activations are learned jointly with the weights, LSQ-style (Esser et al.
   2019; Jain et al. 2019) -- straight-through estimator for the rounding, LSQ gradients for scale and
   zero-point, scaled by ``1/sqrt(N * Qp)`` (:mod:`pegq.quant.lsq` says why);
4. train with AdamW, a linear warm-up over the first 10% of the steps then linear decay to zero, sequences
   of at most 128 tokens, optional self-attention dropout rate (Table 10's ``D``), gradient clipping 1.0 as
   in fine-tuning -- the same loop as fine-tuning (:func:`pegq.train.train_loop`, resumable per epoch);
5. freeze the learned ranges, score, and write a checkpoint that ``pegq eval`` loads (:func:`load_quantized`):
   the HF ``save_pretrained`` files (FP32 master weights, tokenizer), ``pegq_quant.json`` (the quant config
   and every quantizer's settings) and ``quantizers.safetensors`` (every learned scale / zero-point /
   range / permutation), plus ``results.json``.

Hyper-parameters: :data:`QAT_GRIDS` holds the paper's per-task search spaces (Table 10 for W8A8,
Table 11 for W4A8; rotten_tomatoes and CSV tasks use SST-2's). Without explicit values the defaults are
Table 11's best (bold) configuration for W4A8; Table 10 prints no best configuration, so for W8A8 the
defaults are the fine-tuning values of Table 8 when the grid contains them (else the grid's middle
learning rate and smallest batch size), 3 epochs, the model's own attention dropout.

Scale-out: under ``accelerate launch`` (several GPUs) the same command runs data-parallel; see
``docs/architecture.md`` ("Scale-out").
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, QuantConfig, resolve_config
from .io import atomic_write_json, prepare_output_dir

FORMAT = "pegq-quantized/1"
QUANT_META = "pegq_quant.json"
QUANT_STATE = "quantizers.safetensors"

# --------------------------------------------------------------------------- Tables 10 and 11
_T10 = {  # W8A8 QAT (Table 10): LR, BS, E, D (self-attention dropout)
    "cola": ([2e-5, 3e-5, 4e-5], [16, 32], [3, 6]),
    "sst2": ([1e-5, 2e-5, 3e-5], [16, 32], [3, 6]),
    "mrpc": ([1e-5, 2e-5, 3e-5], [8], [3, 6]),
    "stsb": ([2e-5, 4e-5, 8e-5], [16, 32], [3, 6]),
    "qqp": ([4e-5, 5e-5, 6e-5], [32], [3]),
    "mnli": ([2e-5, 3e-5, 4e-5], [16, 32], [3]),
    "qnli": ([2e-5, 3e-5, 4e-5], [16, 32], [3]),
    "rte": ([1e-5, 3e-5, 5e-5], [8], [3, 6]),
}
_T11 = {  # W4A8 QAT (Table 11): LR, BS, E and the best (bold) configuration
    "cola": ([2e-5, 3e-5, 4e-5], [16, 32], [3, 6], (2e-5, 16, 3)),
    "sst2": ([2e-5, 3e-5, 4e-5], [16, 32], [3, 6], (3e-5, 32, 3)),
    "mrpc": ([2e-5, 3e-5, 4e-5], [8], [3, 6], (2e-5, 8, 3)),
    "stsb": ([4e-5, 6e-5, 8e-5], [16, 32], [3, 6], (6e-5, 32, 6)),
    "qqp": ([4e-5, 5.5e-5, 7e-5], [32], [3, 6], (5.5e-5, 32, 3)),
    "mnli": ([3e-5, 4e-5, 5e-5], [16, 32], [3, 6], (4e-5, 16, 3)),
    "qnli": ([2e-5, 3e-5, 4e-5], [16, 32], [3, 6], (2e-5, 16, 3)),
    "rte": ([3e-5, 4e-5, 5e-5], [8], [3, 6], (5e-5, 8, 6)),
}

#: ``QAT_GRIDS[grid][task]`` = {"learning_rate": [...], "batch_size": [...], "epochs": [...],
#: "attn_dropout": [...], "best": {...} or None}; grid "w8a8" = Table 10, "w4a8" = Table 11.
QAT_GRIDS: dict[str, dict[str, dict[str, Any]]] = {
    "w8a8": {
        t: {"learning_rate": lr, "batch_size": bs, "epochs": e, "attn_dropout": [0.0, 0.1], "best": None}
        for t, (lr, bs, e) in _T10.items()
    },
    "w4a8": {
        t: {"learning_rate": lr, "batch_size": bs, "epochs": e, "attn_dropout": [None],
            "best": {"learning_rate": b[0], "batch_size": b[1], "epochs": b[2]}}
        for t, (lr, bs, e, b) in _T11.items()
    },
}
_TASK_ALIAS = {"mnli-mm": "mnli", "rotten_tomatoes": "sst2"}


def grid_for(config: QuantConfig) -> str:
    """``"w4a8"`` (Table 11) for weights below 8 bits, else ``"w8a8"`` (Table 10)."""
    bits = config.weights.bits
    return "w4a8" if bits is not None and bits < 8 else "w8a8"


def task_grid(grid: str, task_name: str) -> dict[str, Any]:
    if grid not in QAT_GRIDS:
        raise ConfigError(f"unknown QAT grid {grid!r}; allowed: {', '.join(QAT_GRIDS)}")
    return QAT_GRIDS[grid][_TASK_ALIAS.get(task_name, task_name if task_name in QAT_GRIDS[grid] else "sst2")]


def grid_points(grid: str, task_name: str) -> list[dict[str, Any]]:
    """Every configuration of the task's search space (Table 10 / 11), in a fixed order."""
    g = task_grid(grid, task_name)
    keys = ("learning_rate", "batch_size", "epochs", "attn_dropout")
    return [dict(zip(keys, v, strict=True)) for v in itertools.product(*(g[k] for k in keys))]


@dataclass
class QATConfig:
    """QAT hyper-parameters; ``None`` = the task's default from :data:`QAT_GRIDS`."""

    learning_rate: float | None = None
    batch_size: int | None = None
    epochs: float | None = None
    attn_dropout: float | None = None  # None = the checkpoint's own self-attention dropout
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int = 128
    seed: int = 0
    max_train_examples: int | None = None
    lsq_grad_scale: bool = True
    #: activation ranges learn at a rate relative to their PTQ size: each activation scale gets the peak
    #: learning rate ``rho * s0`` (its PTQ value s0) and each zero-point ``rho * (qmax - qmin)``, so Adam
    #: moves any range by at most ~rho of itself per step whatever its magnitude. None = every range
    #: learns at ``learning_rate``, as in the paper (see :func:`range_learning_rates`).
    act_range_rel_lr: float | None = None
    #: knowledge distillation from the FP32 model (not in the paper): the loss is
    #: ``(1 - distill) * task loss + distill * KL(teacher || student)`` on the logits (MSE for regression)
    distill: float = 0.0

    def __post_init__(self):
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.distill <= 1.0:
            raise ConfigError(f"distill weight must be in [0, 1], got {self.distill}")
        if self.act_range_rel_lr is not None and not 0 < self.act_range_rel_lr < 1:
            raise ConfigError(f"relative activation-range learning rate must be in (0, 1), got {self.act_range_rel_lr}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or self.batch_size < 1):
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.attn_dropout is not None and not 0.0 <= self.attn_dropout < 1.0:
            raise ConfigError(f"attention dropout must be in [0, 1), got {self.attn_dropout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warm-up ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 2 <= self.max_length <= 512:
            raise ConfigError(f"max length must be in 2..512, got {self.max_length}")
        if self.max_train_examples is not None and self.max_train_examples < 1:
            raise ConfigError(f"max_train_examples must be >= 1, got {self.max_train_examples}")

    def resolved(self, grid: str, task_name: str) -> QATConfig:
        """Fill the unset learning rate, batch size and epochs from the task's grid."""
        from .train import TABLE8

        g = task_grid(grid, task_name)
        best = g["best"] or {}
        ft_lr, ft_bs = TABLE8.get(_TASK_ALIAS.get(task_name, task_name), TABLE8["sst2"])
        lr = best.get("learning_rate") or (ft_lr if ft_lr in g["learning_rate"] else
                                           g["learning_rate"][len(g["learning_rate"]) // 2])
        bs = best.get("batch_size") or (ft_bs if ft_bs in g["batch_size"] else g["batch_size"][0])
        ep = best.get("epochs") or 3
        return replace(
            self,
            learning_rate=self.learning_rate or lr,
            batch_size=self.batch_size or bs,
            epochs=self.epochs or float(ep),
        )


# --------------------------------------------------------------------------- helpers
def set_attention_dropout(qm, rate: float) -> int:
    """Set the self-attention dropout (on the attention probabilities) of every layer; returns how many
    attention modules were changed."""
    from .models.base import ATTN_ATTR

    n = 0
    for m in qm.model.modules():
        if ATTN_ATTR in m.__dict__ and isinstance(getattr(m, "dropout", None), nn.Dropout):
            m.dropout.p = float(rate)
            n += 1
    cfg = qm.model.config
    for key in ("attention_probs_dropout_prob", "attention_dropout"):
        if hasattr(cfg, key):
            setattr(cfg, key, float(rate))
    if n == 0:
        raise ValueError(f"no self-attention dropout found in this {qm.family} model")
    return n


def distill_loss(teacher: nn.Module, weight: float):
    """``loss_fn`` for :func:`pegq.train.train_loop`: ``(1 - weight) * task loss + weight * distillation``,
    the distillation term the KL divergence from the FP32 teacher's class distribution to the student's
    (temperature 1), or the MSE between the two predictions for a regression head."""

    def loss_fn(batch: dict, out) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
        s = out.logits
        if s.shape[-1] == 1:
            kd = nn.functional.mse_loss(s.float(), t.float())
        else:
            kd = nn.functional.kl_div(s.float().log_softmax(-1), t.float().log_softmax(-1), log_target=True,
                                      reduction="batchmean")
        return kd if weight >= 1.0 else (1 - weight) * out.loss + weight * kd

    return loss_fn


def range_learning_rates(quantizers: dict, rel_lr: float) -> dict[int, float]:
    """``{id(parameter): peak lr}`` for the learned ranges of ``quantizers``: ``rel_lr * s0`` for a scale
    (``s0`` its current mean magnitude), ``rel_lr * (qmax - qmin)`` for a zero-point (integer units).

    Why: Adam moves a parameter by about its learning rate per step whatever the gradient's size, and the
    activation scales of one model span orders of magnitude (MiniLM W8A8: ~1e-3 for attention probabilities,
    ~1 for the residual sums holding the outliers); with the model's learning rate (~2e-5) the large ones
    cannot move in a short QAT run (median 0.3% over 480 steps, docs/results.md section 3).
    """
    lrs: dict[int, float] = {}
    for q in quantizers.values():
        if q.scale_param is not None and q.scale_param.requires_grad:
            lrs[id(q.scale_param)] = rel_lr * float(q.scale_param.detach().abs().mean())
        if q.zero_param is not None and q.zero_param.requires_grad:
            lrs[id(q.zero_param)] = rel_lr * float(q.qmax - q.qmin)
    return lrs


def _scales(qm) -> dict[str, torch.Tensor]:
    out = {}
    for n, q in qm.quantizers.items():
        if q.enabled and (q.scale_param is not None or q.x_min is not None):
            out[n] = q.scale.detach().float().cpu().clone()
    return out


def range_movement(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], weights: set[str]) -> dict:
    """How far the learned scales moved from their PTQ initialisation: median and max of
    ``|s_after / s_before - 1|`` over weight / activation quantizers, and how many moved at all."""

    def stats(names):
        rel = [float(((after[n] - before[n]).abs() / before[n].abs().clamp_min(1e-12)).max()) for n in names]
        if not rel:
            return {"count": 0}
        return {"count": len(rel), "moved": sum(r > 0 for r in rel), "median_rel_change": statistics.median(rel),
                "max_rel_change": max(rel)}

    common = [n for n in before if n in after]
    return {"weights": stats([n for n in common if n in weights]),
            "activations": stats([n for n in common if n not in weights])}


def _publish(tmp: Path, out: Path) -> None:
    """Move every file of ``tmp`` into ``out`` (each with an atomic rename), then drop ``tmp``."""
    out.mkdir(parents=True, exist_ok=True)
    mask = os.umask(0)
    os.umask(mask)
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            dest = out / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(f, 0o666 & ~mask)  # some writers create 0600 files
            os.replace(f, dest)
    shutil.rmtree(tmp, ignore_errors=True)


def save_quantized(qm, tokenizer, output_dir: str | Path, config: QuantConfig, info: dict | None = None) -> Path:
    """Write a quantized checkpoint that :func:`load_quantized` and ``pegq eval`` read: HF
    ``save_pretrained`` files of the FP32 master weights + tokenizer, ``pegq_quant.json`` (config, every
    quantizer's settings, ``info``) and ``quantizers.safetensors`` (their learned/estimated state).
    Each file is written under a temporary name and renamed into place."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # cloned: quantizers may share a tensor (the Q/K/V weight quantizers of a smoothed input hold one smoothing
    # vector), which safetensors refuses to write
    state = {k: v.detach().cpu().clone().contiguous() for k, v in qm.quantizer_modules.state_dict().items()}
    specs = {n: {**q.spec(), "state": q.state.value} for n, q in qm.quantizers.items()}
    meta = {"format": FORMAT, "config": config.to_dict(), "quantizers": specs, "family": qm.family,
            "info": info or {}}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        hf = copy.deepcopy(qm).unwrap()  # plain HF model with the FP32 master weights
        hf.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(state, str(tmp / QUANT_STATE))
        (tmp / QUANT_META).write_text(json.dumps(meta, indent=2, default=str))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_quantized_checkpoint(path: str | Path) -> bool:
    return (Path(path) / QUANT_META).is_file()


def load_quantized(path: str | Path, num_labels: int | None = None):
    """``(qm, tokenizer, meta)`` from a folder written by :func:`save_quantized` (``pegq qat``): the
    model wrapped and configured with its saved config, every quantizer's saved state loaded, frozen."""
    from safetensors.torch import load_file

    from .api import quantize
    from .models import ModelError, load_model

    p = Path(path)
    if not is_quantized_checkpoint(p):
        raise ModelError(f"'{path}' has no {QUANT_META}; it is not a pegq quantized checkpoint")
    meta = json.loads((p / QUANT_META).read_text())
    if meta.get("format") != FORMAT:
        raise ModelError(f"'{path}': unknown quantized checkpoint format {meta.get('format')!r}; expected {FORMAT}")
    if not (p / QUANT_STATE).is_file():
        raise ModelError(f"'{path}' lacks {QUANT_STATE}; the checkpoint is incomplete (re-run pegq qat)")
    model, tokenizer = load_model(p, num_labels=num_labels)
    cfg = QuantConfig.from_dict(meta["config"])
    qm = quantize(model, cfg)
    try:
        qm.quantizer_modules.load_state_dict(load_file(str(p / QUANT_STATE)))
    except RuntimeError as e:
        raise ModelError(f"'{path}': the quantizer state does not fit its config ({str(e).splitlines()[0]})") from None
    for q in qm.quantizers.values():
        if q.enabled:
            q.freeze()
    qm.eval()
    return qm, tokenizer, meta


def load_task_and_quantized(model_dir: str, task_name: str, data_dir: str | None = None, **task_kwargs):
    """Like :func:`pegq.pipeline.load_task_and_model`, for a quantized checkpoint."""
    from .data import load_task

    task = load_task(task_name, data_dir=data_dir, **task_kwargs)
    qm, tokenizer, _ = load_quantized(model_dir, num_labels=task.spec.num_labels)
    return task, qm, tokenizer


# --------------------------------------------------------------------------- the job
def qat(
    model_dir: str,
    task_name: str,
    config: str | QuantConfig = "qat-w8a8",
    output_dir: str | Path | None = None,
    hparams: QATConfig | None = None,
    overrides: list[str] | None = None,
    data_dir: str | None = None,
    eval_batch_size: int = 32,
    max_eval_examples: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    fp32_score: dict | None = None,
    task_kwargs: dict | None = None,
    accelerator: Any = "auto",
) -> dict:
    """QAT of a fine-tuned checkpoint (see the module docstring). Returns the result dict (also written
    to ``<output_dir>/results.json`` with the checkpoint when ``output_dir`` is given).

    ``accelerator``: ``"auto"`` (:func:`pegq.train.make_accelerator`), ``None`` (plain loop) or an
    ``accelerate.Accelerator``.
    """
    from .api import calibrate, evaluate, quantize, quantizer_summary
    from .data import encode, make_loader
    from .peg import quantizers_off
    from .pipeline import calibration_batches, dev_loader, load_task_and_model
    from .size import model_size
    from .train import is_main_process, make_accelerator, seed_everything, train_loop

    out = prepare_output_dir(output_dir, overwrite) if output_dir is not None else None
    cfg = resolve_config(config)
    if overrides:
        cfg = cfg.with_overrides(list(overrides))
    grid = grid_for(cfg)
    if accelerator == "auto":
        accelerator = make_accelerator()
    main = is_main_process(accelerator)
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    seed_everything((hparams or QATConfig()).seed)
    task, model, tokenizer = load_task_and_model(model_dir, task_name, data_dir, **(task_kwargs or {}))
    hp = (hparams or QATConfig()).resolved(grid, task.spec.name)
    loader = dev_loader(task, tokenizer, eval_batch_size, max_eval_examples, max_length=hp.max_length)
    teacher = None
    if hp.distill > 0:
        teacher = copy.deepcopy(model).eval().requires_grad_(False).to(device)
    qm = quantize(model, cfg)  # a bad override fails here, before any long evaluation
    if not any(q.enabled for q in qm.quantizers.values()):
        raise ConfigError(f"config {cfg.name!r} quantizes nothing; QAT needs quantized weights or activations")
    for q in qm.quantizers.values():
        q.lsq_grad_scale = hp.lsq_grad_scale
    if hp.attn_dropout is not None:
        set_attention_dropout(qm, hp.attn_dropout)
    qm.to(device)
    state_dir = out.with_name(out.name + ".partial-state") if out is not None else None
    fingerprint = json.dumps([str(model_dir), task.spec.name, cfg.to_dict(), asdict(hp), max_eval_examples],
                             sort_keys=True, default=str)
    evals = _EvalCache(out / ".qat_evals.json" if out is not None else None, fingerprint)
    timings: dict[str, float] = {}
    if fp32_score is None and main:
        t0 = time.perf_counter()
        with quantizers_off(qm):
            fp32_score = evals.get("fp32", lambda: evaluate(qm, loader, task.spec, progress=progress,
                                                             desc="FP32 eval", device=device))
        timings["fp32_eval_s"] = time.perf_counter() - t0
    # 1) PTQ initialisation of every quantization parameter
    t0 = time.perf_counter()
    timings.update(calibrate(qm, calibration_batches(task, tokenizer, cfg, max_length=hp.max_length),
                             progress=progress, device=device))
    init_score = None
    if main:
        init_score = evals.get("ptq_init", lambda: evaluate(qm, loader, task.spec, progress=progress,
                                                             desc=f"{cfg.name} PTQ init eval", device=device))
    timings["ptq_init_s"] = time.perf_counter() - t0
    # 2) learn ranges jointly with the weights
    enabled = {n: q for n, q in qm.quantizers.items() if q.enabled}
    for q in enabled.values():
        q.learn_ranges()
    before = _scales(qm)
    train = task.train if not hp.max_train_examples else task.train[: hp.max_train_examples]
    train_ds = encode(train, tokenizer, task.spec, max_length=hp.max_length)
    train_loader = make_loader(train_ds, batch_size=hp.batch_size, shuffle=True, seed=hp.seed)
    lr_overrides = None
    if hp.act_range_rel_lr is not None:
        lr_overrides = range_learning_rates(
            {n: q for n, q in qm.activation_quantizers().items() if q.enabled}, hp.act_range_rel_lr)
    t0 = time.perf_counter()
    log = train_loop(qm, train_loader, epochs=hp.epochs, learning_rate=hp.learning_rate,
                     warmup_ratio=hp.warmup_ratio, weight_decay=hp.weight_decay, grad_clip=hp.grad_clip,
                     lr_overrides=lr_overrides, loss_fn=distill_loss(teacher, hp.distill) if teacher else None,
                     state_dir=state_dir, progress=progress, desc="QAT",
                     accelerator=accelerator)
    timings["train_s"] = time.perf_counter() - t0
    for q in enabled.values():
        q.freeze()
    qm.eval()
    after = _scales(qm)
    if not main:
        accelerator.wait_for_everyone()
        return {"main_process": False}
    t0 = time.perf_counter()
    q_score = evaluate(qm, loader, task.spec, progress=progress, desc=f"{cfg.name} QAT eval", device=device)
    timings["quant_eval_s"] = time.perf_counter() - t0
    result = {
        "task": task.spec.name,
        "metric": q_score.get("metric"),
        "model": str(model_dir),
        "config_name": cfg.name,
        "method": "qat",
        "fp32": fp32_score,
        "ptq_init": init_score,
        "quantized": q_score,
        "fp32_score": fp32_score["score"],
        "ptq_init_score": init_score["score"],
        "quantized_score": q_score["score"],
        "delta": q_score["score"] - fp32_score["score"],
        "dev_examples": len(loader.dataset),
        "train_examples": len(train),
        "hparams": {**asdict(hp), "grid": grid},
        "size": model_size(qm),
        "ranges": range_movement(before, after, set(qm.weight_quantizers())),
        "quantizers": quantizer_summary(qm),
        "config": cfg.to_dict(),
        "loss_log": log,
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
        "processes": accelerator.num_processes if accelerator is not None else 1,
    }
    if out is not None:
        save_quantized(qm, tokenizer, out, cfg, info={k: result[k] for k in ("task", "config_name", "hparams",
                                                                             "fp32_score", "quantized_score")})
        result["checkpoint"] = str(out)
        atomic_write_json(out / "results.json", result)  # last: marks the output complete
        if state_dir is not None and state_dir.exists():
            shutil.rmtree(state_dir, ignore_errors=True)
        evals.clear()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return result


class _EvalCache:
    """Scores already computed by an interrupted run (kept in the output folder until it completes), so
    a resumed run with the same settings does not evaluate them again."""

    def __init__(self, path: Path | None, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        old = json.loads(path.read_text()) if path is not None and path.exists() else {}
        self.data = old.get("scores", {}) if old.get("fingerprint") == fingerprint else {}

    def get(self, key: str, fn):
        if key not in self.data:
            self.data[key] = fn()
            if self.path is not None:
                atomic_write_json(self.path, {"fingerprint": self.fingerprint, "scores": self.data})
        return self.data[key]

    def clear(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


def qat_table(rows: list[dict], title: str = "pegq QAT results"):
    """A rich table of QAT (and PTQ) result dicts with the size column."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("task", "metric", "config", "FP32", "PTQ init", "QAT", "delta", "size (paper)", "size (total)"):
        t.add_column(col, justify="left" if col in ("task", "metric", "config") else "right")
    for r in rows:
        size = r.get("size") or {}
        init = r.get("ptq_init_score")
        t.add_row(
            r["task"], str(r["metric"]), r["config_name"], f"{r['fp32_score']:.2f}",
            "-" if init is None else f"{init:.2f}", f"{r['quantized_score']:.2f}", f"{r['delta']:+.2f}",
            f"x{size['weights']['reduction']:.2f}" if size else "-", f"x{size['reduction']:.2f}" if size else "-",
        )
    return t
