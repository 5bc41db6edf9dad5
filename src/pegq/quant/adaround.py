"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"): the math
only, for one weight tensor and its cached layer inputs/outputs. No knowledge of models; the model-level
driver is :mod:`pegq.adaround_model`.

Instead of rounding every weight to the nearest grid point, AdaRound learns for each weight whether to
round *down* or *up*, so that the layer's output -- not the weight itself -- is reconstructed::

    W~ = s * clip(floor(W / s) + h(V), qmin - z, qmax - z)                      (AdaRound eq. 22)
    h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),  zeta = 1.1, gamma = -0.1   (eq. 23)
    min_V  || W~ x - W x ||^2  +  lambda * sum_ij (1 - |2 h(V_ij) - 1|^beta)   (eq. 24-25)

* ``V`` starts where ``h(V)`` equals the fractional part of ``W / s`` (so the soft weight starts at
  ``W`` itself, clipping aside);
* the regulariser pushes every ``h`` to 0 or 1; ``beta`` is annealed linearly from 20 to 2 after a
  warm-up of 20% of the iterations without regulariser; ``lambda = 0.01``;
* Adam, learning rate 1e-3, mini-batches of cached input rows (one row = one token's input vector);
* after optimisation the rounding is made hard: ``offset = 1 if h(V) >= 0.5`` (i.e. ``V >= 0``), an
  uint8 tensor shaped like the weight, which :class:`~pegq.quant.Quantizer` applies in place of
  round-to-nearest (:func:`fake_quant_fixed_rounding`, ``Quantizer.round_offset``).

The reconstruction loss is the squared error summed over output features and averaged over rows, as in
the reference implementation; the scale and zero-point stay as calibrated (pegq: the MSE estimator for
low-bit weights, paper section 5).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

ZETA, GAMMA = 1.1, -0.1


@dataclass
class AdaRoundConfig:
    """Hyper-parameters (defaults: Nagel et al. 2020, and the paper's Table 7: 10^4 iterations)."""

    iters: int = 10_000
    batch_rows: int = 1024  # token rows per iteration (~32 sequences of ~32 tokens)
    lr: float = 1e-3
    reg_weight: float = 0.01  # lambda
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of iterations without the rounding regulariser
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"AdaRound iterations must be a positive integer, got {self.iters!r}")
        if isinstance(self.batch_rows, bool) or not isinstance(self.batch_rows, int) or self.batch_rows < 1:
            raise ValueError(f"AdaRound batch_rows must be a positive integer, got {self.batch_rows!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"AdaRound warm-up must be a fraction in [0, 1), got {self.warmup!r}")
        if not self.lr > 0 or self.reg_weight < 0 or not self.beta_start >= self.beta_end > 0:
            raise ValueError(
                f"AdaRound needs lr > 0, reg_weight >= 0 and beta_start >= beta_end > 0; got lr={self.lr}, "
                f"reg_weight={self.reg_weight}, beta={self.beta_start}->{self.beta_end}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- the rounding function
def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V)`` of eq. (23): a sigmoid stretched to ``(gamma, zeta)`` and clipped to ``[0, 1]``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inv(scale: torch.Tensor) -> torch.Tensor:
    return torch.reciprocal(torch.as_tensor(scale, dtype=torch.float32))


def init_v(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = W/s - floor(W/s)`` (the soft weight starts at ``W``)."""
    v = weight.detach().float() * _inv(scale).to(weight.device)
    rest = (v - torch.floor(v)).clamp(0.0, 1.0)
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def _bounds(zero: torch.Tensor | None, qmin: int, qmax: int):
    if zero is None:
        return qmin, qmax
    z = torch.as_tensor(zero, dtype=torch.float32).round().clamp(qmin, qmax)
    return qmin - z, qmax - z


def _clamp(v: torch.Tensor, lo, hi) -> torch.Tensor:
    if isinstance(lo, torch.Tensor):
        return torch.minimum(torch.maximum(v, lo.to(v.device)), hi.to(v.device))
    return torch.clamp(v, lo, hi)


def soft_quant(weight, v, scale, zero, qmin: int, qmax: int) -> torch.Tensor:
    """``s * clip(floor(W/s) + h(V), qmin - z, qmax - z)``, differentiable w.r.t. ``V`` (eq. 22)."""
    base = torch.floor(weight.detach().float() * _inv(scale).to(weight.device))
    return _clamp(base + rectified_sigmoid(v), *_bounds(zero, qmin, qmax)) * scale


def hard_offset(v: torch.Tensor) -> torch.Tensor:
    """The frozen decision: 1 (round up) where ``h(V) >= 0.5`` i.e. ``V >= 0``, else 0 (uint8)."""
    return (v.detach() >= 0).to(torch.uint8)


def nearest_offset(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The offsets that reproduce round-to-nearest (half to even) on the unclipped grid."""
    v = weight.detach().float() * _inv(scale).to(weight.device)
    return (torch.round(v) - torch.floor(v)).to(torch.uint8)


def fake_quant_fixed_rounding(x, scale, zero, qmin: int, qmax: int, offset: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize with a fixed rounding decision per element (``floor(x/s) + offset``) instead of
    round-to-nearest; ``offset`` is shaped like ``x``. Same numerics as
    :func:`~pegq.quant.functional.fake_quant` otherwise (``x * (1/s)`` in float32, clip, times ``s``);
    gradients w.r.t. ``x`` pass straight through inside the grid."""
    if offset.shape != x.shape:
        raise ValueError(
            f"the AdaRound rounding offsets have shape {tuple(offset.shape)} but the tensor has "
            f"{tuple(x.shape)}; reset the quantizer (the offsets belong to another weight)"
        )
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    v = xf * torch.reciprocal(scale)
    q = torch.floor(v.detach()) + offset.to(device=x.device, dtype=v.dtype)
    lo, hi = _bounds(zero, qmin, qmax)
    if v.requires_grad:
        inside = (v >= lo) & (v <= hi) if not isinstance(lo, torch.Tensor) else (v >= lo.to(v)) & (v <= hi.to(v))
        q = q + (v - v.detach()) * inside  # STE inside the grid, 0 outside
    return (_clamp(q, lo, hi) * scale).to(x.dtype)


def round_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2 h(V) - 1|^beta)`` (eq. 25)."""
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def beta_at(it: int, cfg: AdaRoundConfig) -> float | None:
    """``beta`` at iteration ``it`` (0-based); ``None`` during warm-up (no regulariser)."""
    warm = int(cfg.warmup * cfg.iters)
    if it < warm:
        return None
    t = (it - warm) / max(1, cfg.iters - warm)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - t)


class _SoftRoundStep:
    """:func:`soft_quant` and the gradient of (reconstruction + ``lambda`` * regulariser) w.r.t. ``V`` in
    closed form: the same numbers as autograd through :func:`soft_quant` and :func:`round_regularizer`
    (``tests/quant/test_adaround.py`` checks it), but a handful of in-place passes instead of a graph of
    ~20 element-wise ops, which dominated an iteration on CPU. Autograd only runs through the layer."""

    def __init__(self, w, scale, zero, qmin, qmax):
        self.scale = torch.as_tensor(scale, dtype=torch.float32, device=w.device)
        self.base = torch.floor(w.detach().float() * _inv(self.scale).to(w.device))
        self.lo, self.hi = _bounds(zero, qmin, qmax)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        sig = torch.sigmoid(v)
        h_raw = sig * (ZETA - GAMMA) + GAMMA
        self.h = h_raw.clamp(0.0, 1.0)
        # dh/dV: zero where the rectification clips
        self.dh = sig.mul_(1 - sig).mul_(ZETA - GAMMA).mul_((h_raw > 0) & (h_raw < 1))
        q = self.base + self.h
        self.inside = (q >= self.lo) & (q <= self.hi) if not isinstance(self.lo, torch.Tensor) else (
            (q >= self.lo.to(q)) & (q <= self.hi.to(q)))
        wq = _clamp(q, self.lo, self.hi).mul_(self.scale)
        return wq.requires_grad_(True)

    def grad_v(self, grad_wq: torch.Tensor, beta: float | None, reg_weight: float) -> torch.Tensor:
        g = (grad_wq * self.scale).mul_(self.inside)
        if beta is not None and reg_weight:
            # d/dh [1 - |2h - 1|^beta] = -2 beta |2h - 1|^(beta - 1) sign(2h - 1)
            u = 2 * self.h - 1
            g.add_(u.abs().pow_(beta - 1).mul_(torch.sign(u)).mul_(-2 * beta * reg_weight))
        return g.mul_(self.dh)


# --------------------------------------------------------------------------- one layer
@torch.no_grad()
def reconstruction_error(
    weight_q: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    forward: Callable = F.linear,
    chunk: int = 8192,
) -> float:
    """``mean_rows sum_features (f(x; W~) - target)^2`` over all cached rows."""
    total, n = 0.0, inputs.shape[0]
    for i in range(0, n, chunk):
        out = forward(inputs[i : i + chunk], weight_q, bias)
        total += float((out - targets[i : i + chunk]).pow(2).sum())
    return total / max(1, n)


def optimize_rounding(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    qmin: int,
    qmax: int,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: AdaRoundConfig | None = None,
    forward: Callable = F.linear,
    on_step: Callable[[int, float], None] | None = None,
    keep_better: bool = True,
) -> tuple[torch.Tensor, dict]:
    """AdaRound for one layer ``y = forward(x, W, b)`` (default: a Linear).

    ``scale``/``zero`` (``zero=None``: symmetric) broadcast against ``weight``; ``inputs`` ``[N, in]``
    and ``targets`` ``[N, out]`` are the cached rows (targets: the FP32 layer's outputs). Returns the
    hard rounding offsets (uint8, shaped like ``weight``) and a report: reconstruction error with
    round-to-nearest and with the learned rounding (both hard, on all rows), the fraction of weights
    rounded differently from nearest, and the time. ``on_step(it, loss)`` is called every iteration.
    With ``keep_better`` the round-to-nearest offsets are returned instead if the learned rounding
    reconstructs worse (``info["kept"]`` says which; ``mse_adaround`` is always the learned one's).
    """
    cfg = config or AdaRoundConfig()
    if inputs.ndim != 2 or targets.ndim != 2 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"AdaRound needs inputs [N, in] and targets [N, out] with the same N; got "
            f"{tuple(inputs.shape)} and {tuple(targets.shape)}"
        )
    if inputs.shape[0] == 0:
        raise ValueError("AdaRound got no cached rows; pass at least one calibration sequence")
    t0 = time.perf_counter()
    w = weight.detach().float()
    scale = torch.as_tensor(scale, dtype=torch.float32, device=w.device)
    nearest = nearest_offset(w, scale)
    lo, hi = _bounds(zero, qmin, qmax)

    def hard(offset):
        return _clamp(torch.floor(w * _inv(scale).to(w.device)) + offset.float(), lo, hi) * scale

    err_nearest = reconstruction_error(hard(nearest), inputs, targets, bias, forward)
    v = torch.nn.Parameter(init_v(w, scale))
    opt = torch.optim.Adam([v], lr=cfg.lr)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    n = inputs.shape[0]
    rows = min(cfg.batch_rows, n)
    step = _SoftRoundStep(w, scale, zero, qmin, qmax)
    for it in range(cfg.iters):
        idx = torch.randint(0, n, (rows,), generator=gen).to(inputs.device)
        x, t = inputs.index_select(0, idx), targets.index_select(0, idx)
        wq = step.forward(v.detach())
        rec = (forward(x, wq, bias) - t).pow(2).sum(-1).mean()
        rec.backward()
        v.grad = step.grad_v(wq.grad, beta_at(it, cfg), cfg.reg_weight)
        opt.step()
        if on_step is not None:
            on_step(it, float(rec.detach()))
    offset = hard_offset(v)
    err_ada = reconstruction_error(hard(offset), inputs, targets, bias, forward)
    if not math.isfinite(err_ada):
        raise ValueError("AdaRound diverged (non-finite reconstruction error); lower the learning rate")
    h = rectified_sigmoid(v.detach())
    info = {
        "rows": int(n),
        "iters": cfg.iters,
        "mse_nearest": err_nearest,
        "mse_adaround": err_ada,
        "flipped_vs_nearest": float((offset != nearest).float().mean()),
        "not_binary": float(((h > 1e-3) & (h < 1 - 1e-3)).float().mean()),
        "kept": "adaround",
        "seconds": time.perf_counter() - t0,
    }
    if keep_better and err_ada > err_nearest:
        # a safeguard (not in the paper): never hand back a rounding worse than nearest on the cached rows
        offset, info["kept"] = nearest, "nearest"
    return offset, info
