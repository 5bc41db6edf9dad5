"""The public entry points. The CLI (`pegq ...`) is a thin layer over these.

    import pegq
    qm = pegq.quantize(hf_model, "w8a8")          # wrap + configure every quantizer
    pegq.calibrate(qm, calibration_batches)        # estimate ranges, then freeze
    scores = pegq.evaluate(qm, dev_loader, task)   # the task's metric
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .config import ConfigError, QuantConfig, resolve_config, sq_token
from .models import QuantizedModel, wrap
from .quant import QuantState


def quantize(model, config: str | QuantConfig = "w8a8", overrides: list[str] | None = None) -> QuantizedModel:
    """Wrap ``model`` (a HF encoder, or an already wrapped one) and set every quantizer from ``config``.

    ``config`` is a preset name (``w8a8``, ``mp-ptq``, ``peg-ptq``, ...), a JSON/YAML path or a
    :class:`QuantConfig`; ``overrides`` are extra ``PATTERN=TOKENS`` strings applied last.
    The returned model still needs :func:`calibrate` before its ranges mean anything.
    """
    cfg = resolve_config(config)
    if overrides:
        cfg = cfg.with_overrides(list(overrides))
    qm = model if isinstance(model, QuantizedModel) else wrap(model)
    apply_config(qm, cfg)
    return qm


def apply_config(qm: QuantizedModel, cfg: QuantConfig) -> dict:
    weights = qm.weight_quantizers()
    names = {n: (n in weights) for n in qm.quantizers}
    settings = cfg.resolve(names)
    for n, s in settings.items():
        if s.smooth is not None and names[n] and s.bits is not None:
            raise ConfigError(f"{n}: smoothing ({sq_token(s.smooth)}) applies to activations, not weights: put it "
                              f"on the activation the Linear reads (its weight quantizer follows at calibration)")
        if s.granularity == "token" and names[n] and s.bits is not None:
            raise ConfigError(f"{n}: per-token (dynamic) ranges are for activations, not weights; use tensor or "
                              f"channel for weights")
    for n, s in settings.items():
        qm.quantizers[n].smooth_alpha = s.smooth if s.bits is not None else None
        qm.quantizers[n].smooth_shift = bool(s.shift) and s.bits is not None
        qm.quantizers[n].configure(
            bits=s.bits,
            symmetric=s.symmetric,
            granularity=s.make_granularity(),
            estimator=s.estimator,
            momentum=s.momentum,
        )
    qm.config = cfg
    qm.settings = settings
    return settings


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    """The keys a HF encoder forward takes (labels are kept out so no loss is computed)."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@torch.no_grad()
def calibrate(
    qm: QuantizedModel,
    batches: Iterable[dict],
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict:
    """Static range estimation (paper section 2): reset every enabled quantizer, pass the
    calibration batches through the model with every quantizer ESTIMATING (weights see their tensor
    on the first batch), then freeze. Returns timing info."""
    from .peg import prepare_permutations
    from .smooth import prepare_smoothing

    qm.eval()
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch; increase --calib-batches")
    t0 = time.perf_counter()
    enabled = {n: q for n, q in qm.quantizers.items() if q.enabled}
    for q in enabled.values():
        q.reset()
    # range-based permutations for permuted PEG quantizers need one FP32 pass first
    perm_time = prepare_permutations(qm, batches, device=device)
    # SmoothQuant-style scales (sq<alpha> activations and the weights of the Linears reading them)
    smoothing = prepare_smoothing(qm, batches, device=device)
    for q in enabled.values():
        q.estimate()
    # Weight quantizers see their (static) tensor once, on the first batch; parametrize.cached()
    # then reuses the quantized weights instead of re-quantizing every table on every forward.
    with parametrize.cached():
        for b in tqdm(batches, desc="calibrating", disable=not progress, leave=False):
            qm(**model_inputs(_to_device(b, device)))
    missing = [n for n, q in enabled.items() if q.x_min is None]
    if missing:
        raise RuntimeError(
            f"{len(missing)} quantizers saw no data during calibration (e.g. {missing[:3]}); "
            f"is that part of the model used by this forward?"
        )
    for q in enabled.values():
        q.freeze()
    out = {"calibration_s": time.perf_counter() - t0, "permutation_s": perm_time,
           "smoothing_s": smoothing["smoothing_s"], "batches": len(batches)}
    if smoothing.get("alphas"):  # sqauto: the alpha each smoothed tensor got
        out["smoothing_alphas"] = {n: r["alpha"] for n, r in smoothing["alphas"].items()}
    return out


@torch.no_grad()
def predict(
    model,
    loader: Iterable[dict],
    progress: bool = True,
    desc: str = "evaluating",
    device: str | torch.device = "cpu",
    trim: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over a loader. ``trim``: drop all-padding columns of each batch (exactly
    equivalent unless a quantizer is still estimating ranges, in which case nothing is trimmed)."""
    from .train import trim_batch

    model.eval()
    logits, labels = [], []
    with parametrize.cached():  # quantize each weight once, not once per batch
        for b in tqdm(loader, desc=desc, disable=not progress, leave=False):
            # Cut the batch to its longest sequence: with frozen quantizers (element-wise, fixed
            # ranges) and masked attention, the real tokens' outputs do not depend on the padding.
            if trim and not _estimating(model):
                b = trim_batch(b)
            out = model(**model_inputs(_to_device(b, device)))
            lg = out.logits if hasattr(out, "logits") else out[0]
            logits.append(lg.float().cpu())
            labels.append(b["labels"].cpu())
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def _estimating(model) -> bool:
    qs = getattr(model, "quantizers", None)
    if not isinstance(qs, dict):
        return False
    return any(q.enabled and q.state == "estimating" for q in qs.values())


def evaluate(model, loader, task, progress: bool = True, desc: str = "evaluating", device="cpu") -> dict:
    """The task's metrics (``score`` in points, x100) of ``model`` on ``loader``."""
    from .data import compute_metrics

    logits, labels = predict(model, loader, progress=progress, desc=desc, device=device)
    return compute_metrics(task, logits, labels)


def quantizer_summary(qm: QuantizedModel) -> dict[str, Any]:
    acts = qm.activation_quantizers()
    ws = qm.weight_quantizers()
    a_bits: dict[str, int] = {}
    for q in acts.values():
        k = "off" if q.bits is None else str(q.bits)
        a_bits[k] = a_bits.get(k, 0) + 1
    w_bits: dict[str, int] = {}
    for q in ws.values():
        k = "off" if q.bits is None else str(q.bits)
        w_bits[k] = w_bits.get(k, 0) + 1
    return {
        "activation_quantizers": len(acts),
        "weight_quantizers": len(ws),
        "activation_bits": a_bits,
        "weight_bits": w_bits,
        "frozen": sum(q.state == QuantState.FROZEN for q in qm.quantizers.values() if q.enabled),
    }
