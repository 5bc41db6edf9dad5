"""GPTQ (pegq.quant.gptq): the codes stay on the calibrated grid; with uncorrelated inputs it is exactly
round-to-nearest; with correlated inputs it lowers the layer's output error on rows it has not seen; the
offsets reproduce its weights through the Quantizer's fixed-rounding path; bad shapes and grids are refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pegq.quant import PerChannel, Quantizer, QuantState
from pegq.quant.adaround import fake_quant_fixed_rounding
from pegq.quant.gptq import (
    PAIR_SCALES,
    GPTQConfig,
    Hessian,
    _pair_round,
    gptq_offset,
    gptq_search,
    pair_limited_nearest,
    pair_overflows,
    proxy_loss,
)


def _layer(out_f=32, in_f=64, rows=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.1
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(rows, in_f, generator=g) @ (torch.eye(in_f) + 2 * mix)
    return w, x


def _nearest(w, s, qmin, qmax):
    return torch.clamp(torch.round(w / s), qmin, qmax) * s


@settings(max_examples=25, deadline=None)
@given(out_f=st.integers(1, 12), in_f=st.integers(1, 40), bits=st.sampled_from([2, 4, 8]),
       per_row=st.booleans(), act_order=st.booleans(), seed=st.integers(0, 2**16))
def test_diagonal_hessian_is_round_to_nearest(out_f, in_f, bits, per_row, act_order, seed):
    # no correlation between inputs: there is nothing to compensate, GPTQ must pick the nearest integer
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = (w.abs().amax(1, keepdim=True) if per_row else w.abs().max()).clamp_min(1e-3) / qmax
    h = torch.diag(torch.rand(in_f, generator=g, dtype=torch.float64) + 0.1)
    off, info = gptq_offset(w, s, None, qmin, qmax, h, GPTQConfig(act_order=act_order, block_size=7))
    wq = fake_quant_fixed_rounding(w, s.expand_as(w), None, qmin, qmax, off)
    torch.testing.assert_close(wq, _nearest(w, s, qmin, qmax), rtol=0, atol=1e-6)
    assert info["changed_vs_nearest"] == 0.0


@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from([3, 4, 8]), zero=st.integers(-3, 3), seed=st.integers(0, 2**16),
       block=st.sampled_from([1, 5, 128]))
def test_codes_on_the_grid_and_block_size_does_not_change_the_result(bits, zero, seed, block):
    w, x = _layer(8, 20, 400, seed)
    hess = Hessian(20)
    hess.add(x)
    qmin, qmax = 0, 2**bits - 1  # asymmetric grid with a per-row zero-point
    s = (w.amax(1, keepdim=True) - w.amin(1, keepdim=True)) / qmax
    z = ((-w.amin(1, keepdim=True) / s).round() + zero).clamp(qmin, qmax)
    off, _ = gptq_offset(w, s, z, qmin, qmax, hess.h, GPTQConfig(block_size=block))
    ref, _ = gptq_offset(w, s, z, qmin, qmax, hess.h, GPTQConfig(block_size=128))
    assert torch.equal(off, off.round())
    code = torch.floor(w / s) + off + z
    assert code.min() >= qmin and code.max() <= qmax
    # lazy batch updates are an implementation detail: the same integers whatever the block size
    assert (off != ref).float().mean() < 0.01


@pytest.mark.parametrize("bits", [4, 8])
def test_lower_output_error_than_nearest_on_held_out_rows(bits):
    w, x = _layer()
    fit, held = x[:2000], x[2000:]
    hess = Hessian(64)
    for chunk in fit.split(300):  # accumulated in pieces: the running mean equals the one-shot X^T X / n
        hess.add(chunk)
    torch.testing.assert_close(hess.h, fit.double().T @ fit.double() / 2000)
    weighted = Hessian(64)  # row weights: a row of weight 2 counts as that row twice
    r = torch.ones(2000)
    r[:10] = 2
    weighted.add(fit, r)
    twice = torch.cat([fit, fit[:10]]).double()
    torch.testing.assert_close(weighted.h, twice.T @ twice / 2010)
    qmax = 2 ** (bits - 1) - 1
    s = w.abs().amax(1, keepdim=True) / qmax
    off, info = gptq_offset(w, s, None, -qmax - 1, qmax, hess.h)
    wq = fake_quant_fixed_rounding(w, s.expand_as(w), None, -qmax - 1, qmax, off)
    wn = _nearest(w, s, -qmax - 1, qmax)
    assert info["proxy_gptq"] < 0.8 * info["proxy_nearest"], info
    assert abs(info["proxy_gptq"] - proxy_loss(w, wq, hess.h)) < 1e-6 * info["proxy_nearest"] + 1e-12
    err_g = (held @ (w - wq).T).pow(2).mean()
    err_n = (held @ (w - wn).T).pow(2).mean()
    assert err_g < 0.8 * err_n, (float(err_g), float(err_n))


def test_quantizer_carries_the_offsets():
    # frozen into a per-channel weight quantizer, the offsets give GPTQ's weights on every forward
    w, x = _layer(16, 32, 800)
    q = Quantizer(bits=4, symmetric=True, granularity=PerChannel(axis=0), estimator="current_minmax")
    q(w)
    q.freeze()
    assert q.state == QuantState.FROZEN
    scale, _ = q.qparams()
    s = q.granularity.broadcast(scale, w, q.group_index)
    hess = Hessian(32)
    hess.add(x)
    off, info = gptq_offset(w, s, None, q.qmin, q.qmax, hess.h)
    q.round_offset = off
    torch.testing.assert_close(q(w), fake_quant_fixed_rounding(w, s, None, q.qmin, q.qmax, off))
    assert proxy_loss(w, q(w), hess.h) == pytest.approx(info["proxy_gptq"], rel=1e-5)


def test_bad_input_is_refused():
    w, x = _layer(4, 6, 50)
    hess = Hessian(6)
    hess.add(x)
    s = torch.full((4, 1), 0.01)
    with pytest.raises(ValueError, match=r"Hessian must be \[6, 6\]"):
        gptq_offset(w, s, None, -128, 127, torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D Linear weights"):
        gptq_offset(w[0], s[0], None, -128, 127, hess.h)
    with pytest.raises(ValueError, match="same for all inputs of a row"):
        gptq_offset(w, torch.rand(4, 6) + 0.01, None, -128, 127, hess.h)
    with pytest.raises(ValueError, match="rows of 5"):
        hess.add(torch.randn(3, 5))
    with pytest.raises(ValueError, match="non-negative"):
        hess.add(torch.randn(3, 6), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="damp"):
        GPTQConfig(damp=1.5)


# ----------------------------------------------------------------------------- pair limit (x86 int16 pair sums)


def _pair_sums(q):
    n = q.shape[-1] - q.shape[-1] % 2
    return q[..., 0:n:2] + q[..., 1:n:2]


@settings(max_examples=40, deadline=None)
@given(out_f=st.integers(1, 6), in_f=st.integers(1, 24), limit=st.integers(1, 255), spread=st.floats(0.5, 200),
       seed=st.integers(0, 2**16))
def test_pair_limited_nearest_is_the_closest_pair_within_the_limit(out_f, in_f, limit, spread, seed):
    g = torch.Generator().manual_seed(seed)
    v = (torch.rand(out_f, in_f, generator=g) * 2 - 1) * spread
    q = pair_limited_nearest(v, -128, 127, limit)
    assert bool((q == q.round()).all()) and q.min() >= -128 and q.max() <= 127
    assert pair_overflows(q, limit) == 0
    nearest = torch.clamp(torch.round(v), -128, 127)
    ok = _pair_sums(nearest).abs() <= limit
    n = in_f - in_f % 2
    # pairs within the limit are plain round-to-nearest, as is an odd last input
    assert torch.equal(q[:, 0:n:2][ok], nearest[:, 0:n:2][ok]) and torch.equal(q[:, 1:n:2][ok], nearest[:, 1:n:2][ok])
    assert torch.equal(q[:, n:], nearest[:, n:])
    # a pair over it: no integer pair on the grid within the limit is closer (brute force over the grid)
    grid = torch.arange(-128, 128, dtype=torch.float32)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    feasible = (a + b).abs() <= limit
    for r, c in (~ok).nonzero().tolist()[:3]:
        v0, v1 = v[r, 2 * c], v[r, 2 * c + 1]
        best = ((a - v0) ** 2 + (b - v1) ** 2)[feasible].min()
        got = (q[r, 2 * c] - v0) ** 2 + (q[r, 2 * c + 1] - v1) ** 2
        assert got <= best + 1e-3, (float(got), float(best))


def test_pair_overflows_counts_pairs_along_the_inputs():
    q = torch.tensor([[127, 2, 127, -1, 5], [-128, -1, 64, 64, 127]])
    assert pair_overflows(q) == 2 and pair_overflows(q, limit=127) == 3 and pair_overflows(q[:, :4].T) == 1


def test_gptq_with_pair_limit():
    w, x = _layer(out_f=48, in_f=96)
    w[:, 10:12] *= 6  # a few heavy inputs, as smoothing makes them: their pairs overflow when rounded
    w[:, 40:52] *= 3
    h = Hessian(96)
    h.add(x)
    s = w.abs().amax(1, keepdim=True) / 127
    free, info_free = gptq_offset(w, s, None, -128, 127, h.h)
    code_free = torch.round(fake_quant_fixed_rounding(w, s.expand_as(w), None, -128, 127, free) / s)
    assert pair_overflows(code_free) > 0  # the constraint has something to do
    off, info = gptq_offset(w, s, None, -128, 127, h.h, GPTQConfig(pair_limit=128, block_size=16))
    code = torch.round(fake_quant_fixed_rounding(w, s.expand_as(w), None, -128, 127, off) / s)
    assert pair_overflows(code) == 0 and code.min() >= -128 and code.max() <= 127
    # it still compensates: better than the pair-limited nearest it reports, worse than unconstrained GPTQ
    assert info["proxy_gptq"] < info["proxy_nearest"]
    assert info_free["proxy_gptq"] < info["proxy_gptq"]
    limited = pair_limited_nearest(w / s, -128, 127, 128)
    assert info["proxy_nearest"] == pytest.approx(proxy_loss(w, limited * s, h.h.double()))
    # a limit no pair reaches changes nothing (in input order: with act-order a limit rounds each pair's two
    # inputs one after the other, which changes the order)
    same, _ = gptq_offset(w, s, None, -128, 127, h.h, GPTQConfig(pair_limit=255, act_order=False))
    assert torch.equal(same, gptq_offset(w, s, None, -128, 127, h.h, GPTQConfig(act_order=False))[0])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), limit=st.sampled_from([64, 128, 200]), spread=st.floats(20.0, 150.0))
def test_pair_round_is_the_least_cost_pair_within_the_limit(seed, limit, spread):
    # two inputs GPTQ rounds one after the other: rounding the first moves the second by -(x0 - q0) u01 / u00;
    # the pair costs ((x0 - q0) / u00)^2 + ((x1' - q1) / u11)^2
    g = torch.Generator().manual_seed(seed)
    x0, x1 = (torch.randn(40, 1, generator=g) * spread for _ in range(2))
    u00, u11 = (float(torch.rand(1, generator=g)) + 0.2 for _ in range(2))
    u01 = float(torch.randn(1, generator=g))
    q0, q1 = _pair_round(x0, x1, u00, u01, u11, -128, 127, limit)
    assert ((q0 + q1).abs() <= limit).all() and q0.abs().max() <= 128 and q1.abs().max() <= 128

    grid = torch.arange(-128, 128, dtype=torch.float32)
    b0, b1 = grid[None, :, None], grid[None, None, :]  # brute force over every pair of codes
    x1p = x1[:, :, None] - (x0[:, :, None] - b0) * (u01 / u00)
    cost = ((x0[:, :, None] - b0) / u00) ** 2 + ((x1p - b1) / u11) ** 2
    cost = torch.where((b0 + b1).abs() <= limit, cost, torch.inf).reshape(len(x0), -1)
    got = ((x0 - q0) / u00) ** 2 + ((x1 - (x0 - q0) * (u01 / u00) - q1) / u11) ** 2
    # plain GPTQ (nearest, then nearest of the moved second input) where it keeps the limit, else the best pair
    n0 = torch.clamp(torch.round(x0), -128, 127)
    n1 = torch.clamp(torch.round(x1 - (x0 - n0) * (u01 / u00)), -128, 127)
    plain = (n0 + n1).abs() <= limit
    assert torch.equal(q0[plain], n0[plain]) and torch.equal(q1[plain], n1[plain])
    torch.testing.assert_close(got[~plain], cost.min(1, keepdim=True).values[~plain], rtol=1e-5, atol=1e-4)


def test_scale_search_per_row_with_a_pair_limit():
    """On a coarser grid a pair limit binds less: each row keeps the multiplier of its scale (and GPTQ's or
    nearest's codes) of least proxy loss, never worse than on the calibrated grid."""
    w, x = _layer(out_f=48, in_f=96)
    w[:, 10:12] *= 6
    w[:, 40:52] *= 3
    h = Hessian(96)
    h.add(x)
    s = w.abs().amax(1, keepdim=True) / 127
    cfg = GPTQConfig(pair_limit=128)
    assert cfg.scale_grid() == PAIR_SCALES and GPTQConfig().scale_grid() == (1.0,)
    one, m1, info1 = gptq_search(w, s, -128, 127, h.h, GPTQConfig(pair_limit=128, scales=(1.0,)))
    code, m, info = gptq_search(w, s, -128, 127, h.h, cfg)
    assert torch.equal(m1, torch.ones(48, 1)) and set(m.flatten().tolist()) <= set(torch.tensor(PAIR_SCALES).tolist())
    assert pair_overflows(code) == 0 and code.min() >= -128 and code.max() <= 127 and torch.equal(code, code.round())
    hd = h.h.double()
    assert info["proxy_gptq"] == pytest.approx(proxy_loss(w, code * s * m, hd))

    def rows(c, mult):
        d = (w - c * s * mult).double()
        return ((d @ hd) * d).sum(1)

    assert (rows(code, m) <= rows(one, m1) * (1 + 1e-9)).all()  # per row never worse than at m = 1
    assert info["proxy_gptq"] < 0.5 * info1["proxy_gptq"] and info["rows_rescaled"] > 0.5
    assert info["scale_multiplier_mean"] == pytest.approx(float(m.mean()))
    # m = 1 with GPTQ's codes or nearest's, whichever is better per row
    near = pair_limited_nearest(w / s, -128, 127, 128)
    off, _ = gptq_offset(w, s, None, -128, 127, hd, GPTQConfig(pair_limit=128))
    gq = torch.floor(w / s) + off
    assert (rows(one, m1) <= torch.minimum(rows(near, 1.0), rows(gq, 1.0)) * (1 + 1e-9)).all()
    # a per-tensor scale: one multiplier for the whole weight
    st_ = s.max()
    _, mt, _ = gptq_search(w, st_, -128, 127, h.h, cfg, per_row=False)
    assert mt.unique().numel() == 1


def test_pair_limit_bad_input():
    with pytest.raises(ValueError, match="pair_limit"):
        GPTQConfig(pair_limit=0)
    for bad in ((), (1.0, 0.0), (-1.0,), (float("inf"),)):
        with pytest.raises(ValueError, match="GPTQ scales must be positive finite"):
            GPTQConfig(scales=bad)
    assert GPTQConfig(scales=[1, 1.5]).scales == (1.0, 1.5)
    with pytest.raises(ValueError, match="pair_limit"):
        GPTQConfig(pair_limit=True)
    w, x = _layer(out_f=4, in_f=8)
    h = Hessian(8)
    h.add(x)
    s = torch.full((4, 1), 0.01)
    with pytest.raises(ValueError, match="symmetric"):
        gptq_offset(w, s, torch.full((4, 1), 3.0), 0, 255, h.h, GPTQConfig(pair_limit=128))
