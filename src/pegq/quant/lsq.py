"""LSQ gradient scaling for learned quantization ranges (Esser et al. 2019, "Learned Step Size
Quantization", section 2.2), used by :class:`~pegq.quant.Quantizer` in the LEARNING state (QAT).

The straight-through estimator and the LSQ(+) gradients of the scale and zero-point themselves come
from :func:`~pegq.quant.functional.fake_quant` (autograd through ``round_ste``): inside the grid
``d x_hat / d s = round(x / s) - x / s``, outside ``qmin - z`` / ``qmax - z``. LSQ additionally
multiplies the gradient of the step size by

    g = 1 / sqrt(N * Q_p)

where ``N`` is the number of elements sharing that step size and ``Q_p`` the largest grid value
(``2^(b-1) - 1`` symmetric, ``2^b - 1`` asymmetric), so that a scale's gradient -- a *sum* over all the
``N`` elements it quantizes -- has a magnitude comparable to a weight's. The forward value is unchanged.

Why pegq applies it (default on, ``Quantizer.lsq_grad_scale``): with Adam(W) a constant factor on one
parameter's gradient almost cancels in the update ``m / sqrt(v)``, so the factor barely changes the step
of the scale itself; but QAT clips the *global* gradient norm (1.0, as fine-tuning), and without the
factor the range gradients (sums over ~10^5 elements per batch) take a large share of that norm and so
shrink every weight update: on the rotten_tomatoes fine-tune of MiniLM (W8A8) they hold ~49% of the
squared global norm without the factor and ~0% with it (``benchmarks/qat_step.py --grad-norms``).
"""

from __future__ import annotations

import math

import torch


def lsq_grad_factor(elements_per_scale: int, qmax: int) -> float:
    """``1 / sqrt(N * Q_p)`` (``N`` >= 1 elements share one scale; ``Q_p = qmax`` >= 1)."""
    return 1.0 / math.sqrt(max(1, int(elements_per_scale)) * max(1, int(qmax)))


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` unchanged (bit for bit) in the forward pass, its gradient multiplied by ``g`` backwards."""
    if not x.requires_grad or g == 1.0:
        return x
    return _GradScale.apply(x, float(g))


class _LearnableFakeQuant(torch.autograd.Function):
    """:func:`~pegq.quant.functional.fake_quant` with hand-written gradients: the same forward values
    (bit for bit) and the same STE/LSQ gradients as autograd through the composite, in about half the
    element-wise passes and without the composite's autograd graph (which dominated a CPU QAT step).

    ``v = x / s``; inside ``lo <= v <= hi`` (``lo = qmin - z``, ``hi = qmax - z``, ``z`` rounded and
    clipped to the grid): ``dx = g``, ``ds = g * (round(v) - v)``; outside: ``dx = 0``,
    ``ds = g * bound``, ``dz = -g * s``. ``dz`` passes only while ``qmin <= z <= qmax`` (the clip).
    """

    @staticmethod
    def forward(ctx, x, scale, zero, qmin: int, qmax: int):
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        v = xf * torch.reciprocal(scale)
        if zero is None:
            q = v.clamp(qmin, qmax)
            inside = (v >= qmin) & (v <= qmax)
            zr = None
        else:
            zr = zero.round().clamp(qmin, qmax)
            lo, hi = qmin - zr, qmax - zr
            q = torch.minimum(torch.maximum(v, lo), hi)
            inside = (v >= lo) & (v <= hi)
        q.round_()
        out = q * scale
        # d out / d s per element: round(v) - v inside, the bound (= q) outside
        dsl = q.sub_(v.mul_(inside))
        zmask = None if zero is None else ((zero >= qmin) & (zero <= qmax))
        ctx.save_for_backward(inside, dsl, scale, zmask)
        ctx.has_zero = zero is not None
        ctx.zero_shape = None if zero is None else zero.shape
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        inside, dsl, scale, zmask = ctx.saved_tensors
        g = grad if grad.dtype == dsl.dtype else grad.to(dsl.dtype)
        per_tensor = scale.numel() == 1
        gx = g * inside if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            if per_tensor:  # one fused multiply-add pass instead of a product tensor and a sum
                gs = torch.dot(g.reshape(-1), dsl.reshape(-1)).reshape(scale.shape)
            else:
                gs = (g * dsl).sum_to_size(scale.shape)
        gz = None
        if ctx.has_zero and ctx.needs_input_grad[2]:
            g_in = gx if gx is not None else g * inside
            # outside elements: d out / d z = -s
            if per_tensor and math.prod(ctx.zero_shape) == 1:
                gz = ((g.sum() - g_in.sum()) * -scale).reshape(ctx.zero_shape) * zmask
            else:
                gz = ((g - g_in) * -scale).sum_to_size(ctx.zero_shape) * zmask
        if gx is not None and gx.dtype != grad.dtype:
            gx = gx.to(grad.dtype)
        return gx, gs, gz, None, None


def fake_quant_learnable(x, scale, zero, qmin: int, qmax: int) -> torch.Tensor:
    """:func:`~pegq.quant.functional.fake_quant` for learned ranges (QAT), with fused gradients;
    ``scale``/``zero`` broadcast against ``x`` (``zero=None``: symmetric)."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if zero is not None:
        zero = torch.as_tensor(zero, dtype=torch.float32, device=x.device)
    return _LearnableFakeQuant.apply(x, scale, zero, qmin, qmax)
