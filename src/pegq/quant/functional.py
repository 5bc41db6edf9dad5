"""Uniform affine quantization, paper eq. (1)-(2), as plain functions.

* asymmetric: unsigned grid ``[0, 2^b - 1]``, integer zero-point ``z`` chosen so that 0.0 is exactly
  representable (padding, ReLU/GELU zeros and masked positions survive quantization);
* symmetric: ``z = 0`` and the signed grid ``[-2^(b-1), 2^(b-1) - 1]``; the scale maps the largest
  magnitude to ``2^(b-1) - 1``.

Rounding is round-to-nearest (ties to even, as ``torch.round``); gradients use the straight-through
estimator: 1 inside the clipping range, 0 outside.
"""

from __future__ import annotations

import torch

MIN_BITS, MAX_BITS = 2, 16
# Smallest scale we ever produce: a constant (or all-zero) tensor still gets a valid grid.
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

    The range is first widened to include 0 so that 0 lies exactly on the grid.
    """
    qmin, qmax = grid(bits, symmetric)
    x_min = torch.minimum(x_min, torch.zeros_like(x_min))
    x_max = torch.maximum(x_max, torch.zeros_like(x_max))
    if symmetric:
        absmax = torch.maximum(x_min.abs(), x_max)
        scale = (absmax / qmax).clamp_min(EPS_SCALE)
        zero = torch.zeros_like(scale)
    else:
        scale = ((x_max - x_min) / (qmax - qmin)).clamp_min(EPS_SCALE)
        zero = (qmin - x_min / scale).round().clamp(qmin, qmax)
    return scale, zero


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest with identity gradient."""
    return (x.round() - x).detach() + x


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with broadcastable ``scale``/``zero`` (eq. 1-2).

    Differentiable w.r.t. ``x`` (STE: 1 inside the range, 0 outside) and w.r.t. ``scale`` and
    ``zero`` (LSQ-style: the zero-point is rounded with STE too).
    """
    z = round_ste(zero)
    x_int = torch.clamp(round_ste(x / scale) + z, qmin, qmax)
    return (x_int - z) * scale


def quantize_to_int(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Eq. (1): the integer tensor (as int64) on the grid ``[qmin, qmax]``."""
    return torch.clamp(torch.round(x / scale) + zero.round(), qmin, qmax).to(torch.int64)


def dequantize(x_int: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Eq. (2)."""
    return (x_int.to(scale.dtype) - zero.round()) * scale
