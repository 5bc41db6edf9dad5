"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1): round a Linear weight column by column on a *fixed* grid and spread each
column's rounding error over the columns not yet rounded, weighted by the inverse Hessian of the layer's
reconstruction loss ``||W X - Q X||^2`` (``H = X^T X`` over the calibration rows). Not in the paper
(Bondarenko et al. 2021); pegq offers it next to AdaRound as a weight-rounding method for 8-bit and low-bit
weights.

The grid is the weight quantizer's calibrated one and is not changed: only the integer chosen for each
weight changes, so the result is a rounding offset (``Quantizer.round_offset``, as for AdaRound) and every
export (ONNX, packed) carries it unchanged. The scale (and zero-point) must be the same along a row's
inputs: per-tensor or per-output-channel, which is what every Linear weight quantizer in pegq uses.

Algorithm as in the GPTQ reference code: dampening ``damp * mean(diag H)`` on the diagonal, optional
"act-order" (columns with the largest ``diag H`` first), lazy block updates of ``block_size`` columns,
the upper Cholesky factor of ``H^-1``. Inputs that were always zero (``diag H == 0``) get ``H_ii = 1`` so
their weights are plainly rounded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .adaround import _bounds, _clamp, _inv


@dataclass
class GPTQConfig:
    block_size: int = 128  # columns per lazy batch update (speed only: the result does not depend on it)
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    act_order: bool = True  # round the inputs with the largest diag(H) first
    # with a symmetric grid: |q[:, 2j] + q[:, 2j+1]| <= pair_limit for every pair of adjacent inputs (see
    # pair_limited_nearest); None: no constraint
    pair_limit: int | None = None

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"GPTQ block_size must be >= 1, got {self.block_size}")
        if self.pair_limit is not None and (isinstance(self.pair_limit, bool) or not isinstance(self.pair_limit, int)
                                            or self.pair_limit < 1):
            raise ValueError(f"GPTQ pair_limit must be a positive integer or None, got {self.pair_limit!r}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"GPTQ damp must be in [0, 1), got {self.damp}")

    def to_dict(self) -> dict:
        return asdict(self)


class Hessian:
    """Running ``X^T diag(r) X / sum(r)`` (float64) over calibration rows ``[n, in]`` of one layer's input,
    with optional non-negative row weights ``r`` (default 1: ``X^T X / n``); with ``right`` rows ``Y`` paired
    with ``X``'s, the cross moment ``X^T diag(r) Y / sum(r)`` instead."""

    def __init__(self, columns: int):
        self.h = torch.zeros(columns, columns, dtype=torch.float64)
        self.rows = 0
        self.weight = 0.0

    def add(self, x: torch.Tensor, row_weights: torch.Tensor | None = None, right: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(device="cpu", dtype=torch.float64)
        if x.shape[1] != self.h.shape[0]:
            raise ValueError(f"GPTQ Hessian has {self.h.shape[0]} columns but got rows of {x.shape[1]}")
        y = x if right is None else right.detach().reshape(-1, right.shape[-1]).to(device="cpu", dtype=torch.float64)
        if y.shape != x.shape:
            raise ValueError(f"GPTQ cross moment needs paired rows of one shape; got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        n = x.shape[0]
        if n == 0:
            return
        if row_weights is None:
            xr, w = x, float(n)
        else:
            r = row_weights.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
            if r.numel() != n or bool((r < 0).any()):
                raise ValueError(f"GPTQ row weights must be {n} non-negative numbers, one per row")
            xr, w = x * r[:, None], float(r.sum())
        total = self.weight + w
        if total == 0:
            return
        self.h.mul_(self.weight / total).add_(xr.T @ y, alpha=1.0 / total)
        self.weight = total
        self.rows += n


def _row_vector(t: torch.Tensor | None, weight: torch.Tensor, what: str) -> torch.Tensor | None:
    """A per-tensor or per-output-row quantization parameter as a ``[out, 1]`` column; anything that varies
    along a row's inputs cannot be used by GPTQ's column-by-column rounding."""
    if t is None:
        return None
    full = torch.as_tensor(t, dtype=torch.float32, device=weight.device).expand(weight.shape)
    col = full[:, :1]
    if not torch.equal(full, col.expand_as(full)):
        raise ValueError(f"GPTQ needs a weight {what} that is the same for all inputs of a row (per-tensor or "
                         f"per-output-channel); this one varies along the input dimension")
    return col.contiguous()


def pair_limited_nearest(v: torch.Tensor, qmin: int, qmax: int, limit: int) -> torch.Tensor:
    """Round-to-nearest codes of ``v`` (weights over their scale, ``[out, in]``) on ``[qmin, qmax]`` such that
    every pair of adjacent inputs ``(2j, 2j+1)`` has ``|q[:, 2j] + q[:, 2j+1]| <= limit``.

    Why: x86 CPUs without VNNI multiply uint8 activations by int8 weights with ``vpmaddubsw``, which adds the
    products of inputs ``2j`` and ``2j+1`` in a saturating int16 (ONNX Runtime's MLAS kernels pair inputs this
    way). ``|a0 b0 + a1 b1| <= 255 |b0 + b1|`` when the signs agree and ``<= 255 * 128`` when they differ, so
    ``limit = 128`` makes every pair sum fit in int16 (``255 * 128 = 32640``) for any uint8 activations: the
    int8 kernels then compute exactly what the simulation does.

    A pair over the limit is projected onto ``q0 + q1 = +-limit`` at the least squared distance to
    ``(v0, v1)``, then clipped to the grid."""
    q = torch.clamp(torch.round(v), qmin, qmax)
    n = v.shape[-1] - v.shape[-1] % 2
    if n == 0:
        return q
    q0, q1, v0, v1 = q[..., 0:n:2], q[..., 1:n:2], v[..., 0:n:2], v[..., 1:n:2]
    total = q0 + q1
    bad = total.abs() > limit
    if bool(bad.any()):
        target = torch.sign(total) * limit
        # q0 on the grid with q1 = target - q0 on it too (non-empty for limit <= qmax - qmin)
        p0 = torch.round((target + v0 - v1) / 2)
        lo, hi = torch.clamp(target - qmax, min=qmin), torch.clamp(target - qmin, max=qmax)
        p0 = torch.minimum(torch.maximum(p0, lo), hi)
        p1 = target - p0
        q[..., 0:n:2] = torch.where(bad, p0, q0)
        q[..., 1:n:2] = torch.where(bad, p1, q1)
    return q


# |q[2j] + q[2j+1]| <= PAIR_LIMIT keeps x86 uint8 x int8 int16 pair sums exact (see pair_limited_nearest)
PAIR_LIMIT = 128


def pair_overflows(codes: torch.Tensor, limit: int = PAIR_LIMIT) -> int:
    """How many pairs of adjacent inputs ``(2j, 2j+1)`` along the last axis of integer weight ``codes``
    (a Linear's ``[out, in]``) have ``|q0 + q1| > limit``: with ``limit = 128``, the pairs whose int16 sum
    can saturate in x86 uint8 x int8 kernels without VNNI (see :func:`pair_limited_nearest`)."""
    c = torch.as_tensor(codes).to(torch.int32)
    n = c.shape[-1] - c.shape[-1] % 2
    return int(((c[..., 0:n:2] + c[..., 1:n:2]).abs() > limit).sum())


def proxy_loss(weight: torch.Tensor, wq: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T) / out``: the layer's mean squared output error per row of ``X``."""
    d = (weight.double() - wq.double()).to(hessian.device)
    return float(((d @ hessian) * d).sum() / weight.shape[0])


def gptq_offset(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    qmin: int,
    qmax: int,
    hessian: torch.Tensor,
    config: GPTQConfig | None = None,
    base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """GPTQ rounding of ``weight`` ``[out, in]`` on the grid ``(scale, zero, qmin, qmax)`` (``zero`` None:
    symmetric) for the input second moment ``hessian`` ``[in, in]`` (e.g. :class:`Hessian`).

    ``base`` (default ``weight``): the weight the quantizer holds, when GPTQ is to round another target onto
    its grid (the asymmetric least-squares target of :mod:`pegq.gptq_model`).

    Returns ``offset`` (int16 integers shaped like ``weight``, for
    :func:`~pegq.quant.adaround.fake_quant_fixed_rounding`: code = ``floor(base/s) + offset``) and an info
    dict with the proxy loss (:func:`proxy_loss`, to ``weight``) of round-to-nearest of ``base`` and of
    GPTQ."""
    cfg = config or GPTQConfig()
    if weight.ndim != 2:
        raise ValueError(f"GPTQ rounds 2-D Linear weights [out, in]; got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if base is not None and tuple(base.shape) != tuple(weight.shape):
        raise ValueError(f"GPTQ base weight must be shaped like the weight {tuple(weight.shape)}; got "
                         f"{tuple(base.shape)}")
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"GPTQ Hessian must be [{cols}, {cols}] for a weight with {cols} inputs; got "
                         f"{tuple(hessian.shape)}")
    t0 = time.perf_counter()
    w0 = weight.detach().float()
    s = _row_vector(scale, w0, "scale")
    inv_s = _inv(s).to(w0.device)
    lo, hi = _bounds(_row_vector(zero, w0, "zero-point"), qmin, qmax)
    limit = cfg.pair_limit
    if limit is not None and (zero is not None or limit > qmax - qmin):
        raise ValueError(f"GPTQ pair_limit needs a symmetric weight grid (no zero-point) and a limit <= "
                         f"{qmax - qmin}; got limit {limit} on [{qmin}, {qmax}] with "
                         f"{'a' if zero is not None else 'no'} zero-point")

    def codes(v: torch.Tensor) -> torch.Tensor:
        return _clamp(torch.round(v * inv_s), lo, hi)

    h = hessian.detach().to(device="cpu", dtype=torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(h), descending=True) if cfg.act_order else torch.arange(cols)
    h = h[perm][:, perm]
    h.diagonal().add_(cfg.damp * float(torch.diagonal(h).mean()))
    # H^-1 by cholesky_solve: on a 2-core AVX2 CPU torch's cholesky_inverse took 1.9-11 s at 768-1536 columns,
    # cholesky_solve 0.07-0.34 s (equal to 1e-14)
    eye = torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_solve(eye, torch.linalg.cholesky(h)), upper=True)
    hinv = hinv.to(device=w0.device, dtype=torch.float32)

    w = w0[:, perm].clone()
    out = torch.zeros_like(w)
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(cols)  # where each input column is rounded
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]
            q = codes(col)
            # the input this one shares an int16 pair sum with (an odd last input has none)
            partner = int(perm[i1 + i]) ^ 1 if limit is not None else cols
            if partner < cols - cols % 2:
                j = int(pos[partner])
                if j < i1 + i:  # the partner is rounded: keep within what it left
                    done = out[:, j : j + 1]
                    q = torch.minimum(torch.maximum(q, -limit - done), limit - done)
                else:  # not yet: take this input's share of the pair's least-squares split (the partner's
                    # value as updated so far; a partner in a later block lacks this block's updates)
                    other = w1[:, j - i1 : j - i1 + 1] if j < i2 else w[:, j : j + 1]
                    q = pair_limited_nearest(torch.cat([col, other], 1) * inv_s, qmin, qmax, limit)[:, :1]
            out[:, i1 + i : i1 + i + 1] = q
            e = (col - q * s) / h1[i, i]
            w1[:, i:] -= e @ h1[i : i + 1, i:]
            err1[:, i : i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    code = torch.empty_like(out)
    code[:, perm] = out
    b0 = w0 if base is None else base.detach().float()
    offset = code - torch.floor(b0 * inv_s)
    if offset.abs().max() > torch.iinfo(torch.int16).max:
        raise ValueError("GPTQ: a weight lies more than 32767 grid steps outside the grid; its range is broken")
    offset = offset.to(torch.int16)  # AdaRound's offsets are 0/1 (uint8); GPTQ's can be negative or > 1
    nearest = codes(b0) if limit is None else pair_limited_nearest(b0 * inv_s, qmin, qmax, limit)
    hd = hessian.detach().double()
    info = {
        "proxy_nearest": proxy_loss(w0, nearest * s, hd),
        "proxy_gptq": proxy_loss(w0, code * s, hd),
        "changed_vs_nearest": float((code != nearest).float().mean()),
        "max_steps_from_nearest": int((code - nearest).abs().max()),
        "seconds": time.perf_counter() - t0,
    }
    return offset, info
