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

Two options (override tokens; neither helped MiniLM or MPNet here, docs/results.md):

* ``sqauto``: alpha per tensor, the value of :data:`AUTO_ALPHAS` whose quantized readers have the lowest
  summed relative output error on up to :data:`AUTO_ROWS` calibration rows (as in Outlier Suppression+'s
  scale search), instead of one alpha for every tensor;
* ``shift``: each dim is first centred on the middle of its calibration range, ``z_j = (max_j + min_j) / 2``
  (Outlier Suppression+, Wei et al. 2023), and ``s`` scales the half-width ``(max_j - min_j) / 2``: the
  quantizer returns ``q((x - z) / s) * s + z``; in an integer deployment the readers' biases absorb ``W z``.

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


AUTO_ALPHAS = (0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)  # the grid ``sqauto`` searches
AUTO_ROWS = 2048  # token rows kept per smoothed activation for the search (every k-th row of each batch)


class _Recorder:
    """Replaces a target quantizer's forward (quantizers off): keep the tensor (for identity checks), its
    per-dim min and max (and, for ``sqauto``, a sample of its rows); return it unchanged."""

    def __init__(self, name: str, seen: list, stats: dict, keep_rows: int):
        self.name, self.seen, self.stats, self.keep_rows = name, seen, stats, keep_rows

    def __call__(self, x):
        self.seen.append((self.name, x))
        f = x.detach().reshape(-1, x.shape[-1]).float()
        mn, mx = f.amin(0).cpu(), f.amax(0).cpu()
        st = self.stats.setdefault(self.name, {"min": mn, "max": mx, "rows": [], "n": 0})
        st["min"], st["max"] = torch.minimum(st["min"], mn), torch.maximum(st["max"], mx)
        if self.keep_rows and st["n"] < self.keep_rows:
            step = max(1, f.shape[0] // max(1, self.keep_rows // 8))
            st["rows"].append(f[::step][: self.keep_rows - st["n"]].cpu())
            st["n"] += st["rows"][-1].shape[0]
        return x


def centre_and_halfwidth(mn: torch.Tensor, mx: torch.Tensor, shift: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-dim shift ``z`` (None without shifting) and the magnitude ``max|x - z|`` smoothing scales by."""
    if shift:
        return (mx + mn) / 2, (mx - mn) / 2
    return None, torch.maximum(mx.abs(), mn.abs())


@torch.no_grad()
def search_alpha(act_q, weight_qs: list, weights: list[torch.Tensor], rows: torch.Tensor, z, magnitude,
                 cols: torch.Tensor, alphas=AUTO_ALPHAS) -> tuple[float, dict]:
    """The migration strength of ``alphas`` with the lowest summed relative output error
    ``||X W^T - q(X) q(W)^T||^2 / ||X W^T||^2`` over the readers, on the sampled rows ``X``, with copies of
    the activation quantizer and of each reader's weight quantizer (their own bits, granularity and range
    estimator). Returns ``(alpha, {alpha: error})``."""
    import copy

    ref = [rows @ w.float().T for w in weights]
    norms = [float(r.pow(2).sum().clamp_min(1e-30)) for r in ref]
    errors = {}
    for a in alphas:
        s = smooth_scale(magnitude, cols, a)
        aq = copy.deepcopy(act_q)
        aq.set_smooth(1.0 / s, z)
        aq.reset()
        xq = aq(rows)
        err = 0.0
        for wq, w, r, nr in zip(weight_qs, weights, ref, norms, strict=True):
            cq = copy.deepcopy(wq)
            if cq.enabled:
                cq.set_smooth(s)
                cq.reset()
                what = cq(w.float())
            else:
                what = w.float()
            err += float((xq @ what.T - r).pow(2).sum()) / nr
        errors[a] = err
    best = min(errors, key=errors.get)
    return best, errors


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
        return {"smoothing_s": 0.0, "smoothed": {}, "not_smoothed": [], "alphas": {}}
    t0 = time.perf_counter()
    owners = {n: m for n, m in qm._weight_owner.items() if isinstance(m, nn.Linear)}
    readers: dict[str, list[str]] = {n: [] for n in tg}
    stats: dict[str, dict] = {}
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
                keep = AUTO_ROWS if q.smooth_alpha == "auto" else 0
                object.__setattr__(q, "forward", _Recorder(n, seen, stats, keep))
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
    skipped = [n for n, ws in readers.items() if not ws or n not in stats]
    alphas = {}
    for n, ws in readers.items():
        if n in skipped:
            continue
        weights = [owners[w].parametrizations.weight.original.detach().float().cpu() for w in ws]
        cols = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
        st = stats[n]
        z, magnitude = centre_and_halfwidth(st["min"], st["max"], tg[n].smooth_shift)
        alpha = tg[n].smooth_alpha
        if alpha == "auto":
            alpha, errors = search_alpha(tg[n], [quantizers[w] for w in ws], weights, torch.cat(st["rows"]), z,
                                         magnitude, cols)
            alphas[n] = {"alpha": alpha, "errors": errors}
        s = smooth_scale(magnitude, cols, alpha)
        tg[n].set_smooth(1.0 / s, z)
        for w in ws:
            if quantizers[w].enabled:
                quantizers[w].set_smooth(s)
    smoothed = {n: ws for n, ws in readers.items() if n not in skipped}
    return {"smoothing_s": time.perf_counter() - t0, "smoothed": smoothed, "not_smoothed": skipped,
            "alphas": alphas}


__all__ = ["SmoothingError", "prepare_smoothing", "smooth_scale", "targets"]
