"""Uniform affine quantization, paper eq. (1)-(2), as plain functions.

Paper section 2, eq. (1)-(2) (with round-to-nearest, as in Jacob et al. 2018)::

    x_int = clip(round(x / s) + z; qmin, qmax)          (1)
    x_hat = s * (x_int - z)                               (2)

* asymmetric: unsigned grid ``[0, 2^b - 1]``, integer zero-point ``z`` chosen so that 0.0 is exactly
  representable (padding, ReLU/GELU zeros and masked positions survive quantization);
* symmetric: ``z = 0`` and the signed grid ``[-2^(b-1), 2^(b-1) - 1]``; the scale maps the largest
  magnitude to ``2^(b-1) - 1``.

Numerics (shared by every path, so that all of them agree bit for bit):

* ``x / s`` is computed as ``x * (1 / s)`` with the reciprocal taken in float32, exactly like
  PyTorch's ``fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine`` kernels (our
  outputs are identical to theirs; we do not call them because on CPU they are ~20x slower than the
  composite below);
* since ``z`` is an integer, ``clip(round(v) + z; qmin, qmax) - z == round(clip(v; qmin - z, qmax - z))``,
  which is what we evaluate: multiply, clamp, round, multiply -- four element-wise passes, done in
  place when no gradient is needed;
* rounding is round-half-to-even (``torch.round``); computation happens in (at least) float32, so
  fp16/bf16 inputs are quantized on the float32 grid and cast back.

Gradients (used in QAT, paper section 2 "quantization-aware training"): the straight-through
estimator (Bengio et al. 2013) for rounding, i.e. ``d x_hat / d x = 1`` inside the clipping range and
``0`` outside; the scale and zero-point receive LSQ-style gradients (Esser et al. 2019), the
zero-point being rounded with the STE as well.
"""

from __future__ import annotations

import torch

MIN_BITS, MAX_BITS = 2, 16
# Smallest scale we ever produce: a constant (or all-zero) tensor still gets a valid, finite grid.
EPS_SCALE = 1e-8


def grid(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid ``(qmin, qmax)`` for a bit-width."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def qparams_from_range(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero-point (float tensor holding integers) for a range ``[x_min, x_max]``.

    The range is first widened to include 0 so that 0 lies exactly on the grid. The scale is always
    finite and at least :data:`EPS_SCALE` (constant and all-zero tensors included); the zero-point
    always lies in ``[qmin, qmax]``.
    """
    qmin, qmax = grid(bits, symmetric)
    x_min = torch.as_tensor(x_min, dtype=torch.float32)
    x_max = torch.as_tensor(x_max, dtype=torch.float32, device=x_min.device)
    x_min = torch.clamp(x_min, max=0.0)
    x_max = torch.clamp(x_max, min=0.0)
    if symmetric:
        absmax = torch.maximum(-x_min, x_max)
        scale = (absmax / qmax).clamp_min(EPS_SCALE)
        zero = torch.zeros_like(scale)
    else:
        scale = ((x_max - x_min) / (qmax - qmin)).clamp_min(EPS_SCALE)
        zero = (qmin - x_min / scale).round().clamp(qmin, qmax)
    return scale, zero


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest with identity gradient (the value is exactly ``torch.round(x)``)."""
    return (x.round() - x).detach() + x


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with broadcastable ``scale``/``zero`` (eq. 1-2); ``zero=None`` is 0.

    Differentiable w.r.t. ``x`` (STE: 1 inside the range, 0 outside) and w.r.t. ``scale`` and
    ``zero`` (LSQ-style: the zero-point is rounded with STE too). When no gradient is needed the
    computation runs in place on one output buffer (same result, bit for bit).
    """
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if zero is not None:
        zero = torch.as_tensor(zero, dtype=torch.float32, device=x.device)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or scale.requires_grad or (zero is not None and zero.requires_grad)
    )
    if not needs_grad:
        return fake_quant_nograd(x, scale, zero, qmin, qmax)
    v = x.to(_compute_dtype(x)) * torch.reciprocal(scale)
    if zero is None:
        v = torch.clamp(v, qmin, qmax)
    else:
        z = round_ste(zero).clamp(qmin, qmax)
        v = torch.clamp(v, qmin - z, qmax - z)
    return (round_ste(v) * scale).to(x.dtype)


@torch.no_grad()
def fake_quant_nograd(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    qmin: int,
    qmax: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`fake_quant` without autograd: four in-place passes over one buffer.

    ``zero=None`` means ``z = 0`` (symmetric); ``out`` (float32/64, shaped like ``x``) is reused when
    given. The zero-point is rounded and clamped to the grid exactly as in :func:`fake_quant`.
    """
    # PyTorch's fused torch.fake_quantize_per_{tensor,channel}_affine give the same values (tested) but,
    # measured on the 2-core CPU, run 5-10x slower than these four vectorised in-place passes
    # ([8, 12, 128, 128] scores: 7.9 ms against 1.1 ms)
    dtype = _compute_dtype(x)
    inv = torch.reciprocal(scale)
    xc = x if x.dtype == dtype else x.to(dtype)
    if inv.ndim == 0 and xc.ndim > 0:
        # same values; an out-of-place multiply by a 0-d tensor takes a ~8x slower kernel path on CPU
        # (measured on [8, 12, 128, 128]: 0.93 ms against 0.12 ms with a 1-element tensor)
        inv = inv.reshape(1)
    out = torch.mul(xc, inv) if out is None else torch.mul(xc, inv, out=out)
    if zero is None:
        out.clamp_(qmin, qmax)
    elif zero.numel() == 1 and zero.device.type == "cpu":
        z = float(zero.round().clamp(qmin, qmax))
        out.clamp_(qmin - z, qmax - z)
    else:
        # maximum/minimum: same result as clamp_ with tensor bounds, but ~10x faster on CPU
        z = zero.round().clamp(qmin, qmax)
        torch.maximum(out, qmin - z, out=out)
        torch.minimum(out, qmax - z, out=out)
    out.round_()
    out.mul_(scale)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def quantize_to_int(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Eq. (1): the integer tensor (as int64) on the grid ``[qmin, qmax]``.

    ``dequantize(quantize_to_int(x, ...), ...)`` equals ``fake_quant(x, ...)`` bit for bit.
    """
    with torch.no_grad():
        z = torch.as_tensor(zero, dtype=torch.float32, device=x.device).round().clamp(qmin, qmax)
        inv = torch.reciprocal(torch.as_tensor(scale, dtype=torch.float32, device=x.device))
        v = torch.mul(x.to(_compute_dtype(x)), inv)
        return torch.clamp(v.round_() + z, qmin, qmax).to(torch.int64)


def dequantize(x_int: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Eq. (2): ``s * (x_int - z)`` (float32)."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x_int.device)
    z = torch.as_tensor(zero, dtype=torch.float32, device=x_int.device).round()
    return (x_int.to(torch.float32) - z) * scale
