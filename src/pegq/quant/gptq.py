"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1): round a Linear weight column by column on a *fixed* grid and spread each
column's rounding error over the columns not yet rounded, weighted by the inverse Hessian of the layer's
reconstruction loss ``||W X - Q X||^2`` (``H = X^T X`` over the calibration rows). Not in the paper
(Bondarenko et al. 2021); pegq offers it next to AdaRound as a weight-rounding method for 8-bit and low-bit
weights.

:func:`gptq_offset` rounds on the weight quantizer's calibrated grid and does not change it: only the integer
chosen for each weight changes, so the result is a rounding offset (``Quantizer.round_offset``, as for
AdaRound) and every export (ONNX, packed) carries it unchanged. :func:`gptq_search` also picks a multiplier of
each row's scale (the caller rescales the quantizer). The scale (and zero-point) must be the same along a row's
inputs: per-tensor or per-output-channel, which is what every Linear weight quantizer in pegq uses.

Not in GPTQ either: ``GPTQConfig.pair_limit`` keeps ``|q[2j] + q[2j+1]|`` within a limit for every pair of
adjacent inputs (x86 int16 pair sums, see :func:`pair_limited_nearest`); each pair's two inputs are then
rounded one after the other, jointly (:func:`_pair_round`), and the scale search is on by default.

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
    # multipliers of the weight grid's scale to round on (see gptq_search): each output row (with a
    # per-output-channel scale; the whole weight with a per-tensor one) keeps the one of least proxy loss;
    # None: PAIR_SCALES with a pair_limit, no search without
    scales: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"GPTQ block_size must be >= 1, got {self.block_size}")
        if self.pair_limit is not None and (isinstance(self.pair_limit, bool) or not isinstance(self.pair_limit, int)
                                            or self.pair_limit < 1):
            raise ValueError(f"GPTQ pair_limit must be a positive integer or None, got {self.pair_limit!r}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"GPTQ damp must be in [0, 1), got {self.damp}")
        if self.scales is not None:
            self.scales = tuple(float(m) for m in self.scales)
            if not self.scales or not all(0 < m < float("inf") for m in self.scales):
                raise ValueError(f"GPTQ scales must be positive finite multipliers, at least one; got "
                                 f"{list(self.scales)}")

    def scale_grid(self) -> tuple[float, ...]:
        """The scale multipliers GPTQ rounds on (see :func:`gptq_search`)."""
        if self.scales is not None:
            return self.scales
        return PAIR_SCALES if self.pair_limit is not None else (1.0,)

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

# the scale multipliers a pair-limited GPTQ searches by default (GPTQConfig.scales None; gptq_search). On real
# MiniLM sq-token-probs-gemm layers the rows' best ones spread over all of 1.0-2.0: a pair limit binds less on
# a coarser grid, and the rows whose pairs are heavy gain more from that than they lose to the coarser grid
PAIR_SCALES = (1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4, 1.45, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0)


def nearest_codes(v: torch.Tensor, lo, hi, limit: int | None = None) -> torch.Tensor:
    """Round-to-nearest codes of ``v`` (weights over their scale) on ``[lo, hi]``; with ``limit``, pair-limited
    (:func:`pair_limited_nearest`, a symmetric grid: ``lo``, ``hi`` plain integers)."""
    return _clamp(torch.round(v), lo, hi) if limit is None else pair_limited_nearest(v, lo, hi, limit)


def pair_overflows(codes: torch.Tensor, limit: int = PAIR_LIMIT) -> int:
    """How many pairs of adjacent inputs ``(2j, 2j+1)`` along the last axis of integer weight ``codes``
    (a Linear's ``[out, in]``) have ``|q0 + q1| > limit``: with ``limit = 128``, the pairs whose int16 sum
    can saturate in x86 uint8 x int8 kernels without VNNI (see :func:`pair_limited_nearest`)."""
    c = torch.as_tensor(codes).to(torch.int32)
    n = c.shape[-1] - c.shape[-1] % 2
    return int(((c[..., 0:n:2] + c[..., 1:n:2]).abs() > limit).sum())


def _row_losses(weight: torch.Tensor, wq: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Each output row's ``(w - q) H (w - q)^T``, float64."""
    d = (weight.double() - wq.double()).to(hessian.device)
    return ((d @ hessian) * d).sum(1)


def proxy_loss(weight: torch.Tensor, wq: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T) / out``: the layer's mean squared output error per row of ``X``."""
    return float(_row_losses(weight, wq, hessian).sum() / weight.shape[0])


def _order(diag: torch.Tensor, act_order: bool, pairs: bool) -> torch.Tensor:
    """The order GPTQ rounds the inputs in: act-order (largest ``diag H`` first) or as they come; with
    ``pairs``, the inputs ``(2j, 2j+1)`` of each int16 pair next to each other at an even position (pairs by
    their larger ``diag H``, that input first), an odd last input last."""
    cols = diag.numel()
    if not pairs:
        return torch.argsort(diag, descending=True) if act_order else torch.arange(cols)
    n = cols // 2
    first = torch.arange(0, 2 * n, 2)
    if act_order:
        first = torch.where(diag[0 : 2 * n : 2] >= diag[1 : 2 * n : 2], first, first + 1)
        first = first[torch.argsort(diag[first], descending=True)]
    order = torch.stack([first, first ^ 1], 1).reshape(-1)
    return torch.cat([order, torch.arange(2 * n, cols)])


def _pair_round(x0: torch.Tensor, x1: torch.Tensor, u00, u01, u11, lo: int, hi: int, limit: int):
    """Codes ``(q0, q1)`` (``[out, 1]`` each) of two inputs GPTQ rounds one after the other, ``x0`` and ``x1``
    their values over the scale, ``u`` the upper Cholesky factor of ``H^-1`` at the two: rounding ``x0`` to
    ``q0`` moves ``x1`` to ``x1' = x1 - (x0 - q0) u01 / u00``, and the pair costs ``((x0 - q0) / u00)^2 + ((x1'
    - q1) / u11)^2`` (GPTQ's loss of the two, the rest compensated). Where plain GPTQ (nearest, then nearest)
    keeps ``|q0 + q1| <= limit`` that is the answer; elsewhere the pair of least cost within the limit: every
    ``q0`` on the grid, each with its best ``q1`` (the feasible integer nearest ``x1'``)."""
    c = u01 / u00
    a, b = 1.0 / (u00 * u00), 1.0 / (u11 * u11)

    def best_q1(q0, x0, x1):
        x1p = x1 - (x0 - q0) * c
        q1 = torch.minimum(torch.maximum(torch.round(x1p), torch.clamp(-limit - q0, min=lo)),
                           torch.clamp(limit - q0, max=hi))
        return q1, a * (x0 - q0) ** 2 + b * (x1p - q1) ** 2, x1p

    q0 = torch.clamp(torch.round(x0), lo, hi)
    q1, _, x1p = best_q1(q0, x0, x1)
    bad = (q1 != torch.clamp(torch.round(x1p), lo, hi)).nonzero()[:, 0]
    if bad.numel():  # plain GPTQ would cross the limit: search every q0
        grid = torch.arange(lo, hi + 1, dtype=x0.dtype, device=x0.device)[None, :]
        q1s, costs, _ = best_q1(grid, x0[bad], x1[bad])
        pick = costs.argmin(1, keepdim=True)
        q0, q1 = q0.clone(), q1.clone()
        q0[bad] = grid.expand_as(q1s).gather(1, pick)
        q1[bad] = q1s.gather(1, pick)
    return q0, q1


def _check(weight: torch.Tensor, base: torch.Tensor | None, hessian: torch.Tensor) -> None:
    if weight.ndim != 2:
        raise ValueError(f"GPTQ rounds 2-D Linear weights [out, in]; got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if base is not None and tuple(base.shape) != tuple(weight.shape):
        raise ValueError(f"GPTQ base weight must be shaped like the weight {tuple(weight.shape)}; got "
                         f"{tuple(base.shape)}")
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"GPTQ Hessian must be [{cols}, {cols}] for a weight with {cols} inputs; got "
                         f"{tuple(hessian.shape)}")


def _check_limit(limit: int | None, zero, qmin: int, qmax: int) -> None:
    if limit is not None and (zero is not None or limit > qmax - qmin):
        raise ValueError(f"GPTQ pair_limit needs a symmetric weight grid (no zero-point) and a limit <= "
                         f"{qmax - qmin}; got limit {limit} on [{qmin}, {qmax}] with "
                         f"{'a' if zero is not None else 'no'} zero-point")


def _gptq_codes(w0: torch.Tensor, s: torch.Tensor, lo, hi, hessian: torch.Tensor, cfg: GPTQConfig) -> torch.Tensor:
    """The GPTQ loop: integer codes (float) of ``w0`` ``[out, in]`` on the grid ``s`` (``[out, 1]`` or scalar)
    with bounds ``lo, hi``; with ``cfg.pair_limit``, the int16 pairs rounded jointly (:func:`_pair_round`)."""
    cols = w0.shape[1]
    limit = cfg.pair_limit
    inv_s = _inv(s).to(w0.device)
    h = hessian.detach().to(device="cpu", dtype=torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    perm = _order(torch.diagonal(h), cfg.act_order, limit is not None)
    h = h[perm][:, perm]
    h.diagonal().add_(cfg.damp * float(torch.diagonal(h).mean()))
    # H^-1 by cholesky_solve: on a 2-core AVX2 CPU torch's cholesky_inverse took 1.9-11 s at 768-1536 columns,
    # cholesky_solve 0.07-0.34 s (equal to 1e-14)
    eye = torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_solve(eye, torch.linalg.cholesky(h)), upper=True)
    hinv = hinv.to(device=w0.device, dtype=torch.float32)

    w = w0[:, perm].clone()
    out = torch.zeros_like(w)
    paired = cols - cols % 2 if limit is not None else 0  # positions [0, paired) hold the pairs, adjacent
    block = cfg.block_size + cfg.block_size % 2 if limit is not None else cfg.block_size  # no pair split
    second = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]
            if i1 + i >= paired:
                q = _clamp(torch.round(col * inv_s), lo, hi)
            elif (i1 + i) % 2 == 0:  # the first of a pair: round both inputs jointly
                q, second = _pair_round(col * inv_s, w1[:, i + 1 : i + 2] * inv_s, h1[i, i], h1[i, i + 1],
                                        h1[i + 1, i + 1], lo, hi, limit)
            else:
                q = second
            out[:, i1 + i : i1 + i + 1] = q
            e = (col - q * s) / h1[i, i]
            w1[:, i:] -= e @ h1[i : i + 1, i:]
            err1[:, i : i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    code = torch.empty_like(out)
    code[:, perm] = out
    return code


def _offset(code: torch.Tensor, base: torch.Tensor, inv_s: torch.Tensor) -> torch.Tensor:
    offset = code - torch.floor(base * inv_s)
    if offset.abs().max() > torch.iinfo(torch.int16).max:
        raise ValueError("GPTQ: a weight lies more than 32767 grid steps outside the grid; its range is broken")
    return offset.to(torch.int16)  # AdaRound's offsets are 0/1 (uint8); GPTQ's can be negative or > 1


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
    symmetric) for the input second moment ``hessian`` ``[in, in]`` (e.g. :class:`Hessian`). One grid:
    ``config.scales`` is :func:`gptq_search`'s.

    ``base`` (default ``weight``): the weight the quantizer holds, when GPTQ is to round another target onto
    its grid (the asymmetric least-squares target of :mod:`pegq.gptq_model`).

    Returns ``offset`` (int16 integers shaped like ``weight``, for
    :func:`~pegq.quant.adaround.fake_quant_fixed_rounding`: code = ``floor(base/s) + offset``) and an info
    dict with the proxy loss (:func:`proxy_loss`, to ``weight``) of round-to-nearest of ``base`` and of
    GPTQ."""
    cfg = config or GPTQConfig()
    _check(weight, base, hessian)
    t0 = time.perf_counter()
    w0 = weight.detach().float()
    s = _row_vector(scale, w0, "scale")
    inv_s = _inv(s).to(w0.device)
    lo, hi = _bounds(_row_vector(zero, w0, "zero-point"), qmin, qmax)
    limit = cfg.pair_limit
    _check_limit(limit, zero, qmin, qmax)
    code = _gptq_codes(w0, s, lo, hi, hessian, cfg)
    b0 = w0 if base is None else base.detach().float()
    offset = _offset(code, b0, inv_s)
    nearest = nearest_codes(b0 * inv_s, lo, hi, limit)
    hd = hessian.detach().double()
    info = {
        "proxy_nearest": proxy_loss(w0, nearest * s, hd),
        "proxy_gptq": proxy_loss(w0, code * s, hd),
        "changed_vs_nearest": float((code != nearest).float().mean()),
        "max_steps_from_nearest": int((code - nearest).abs().max()),
        "seconds": time.perf_counter() - t0,
    }
    return offset, info


def gptq_search(
    weight: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    hessian: torch.Tensor,
    config: GPTQConfig | None = None,
    base: torch.Tensor | None = None,
    per_row: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """GPTQ of ``weight`` ``[out, in]`` on the symmetric grids ``scale * m`` for every multiplier ``m`` of
    ``config.scale_grid()``, keeping for each output row (``per_row``; else for the whole weight: a per-tensor
    scale) the grid and rounding (GPTQ's or, where that is worse, (pair-limited) nearest's) of least proxy loss.

    Why: the weight grid is calibrated for round-to-nearest without constraints. With a pair limit
    (``config.pair_limit``) a row whose adjacent inputs are both heavy loses much to the limit on its own grid,
    and less on a coarser one where fewer pairs reach it. GPTQ's rows are independent for a shared ``H``, so
    all multipliers run as one GPTQ over the stacked rows and each row's choice is exact.

    Returns ``(code, multiplier, info)``: integer codes (float) on the grid ``scale * multiplier``,
    ``multiplier`` ``[out, 1]``, and :func:`gptq_offset`'s info plus ``scale_multiplier_mean``,
    ``rows_rescaled`` (share of rows with a multiplier other than 1) and ``rows_nearest`` (share of rows kept
    at nearest)."""
    cfg = config or GPTQConfig()
    _check(weight, base, hessian)
    _check_limit(cfg.pair_limit, None, qmin, qmax)
    t0 = time.perf_counter()
    w0 = weight.detach().float()
    b0 = w0 if base is None else base.detach().float()
    s = _row_vector(scale, w0, "scale").expand(w0.shape[0], 1)
    grid = cfg.scale_grid()
    k, rows = len(grid), w0.shape[0]
    mult = torch.tensor(grid, dtype=torch.float32, device=w0.device).repeat_interleave(rows)[:, None]
    sk = s.repeat(k, 1) * mult  # [k * out, 1]: row r on grid m lies at m_index * out + r
    wk, bk = w0.repeat(k, 1), b0.repeat(k, 1)
    inv = _inv(sk)
    code = _gptq_codes(wk, sk, qmin, qmax, hessian, cfg)
    near = nearest_codes(bk * inv, qmin, qmax, cfg.pair_limit)
    hd = hessian.detach().double()
    lg, ln = _row_losses(wk, code * sk, hd).view(k, rows), _row_losses(wk, near * sk, hd).view(k, rows)
    use_near = ln < lg
    loss = torch.minimum(lg, ln)
    pick = loss.argmin(0) if per_row else torch.full((rows,), int(loss.sum(1).argmin()), dtype=torch.long)
    idx = pick.to(w0.device) * rows + torch.arange(rows, device=w0.device)
    chosen_near = use_near[pick, torch.arange(rows)].to(w0.device)
    best = torch.where(chosen_near[:, None], near[idx], code[idx])
    m = mult[idx]
    # on the calibrated grid (m = 1): what gptq_offset reports
    near1 = nearest_codes(b0 * _inv(s), qmin, qmax, cfg.pair_limit)
    info = {
        "proxy_nearest": proxy_loss(w0, near1 * s, hd),
        "proxy_gptq": float(loss[pick, torch.arange(rows)].sum() / rows),
        "changed_vs_nearest": float((best != near1).float().mean()),
        "max_steps_from_nearest": int((best - near1).abs().max()),
        "scale_multiplier_mean": float(m.mean()),
        "rows_rescaled": float((m != 1.0).float().mean()),
        "rows_nearest": float(chosen_near.float().mean()),
        "seconds": time.perf_counter() - t0,
    }
    return best, m, info
