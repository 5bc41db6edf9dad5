"""Smoothing of per-tensor activations into the weights (SmoothQuant, Xiao et al. 2022; not in the paper).

An activation ``x`` that only Linear layers read as a matmul input (plus float consumers such as a
residual sum) can be quantized per-tensor after dividing each embedding dim by a scale ``s_j``, with
``s`` multiplied into the input columns of every Linear that reads it: ``W x = (W diag(s)) (x / s)``.
The integer matmul then sees the per-tensor codes of ``x / s`` and of ``W diag(s)`` (weights quantized
per output channel absorb the column scales well), so a few wide embedding dims no longer set the step of
all the others. Float consumers (the residual sum) get ``s * q(x / s)``: the quantized tensor in its
original scale.

With migration strength ``alpha`` (override token ``sq<alpha>``), as in SmoothQuant:
``s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)``, ``max|x_j|`` over the calibration data (FP32 pass),
``max|W_:,j|`` over the columns of every Linear that reads ``x`` (Q, K and V share one ``s``).

For the encoders here the targets are the LayerNorm outputs that feed Q/K/V and the first FFN Linear:
in a post-LN encoder they also feed the residual sum, so the LayerNorm cannot absorb ``1/s`` as in
SmoothQuant's pre-LN models; the quantizer does it instead (in the ONNX export, :mod:`pegq.export.onnx`,
one elementwise ``Mul`` before a per-tensor ``QuantizeLinear`` and a ``Div`` for the residual).

The Linears reading an activation are found by tensor identity in one forward pass with every quantizer
off (a Linear whose input *is* the tensor the quantizer point receives). A smoothed activation that no
Linear reads directly (e.g. the last layer's output, which the pooler reads through a slice, or attention
probabilities, which a matmul reads) stays plain per-tensor (reported as ``not_smoothed``); a Linear read
by two smoothed activations is refused (:class:`SmoothingError`).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .peg import quantizers_off


class SmoothingError(ValueError):
    """A smoothing setting that cannot be applied (the message says why and what to do)."""


def smooth_scale(act_absmax: torch.Tensor, weight_col_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s = max|x|^alpha / max|W|^(1 - alpha)`` per embedding dim (both clamped to >= 1e-5;
    the result too)."""
    a = act_absmax.float().clamp_min(1e-5)
    w = weight_col_absmax.float().clamp_min(1e-5)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(1e-5)


def targets(qm) -> dict:
    """Enabled activation quantizers with a smoothing strength (``sq<alpha>``)."""
    return {n: q for n, q in qm.activation_quantizers().items() if q.enabled and q.smooth_alpha is not None}


class _Recorder:
    """Replaces a target quantizer's forward (quantizers off): keep the tensor (for identity checks) and
    its per-dim max |x|; return it unchanged."""

    def __init__(self, name: str, seen: list, absmax: dict):
        self.name, self.seen, self.absmax = name, seen, absmax

    def __call__(self, x):
        self.seen.append((self.name, x))
        a = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float().cpu()
        self.absmax[self.name] = a if self.name not in self.absmax else torch.maximum(self.absmax[self.name], a)
        return x


@torch.no_grad()
def prepare_smoothing(qm, batches, device="cpu") -> dict:
    """Clear every quantizer's smoothing scale, then set it on each ``sq<alpha>`` activation (``1/s``) and
    on the weight quantizers of the Linears that read it (``s``). Returns ``{"smoothing_s": seconds,
    "smoothed": {activation: [weight quantizers]}}``."""
    from .api import _to_device, model_inputs

    for q in qm.quantizers.values():
        if q.smooth is not None:
            q.set_smooth(None)
    tg = targets(qm)
    if not tg:
        return {"smoothing_s": 0.0, "smoothed": {}, "not_smoothed": []}
    t0 = time.perf_counter()
    owners = {n: m for n, m in qm._weight_owner.items() if isinstance(m, nn.Linear)}
    readers: dict[str, list[str]] = {n: [] for n in tg}
    absmax: dict[str, torch.Tensor] = {}
    seen: list = []
    patched = []

    def linear_hook(mod, args, wname):
        x = args[0] if args else None
        for n, t in seen:
            if x is t and wname not in readers[n]:
                readers[n].append(wname)

    handles = [m.register_forward_pre_hook(lambda mod, args, w=w: linear_hook(mod, args, w)) for w, m in owners.items()]
    try:
        with quantizers_off(qm):
            for n, q in tg.items():
                object.__setattr__(q, "forward", _Recorder(n, seen, absmax))
                patched.append(q)
            for b in batches:
                seen.clear()
                qm(**model_inputs(_to_device(b, device)))
    finally:
        seen.clear()
        for h in handles:
            h.remove()
        for q in patched:
            q.__dict__.pop("forward", None)
    quantizers = qm.quantizers
    owner_of: dict[str, str] = {}
    for n, ws in readers.items():
        for w in ws:
            if w in owner_of:
                raise SmoothingError(f"{w}: its Linear reads two smoothed tensors ({owner_of[w]} and {n}); "
                                     f"smooth only one of them")
            owner_of[w] = n
    # no Linear reads it directly (e.g. the last layer's output, read by the pooler through a slice), or it is
    # not computed with the quantizers off (e.g. attention probabilities under sdpa): stays plain per-tensor
    skipped = [n for n, ws in readers.items() if not ws or n not in absmax]
    for n, ws in readers.items():
        if n in skipped:
            continue
        cols = torch.stack([owners[w].parametrizations.weight.original.detach().abs().amax(0).float().cpu()
                            for w in ws]).amax(0)
        s = smooth_scale(absmax[n], cols, tg[n].smooth_alpha)
        tg[n].set_smooth(1.0 / s)
        for w in ws:
            if quantizers[w].enabled:
                quantizers[w].set_smooth(s)
    smoothed = {n: ws for n, ws in readers.items() if n not in skipped}
    return {"smoothing_s": time.perf_counter() - t0, "smoothed": smoothed, "not_smoothed": skipped}


__all__ = ["SmoothingError", "prepare_smoothing", "smooth_scale", "targets"]
