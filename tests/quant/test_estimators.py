"""Range estimators: current / running (EMA) min-max and MSE (paper section 2, appendix B.2)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pegq.quant import (
    PerChannel,
    PerEmbedding,
    PerEmbeddingGroup,
    PerTensor,
    Quantizer,
    RangeEstimator,
    canonical_estimator,
    grid,
    mse_range,
    qparams_from_range,
    quant_error,
)
from pegq.quant.estimators import _qparams_at

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def _batches(n, shape=(4, 6, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * (1 + i) + i * 0.3 for i in range(n)]


@pytest.mark.parametrize("gran", [PerTensor(), PerEmbedding(), PerEmbeddingGroup(2), PerChannel(1)])
def test_running_minmax_follows_ema_formula(gran):
    m = 0.9
    q = Quantizer("act", bits=8, granularity=gran, estimator="running_minmax", momentum=m)
    r_min = r_max = None
    for x in _batches(5):
        q(x)
        b_min, b_max = gran.minmax(x)
        if r_min is None:  # the first batch initialises
            r_min, r_max = b_min, b_max
        else:
            r_min, r_max = m * r_min + (1 - m) * b_min, m * r_max + (1 - m) * b_max
        assert torch.allclose(q.x_min, r_min, rtol=1e-6, atol=1e-7)
        assert torch.allclose(q.x_max, r_max, rtol=1e-6, atol=1e-7)
    # it is an average, not the overall min/max: strictly inside the extreme batch's range
    assert (q.x_max < torch.stack([gran.minmax(x)[1] for x in _batches(5)]).amax(0)).all()


def test_running_minmax_momentum_is_used():
    a = Quantizer("a", estimator="running_minmax", momentum=0.5)
    b = Quantizer("b", estimator="running_minmax", momentum=0.9)
    for x in _batches(3):
        a(x)
        b(x)
    assert not torch.allclose(a.x_max, b.x_max)


def test_current_minmax_last_batch_wins():
    q = Quantizer("act", estimator="current_minmax")
    for x in _batches(4):
        q(x)
    last = _batches(4)[-1]
    assert float(q.x_min) == float(last.min()) and float(q.x_max) == float(last.max())


def test_estimator_aliases():
    assert canonical_estimator("min-max") == "current_minmax"
    assert canonical_estimator("ema") == "running_minmax"
    assert canonical_estimator("mse") == "mse"


def _true_mse(x, gran, x_min, x_max, bits, sym):
    q = Quantizer("ref", bits=bits, symmetric=sym, granularity=gran)
    q.x_min, q.x_max = x_min, x_max
    q.freeze()
    return float(((q(x).double() - x.double()) ** 2).sum())


dist_st = st.sampled_from(["normal", "uniform", "outliers", "positive", "constant", "sparse"])


def _sample(dist, shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if dist == "uniform":
        x = torch.rand(*shape, generator=g) * 3 - 1
    elif dist == "outliers":
        x.view(-1)[:: 17] *= 25
    elif dist == "positive":
        x = x.abs() + 0.5
    elif dist == "constant":
        x = torch.full(shape, 0.7)
    elif dist == "sparse":
        x = x * (torch.rand(*shape, generator=g) < 0.1)
    return x


@SETTINGS
@given(bits=st.integers(2, 16), sym=st.booleans(), dist=dist_st, seed=st.integers(0, 10_000),
       gran=st.sampled_from([PerTensor(), PerChannel(0), PerChannel(-1), PerEmbeddingGroup(4)]))
def test_mse_range_never_worse_than_minmax(bits, sym, dist, seed, gran):
    x = _sample(dist, (16, 48), seed)
    q = Quantizer("w", bits=bits, symmetric=sym, granularity=gran, estimator="mse")
    q.observe(x)
    mn, mx = gran.minmax(x)
    err_mse = _true_mse(x, gran, q.x_min, q.x_max, bits, sym)
    err_mm = _true_mse(x, gran, mn, mx, bits, sym)
    assert err_mse <= err_mm
    # shrinks the range only (candidates are alpha * min-max, alpha in (0, 1])
    assert (q.x_max <= mx.clamp(min=0)).all() and (q.x_min >= mn.clamp(max=0)).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(0)])
def test_mse_search_matches_exhaustive_search(bits, sym, gran):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[3, 5] = 0.3  # an outlier
    rows = gran.as_rows(w)
    lo, hi = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
    best = None
    for k in range(1, 101):
        _, _, s, z = _qparams_at(lo, hi, torch.full((rows.shape[0],), k / 100), bits, sym)
        err = quant_error(rows, s, z, bits, sym)
        best = err if best is None else torch.minimum(best, err)
    mn, mx = mse_range(rows, bits, sym)
    s, z = qparams_from_range(mn, mx, bits, sym)
    got = quant_error(rows, s, z, bits, sym)
    assert float(got.sum()) <= float(best.sum()) * 1.001
    err_mm = quant_error(rows, *qparams_from_range(lo, hi, bits, sym), bits, sym)
    assert float(got.sum()) < float(err_mm.sum())  # it did clip something


def test_mse_quant_error_is_the_quantizer_error():
    x = _sample("outliers", (8, 40), 3)
    rows = PerChannel(0).as_rows(x)
    mn, mx = mse_range(rows, 4, False)
    s, z = qparams_from_range(mn, mx, 4, False)
    err = quant_error(rows, s, z, 4, False)
    q = Quantizer("w", bits=4, granularity=PerChannel(0))
    q.x_min, q.x_max = mn, mx
    q.freeze()
    ref = ((q(x).double() - x.double()) ** 2).sum(1)
    assert torch.allclose(err, ref, rtol=1e-6)


def test_mse_chunking_gives_same_result():
    x = _sample("normal", (37, 50), 4)
    a = mse_range(x, 4, True)
    b = mse_range(x, 4, True, chunk_elems=200)  # 4 rows per chunk
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mse_running_mean_over_batches():
    q = Quantizer("act", bits=4, estimator="mse")
    opt = []
    for x in _batches(3):
        q(x)
        opt.append(mse_range(x.reshape(1, -1), 4, False))
    mean_min = torch.stack([o[0] for o in opt]).mean(0)
    mean_max = torch.stack([o[1] for o in opt]).mean(0)
    assert torch.allclose(q.x_min, mean_min, rtol=1e-6) and torch.allclose(q.x_max, mean_max, rtol=1e-6)


def test_mse_constant_and_zero_rows():
    x = torch.zeros(3, 10)
    x[1] = 2.5
    mn, mx = mse_range(x, 8, False)
    s, z = qparams_from_range(mn, mx, 8, False)
    assert torch.isfinite(s).all()
    assert torch.equal(mn, torch.zeros(3)) and float(mx[1]) == 2.5


def test_estimator_layout_change_is_an_error():
    est = RangeEstimator("running_minmax", name="enc.x")
    est.update(torch.randn(3, 4), None, None, 8, False)
    mn, mx = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="enc.x"):
        est.update(torch.randn(5, 4), mn, mx, 8, False)


def test_grid_is_used_by_quant_error():
    rows = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    s, z = qparams_from_range(torch.tensor([0.0]), torch.tensor([3.0]), 2, False)
    assert grid(2, False) == (0, 3)
    assert float(quant_error(rows, s, z, 2, False)) == 0.0
