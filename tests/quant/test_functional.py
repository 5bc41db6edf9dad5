"""Eq. (1)-(2): grid, qparams, fake-quant, STE (pegq.quant.functional)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pegq.quant import (
    dequantize,
    fake_quant,
    grid,
    qparams_from_range,
    quantize_to_int,
)
from pegq.quant.functional import EPS_SCALE

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)

bits_st = st.integers(2, 16)
sym_st = st.booleans()
# ranges of very different magnitudes; lo <= 0 <= hi after widening anyway
mag_st = st.floats(1e-4, 1e4, allow_nan=False)


def _range_and_x(lo, hi, n=257, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g) * (hi - lo) + lo
    x[0], x[1] = lo, hi  # the ends are inside the range too
    return x


@SETTINGS
@given(bits=bits_st, sym=sym_st, a=mag_st, b=mag_st, neg=st.booleans())
def test_error_at_most_half_step_inside_range(bits, sym, a, b, neg):
    lo, hi = (-a, b) if neg else (0.0, b)
    s, z = qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits, sym)
    qmin, qmax = grid(bits, sym)
    x = _range_and_x(lo, hi)
    y = fake_quant(x, s, z, qmin, qmax)
    err = (y.double() - x.double()).abs().max().item()
    # s/2 from rounding, plus float32 rounding of x/s and of the product (a few ulps of |x|)
    slack = 4 * torch.finfo(torch.float32).eps * max(abs(lo), abs(hi))
    assert err <= float(s) / 2 + slack


@SETTINGS
@given(bits=bits_st, sym=sym_st, a=mag_st, b=mag_st, scale_x=st.floats(0.1, 10.0))
def test_outputs_on_grid_and_int_roundtrip(bits, sym, a, b, scale_x):
    s, z = qparams_from_range(torch.tensor(-a), torch.tensor(b), bits, sym)
    qmin, qmax = grid(bits, sym)
    x = _range_and_x(-a * scale_x, b * scale_x)  # some values outside the range
    y = fake_quant(x, s, z, qmin, qmax)
    xi = quantize_to_int(x, s, z, qmin, qmax)
    assert xi.dtype == torch.int64
    assert int(xi.min()) >= qmin and int(xi.max()) <= qmax
    # eq. (2) of eq. (1) is the fake-quant output, bit for bit
    assert torch.equal(dequantize(xi, s, z), y)
    # and every output is s * (integer in the grid - z)
    k = y.double() / float(s) + float(z)
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert k.round().min() >= qmin and k.round().max() <= qmax


@SETTINGS
@given(bits=bits_st, sym=sym_st, a=mag_st, b=mag_st)
def test_idempotent(bits, sym, a, b):
    s, z = qparams_from_range(torch.tensor(-a), torch.tensor(b), bits, sym)
    qmin, qmax = grid(bits, sym)
    x = _range_and_x(-2 * a, 2 * b)
    y = fake_quant(x, s, z, qmin, qmax)
    assert torch.equal(fake_quant(y, s, z, qmin, qmax), y)


@SETTINGS
@given(bits=bits_st, sym=sym_st, lo=st.floats(-1e4, 1e4), hi=st.floats(-1e4, 1e4))
def test_zero_exactly_representable(bits, sym, lo, hi):
    lo, hi = min(lo, hi), max(lo, hi)
    s, z = qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits, sym)
    qmin, qmax = grid(bits, sym)
    assert qmin <= float(z) <= qmax and float(z) == round(float(z))
    x = torch.tensor([0.0, -0.0, lo, hi, 0.0])
    y = fake_quant(x, s, z, qmin, qmax)
    assert y[0].item() == 0.0 and y[1].item() == 0.0 and y[4].item() == 0.0


def test_zero_padding_survives_asymmetric_all_positive_range():
    # e.g. GELU/softmax outputs with zero padding: range [0.3, 7] is widened to [0, 7]
    x = torch.linspace(0.3, 7.0, 100)
    x[::7] = 0.0
    s, z = qparams_from_range(x.min(), x.max(), 8, False)
    y = fake_quant(x, s, z, *grid(8, False))
    assert torch.all(y[::7] == 0.0)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("sym", [True, False])
def test_scale_and_zero_formulas(bits, sym):
    qmin, qmax = grid(bits, sym)
    s, z = qparams_from_range(torch.tensor(-1.5), torch.tensor(3.0), bits, sym)
    if sym:
        assert (qmin, qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        assert float(z) == 0.0
        assert math.isclose(float(s), 3.0 / qmax, rel_tol=1e-6)
    else:
        assert (qmin, qmax) == (0, 2**bits - 1)
        assert math.isclose(float(s), 4.5 / qmax, rel_tol=1e-6)
        assert float(z) == round(1.5 / float(s))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("value", [0.0, 5.0, -3.0, 1e-30])
def test_constant_tensors_give_finite_scale(sym, value):
    x = torch.full((4, 5), value)
    s, z = qparams_from_range(x.min(), x.max(), 8, sym)
    assert torch.isfinite(s).all() and float(s) >= 0.99 * EPS_SCALE and torch.isfinite(z).all()
    y = fake_quant(x, s, z, *grid(8, sym))
    assert torch.isfinite(y).all()
    assert (y - x).abs().max() <= float(s) / 2 + 1e-6 * abs(value)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("sym", [True, False])
def test_matches_torch_fused_kernels(bits, sym):
    """Same numerics as torch.fake_quantize_per_{tensor,channel}_affine (x * (1/s))."""
    g = torch.Generator().manual_seed(1)
    qmin, qmax = grid(bits, sym)
    x = torch.randn(64, 48, generator=g) * 3
    s, z = qparams_from_range(torch.tensor(-5.0), torch.tensor(4.0), bits, sym)
    ref = torch.fake_quantize_per_tensor_affine(x, s, z.to(torch.int32), qmin, qmax)
    assert torch.equal(fake_quant(x, s, z, qmin, qmax), ref)
    lo, hi = -torch.rand(48, generator=g) * 4, torch.rand(48, generator=g) * 4
    s, z = qparams_from_range(lo, hi, bits, sym)
    ref = torch.fake_quantize_per_channel_affine(x, s, z.to(torch.int32), 1, qmin, qmax)
    assert torch.equal(fake_quant(x, s, z, qmin, qmax), ref)


@pytest.mark.parametrize("sym", [True, False])
def test_grad_path_equals_nograd_path(sym):
    g = torch.Generator().manual_seed(2)
    qmin, qmax = grid(8, sym)
    x = torch.randn(32, 16, generator=g) * 2
    s, z = qparams_from_range(-torch.rand(16, generator=g) * 2, torch.rand(16, generator=g), 8, sym)
    y0 = fake_quant(x, s, z, qmin, qmax)
    y1 = fake_quant(x.clone().requires_grad_(), s, z, qmin, qmax)
    y2 = fake_quant(x, s.clone().requires_grad_(), z.clone().requires_grad_(), qmin, qmax)
    assert torch.equal(y0, y1.detach()) and torch.equal(y0, y2.detach())


@pytest.mark.parametrize("sym", [True, False])
def test_ste_gradient_one_inside_zero_outside(sym):
    qmin, qmax = grid(8, sym)
    s, z = qparams_from_range(torch.tensor(-1.0), torch.tensor(2.0), 8, sym)
    lo_edge = (qmin - float(z)) * float(s)
    hi_edge = (qmax - float(z)) * float(s)
    inside = torch.linspace(lo_edge * 0.99, hi_edge * 0.99, 101)
    outside = torch.cat([torch.linspace(hi_edge * 1.05, 10.0, 20), torch.linspace(-10.0, lo_edge - 0.05, 20)])
    x = torch.cat([inside, outside]).requires_grad_()
    fake_quant(x, s, z, qmin, qmax).sum().backward()
    g = x.grad
    assert torch.allclose(g[: inside.numel()], torch.ones(inside.numel()), atol=1e-6)
    assert torch.all(g[inside.numel():] == 0)


def test_learnable_scale_and_zero_get_gradients():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, generator=g) * 2 + 0.5
    s0, z0 = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.5), 4, False)
    s = s0.clone().requires_grad_()
    z = z0.clone().requires_grad_()
    qmin, qmax = grid(4, False)
    ((fake_quant(x, s, z, qmin, qmax) - x) ** 2).sum().backward()
    assert s.grad is not None and float(s.grad.abs()) > 0
    assert z.grad is not None and float(z.grad.abs()) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    x = torch.randn(100).to(dtype)
    s, z = qparams_from_range(x.float().min(), x.float().max(), 8, False)
    y = fake_quant(x, s, z, *grid(8, False))
    assert y.dtype == dtype and torch.isfinite(y).all()
    ref = fake_quant(x.float(), s, z, *grid(8, False)).to(dtype)
    if dtype == torch.float64:  # computed in float64: same grid points, products rounded finer
        assert torch.allclose(y, ref, rtol=1e-6, atol=0)
    else:  # computed in float32 and cast back
        assert torch.equal(y, ref)


@pytest.mark.parametrize("sym", [True, False])
def test_lsq_gradients_of_scale_and_zero(sym):
    """d x_hat/d s = round(x/s) - x/s inside, qmax - z above, qmin - z below (Esser et al. 2019);
    d x_hat/d z = 0 inside and -s outside."""
    qmin, qmax = grid(4, sym)
    s0, z0 = qparams_from_range(torch.tensor(-1.0), torch.tensor(2.0), 4, sym)
    for x, kind in [(0.37, "in"), (-0.61, "in"), (50.0, "above"), (-50.0, "below")]:
        s = s0.clone().requires_grad_()
        z = z0.clone().requires_grad_(not sym)
        fake_quant(torch.tensor(x), s, z, qmin, qmax).backward()
        v = x / float(s0)
        want_s = {"in": round(v) - v, "above": qmax - float(z0), "below": qmin - float(z0)}[kind]
        assert math.isclose(float(s.grad), want_s, rel_tol=1e-5, abs_tol=1e-5), (x, kind)
        if not sym:
            want_z = 0.0 if kind == "in" else -float(s0)
            assert math.isclose(float(z.grad), want_z, rel_tol=1e-5, abs_tol=1e-7), (x, kind)
