"""Granularities: per-tensor, per-channel, per-embedding, PEG (paper eq. 4-5, section 4)."""

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
    granularity_from_dict,
    group_index_from_perm,
    range_permutation,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def _x(shape, seed=0, outlier_dim=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if outlier_dim is not None:
        x[..., outlier_dim] *= 30
    return x


def _q(gran, bits=8, sym=False, perm=None, name="q"):
    q = Quantizer(name, bits=bits, symmetric=sym, granularity=gran)
    if perm is not None:
        q.set_permutation(perm)
    return q


shape_st = st.lists(st.integers(1, 6), min_size=1, max_size=4)


@SETTINGS
@given(shape=shape_st, data=st.data(), bits=st.integers(2, 16), sym=st.booleans())
def test_per_channel_equals_per_tensor_slice_by_slice(shape, data, bits, sym):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = _x(shape, seed=len(shape) + axis)
    y = _q(PerChannel(axis), bits, sym)(x)
    for i in range(x.shape[axis]):
        xi = x.select(axis, i)
        yi = _q(PerTensor(), bits, sym)(xi)
        assert torch.equal(y.select(axis, i), yi)


@SETTINGS
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), d=st.sampled_from([1, 2, 6, 12]),
       bits=st.integers(2, 16), sym=st.booleans())
def test_peg_k1_is_per_tensor_and_kd_is_per_embedding(lead, d, bits, sym):
    x = _x([*lead, d], seed=d)
    assert torch.equal(_q(PerEmbeddingGroup(1), bits, sym)(x), _q(PerTensor(), bits, sym)(x))
    assert torch.equal(_q(PerEmbeddingGroup(d), bits, sym)(x), _q(PerEmbedding(), bits, sym)(x))


def test_per_embedding_equals_per_channel_last_axis():
    x = _x((3, 7, 12), outlier_dim=5)
    assert torch.equal(_q(PerEmbedding())(x), _q(PerChannel(-1))(x))


@SETTINGS
@given(k_and_d=st.sampled_from([(1, 6), (2, 6), (3, 12), (4, 12), (6, 24), (12, 12)]),
       seed=st.integers(0, 1000), sym=st.booleans())
def test_permuted_peg_equals_peg_on_permuted_input(k_and_d, seed, sym):
    k, d = k_and_d
    x = _x((2, 5, d), seed=seed, outlier_dim=seed % d)
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(seed))
    inv = torch.argsort(perm)
    y_perm = _q(PerEmbeddingGroup(k, permute=True), 8, sym, perm=perm)(x)
    y_ref = _q(PerEmbeddingGroup(k), 8, sym)(x[..., perm])[..., inv]
    assert torch.equal(y_perm, y_ref)


def test_peg_groups_use_separate_ranges():
    # outlier dim 0 in group 0 only: group 1's scale is unaffected by it
    x = _x((4, 8))
    x[:, 0] *= 100
    q = _q(PerEmbeddingGroup(2))
    q(x)
    s = q.scale
    assert s[0] > 20 * s[1]
    q1 = _q(PerTensor())
    q1(x)
    assert torch.allclose(q1.scale, s[0])


def test_range_based_permutation_groups_outliers_together():
    x = _x((4, 16, 12))
    for dim in (2, 7, 9):
        x[..., dim] *= 50
    mn, mx = PerEmbedding().minmax(x)
    perm = range_permutation(mn, mx)
    assert sorted(perm.tolist()) == list(range(12))
    assert set(perm[-3:].tolist()) == {2, 7, 9}  # the 3 largest ranges form the last group of K=4
    assert torch.equal(range_permutation(mx - mn), perm)
    q = _q(PerEmbeddingGroup(4, permute=True), perm=perm)
    q(x)
    assert q.scale[-1] > 10 * q.scale[:-1].max()


@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 100))
def test_minmax_matches_rows(shape, seed):
    x = _x(shape, seed=seed)
    d = shape[-1]
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(seed))
    grans = [(PerTensor(), None), (PerEmbedding(), None), (PerEmbeddingGroup(1), perm),
             (PerEmbeddingGroup(d), None), (PerEmbeddingGroup(d), perm)]
    grans += [(PerChannel(a), None) for a in range(-len(shape), len(shape))]
    for g, p in grans:
        rows = g.as_rows(x, p)
        assert rows.shape[0] == g.num_params(x.shape)
        mn, mx = g.minmax(x, p)
        assert torch.equal(mn, rows.amin(1)) and torch.equal(mx, rows.amax(1)), g


@SETTINGS
@given(d=st.integers(3, 24), data=st.data(), seed=st.integers(0, 1000), sym=st.booleans(), bits=st.integers(2, 8))
def test_outlier_group_equals_per_tensor_on_each_group(d, data, seed, sym, bits):
    """PEG with an outlier group: the M widest-range dims (last slice of the range-based permutation) share
    one range, the others split the rest evenly; each group quantized exactly as per-tensor on its dims."""
    m = data.draw(st.integers(1, d - 1))
    k = data.draw(st.sampled_from([kk for kk in range(2, d - m + 2) if (d - m) % (kk - 1) == 0]))
    g = PerEmbeddingGroup(k, permute=True, outliers=m)
    x = _x((2, 5, d), seed=seed, outlier_dim=seed % d)
    perm = range_permutation(*PerEmbedding().minmax(x))
    q = _q(g, bits, sym, perm=perm)
    y = q(x)
    sizes = g.sizes(d)
    assert sizes[-1] == m and sum(sizes) == d and len(set(sizes[:-1])) == 1
    assert q.group_index.bincount(minlength=k).tolist() == sizes
    assert set(perm[d - m:].tolist()) == set(torch.nonzero(q.group_index == k - 1).flatten().tolist())
    start = 0
    for gi, n in enumerate(sizes):
        dims = perm[start : start + n]
        start += n
        assert torch.equal(y[..., dims], _q(PerTensor(), bits, sym)(x[..., dims])), gi
    mn, mx = g.minmax(x, perm)
    rows = g.as_rows(x, perm)  # unequal groups: rows repeated cyclically, same min/max
    assert rows.shape[0] == k and torch.equal(mn, rows.amin(1)) and torch.equal(mx, rows.amax(1))


def test_outlier_group_arguments():
    assert PerEmbeddingGroup(3, True, 4).sizes(12) == [4, 4, 4]
    assert PerEmbeddingGroup(2, True, 16).sizes(768) == [752, 16]
    assert PerEmbeddingGroup(2, True, 16).describe() == "peg(K=2, permuted, outlier group of 16)"
    with pytest.raises(ValueError, match="K >= 2"):
        PerEmbeddingGroup(1, True, 4)
    with pytest.raises(ValueError, match="divisible by K-1=2"):
        PerEmbeddingGroup(3, True, 5).check(12)
    with pytest.raises(ValueError, match="non-negative"):
        PerEmbeddingGroup(2, True, -1)


def test_group_index_from_perm():
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    idx = group_index_from_perm(perm, 3)
    # group 0 = dims {3, 0}, group 1 = {5, 1}, group 2 = {4, 2}
    assert idx.tolist() == [0, 1, 2, 0, 2, 1]
    with pytest.raises(ValueError, match="K=4"):
        group_index_from_perm(perm, 4)


@pytest.mark.parametrize("g", [PerTensor(), PerChannel(0), PerChannel(-2), PerEmbedding(),
                               PerEmbeddingGroup(6), PerEmbeddingGroup(6, permute=True),
                               PerEmbeddingGroup(2, permute=True, outliers=16)])
def test_to_from_dict(g):
    assert granularity_from_dict(g.to_dict()) == g
    hash(g)


def test_bad_granularity_arguments():
    with pytest.raises(ValueError, match="positive integer"):
        PerEmbeddingGroup(0)
    with pytest.raises(ValueError, match="positive integer"):
        PerEmbeddingGroup(2.5)
    with pytest.raises(ValueError, match="integer"):
        PerChannel(1.0)
    with pytest.raises(ValueError, match="allowed: tensor, channel, embedding, token, peg"):
        granularity_from_dict({"kind": "rows"})


# ----------------------------------------------------------------------------- dynamic per-token


@SETTINGS
@given(
    rows=st.integers(1, 6),
    d=st.integers(1, 40),
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-5, 5),
    seed=st.integers(0, 2**16),
    symmetric=st.booleans(),
)
def test_per_token_error_is_half_a_step_of_each_tokens_own_range(rows, d, scale, shift, seed, symmetric):
    """Every token (vector along the last axis) is quantized on the grid of its own range, taken at run time:
    no element clips, each is within half of *its token's* step, and a row never depends on another row."""
    from pegq.quant import PerToken, qparams_from_range

    x = _x((rows, 3, d), seed) * scale + shift
    x[0, 0] *= 50  # one loud token must not coarsen the others
    q = Quantizer("t", 8, symmetric, PerToken())
    q(x[:1])  # calibration (records a per-tensor range only)
    q.freeze()
    y = q(x)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s, _ = qparams_from_range(lo, hi, 8, symmetric)
    assert torch.all((y - x).abs() <= s / 2 * (1 + 1e-4) + 1e-6 * x.abs())
    alone = q(x[1:2, 1:2]) if rows > 1 else q(x[:1, 1:2])
    assert torch.equal(alone, y[1:2, 1:2] if rows > 1 else y[:1, 1:2])


def test_per_token_codes_fill_the_grid_and_round_trip():
    from pegq.quant import PerToken

    q = Quantizer("t", 8, False, PerToken())
    x = _x((2, 4, 64), 3, outlier_dim=5)
    q(x)
    q.freeze()
    s, z = q.token_qparams(x)
    assert s.shape == z.shape == (2, 4, 1)
    codes = torch.round(x / s) + z
    assert codes.min() >= 0 and codes.max() <= 255
    assert (codes.amax(-1) - codes.amin(-1)).min() >= 254  # every token spans (nearly) the whole grid
    assert granularity_from_dict(PerToken().to_dict()) == PerToken()
    assert q.num_qparams() == 2 and q.spec()["granularity"] == {"kind": "token"}


def test_per_token_has_no_range_to_learn():
    from pegq.quant import PerToken

    q = Quantizer("ffn.hidden", 8, False, PerToken())
    q(_x((2, 3, 8)))
    with pytest.raises(ValueError, match=r"ffn\.hidden: a per-token \(dynamic\) quantizer has no range to learn"):
        q.learn_ranges()


# ----------------------------------------------------------------------------- per-token, fixed zero-point


@SETTINGS
@given(
    rows=st.integers(1, 6),
    d=st.integers(2, 40),
    top=st.floats(1e-2, 1e3),
    floor=st.floats(0.0, 2.0),
    zero_point=st.integers(1, 128),
    seed=st.integers(0, 2**16),
)
def test_fixed_zero_point_rows_share_it_and_cover_their_max_and_the_calibrated_min(rows, d, top, floor, zero_point,
                                                                                  seed):
    """``PerToken(zero_point=z)``: every row's zero-point is ``z``; its scale is the smaller one that still puts the
    row's max on the top step (``max / (255 - z)``) and the calibrated min on the bottom one (``-min / z``): nothing
    at or above the calibrated min clips, every element is within half of its row's step, and 0 is exact."""
    from pegq.quant import PerToken

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, 3, d, generator=g) * (top + floor) - floor  # in [-floor, top)
    x[..., 0] = -floor  # the floor is reached in calibration (a GELU output's -0.17 is, in every row)
    x[..., 1] = 0.0
    q = Quantizer("t", 8, False, PerToken(zero_point=zero_point))
    q(x)
    q.freeze()
    s, z = q.token_qparams(x)
    assert torch.equal(z, torch.full_like(s, float(zero_point)))
    want = torch.maximum(x.amax(-1, keepdim=True).clamp_min(0) / (255 - zero_point), torch.tensor(floor / zero_point))
    assert torch.allclose(s, want.clamp_min(1e-8), rtol=1e-6)
    y = q(x)
    assert torch.all((y - x).abs() <= s / 2 * (1 + 1e-4) + 1e-6 * x.abs())
    assert torch.all(y[..., 1] == 0)
    codes = torch.round(x / s) + z
    assert codes.min() >= 0 and codes.max() <= 255
    # below the calibrated min the grid ends: such values clip to the bottom step
    low = q(torch.full((1, 1, d), -floor - 10 * float(s.max()) - 1.0))
    assert torch.all(low >= -zero_point * s.max() * (1 + 1e-5))


def test_fixed_zero_point_settings_are_checked_and_round_trip():
    from pegq.quant import PerToken

    g = PerToken(zero_point=64)
    assert granularity_from_dict(g.to_dict()) == g and g.to_dict() == {"kind": "token", "zero_point": 64}
    assert g.describe() == "token(zero_point=64)" and hash(g)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            PerToken(zero_point=bad)
    with pytest.raises(ValueError, match=r"ffn\.hidden: a fixed per-token zero-point \(64\) needs an asymmetric"):
        Quantizer("ffn.hidden", 8, True, g)
    with pytest.raises(ValueError, match=r"ffn\.hidden: a fixed per-token zero-point 64 is outside 1\.\.14"):
        Quantizer("ffn.hidden", 4, False, g)
    q = Quantizer("ffn.hidden", 8, False, g)
    with pytest.raises(ValueError, match=r"outside 1\.\.14, the inside of the 4-bit grid"):
        q.configure(bits=4)  # refused before anything changes
    assert q.bits == 8
    q.configure(bits=4, granularity=PerToken(zero_point=4))
    with pytest.raises(ValueError, match="needs the calibrated min; calibrate first"):
        q.token_qparams(torch.ones(2, 3))
