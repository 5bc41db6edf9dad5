"""The pure statistics against hand-computed values on small tensors."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from pegq.analysis.stats import (
    DimRanges,
    Moments,
    OutlierCounts,
    attention_mass_on,
    attention_share,
    box_stats,
    dim_ranges,
    distribution_summary,
    head_slice,
    kurtosis,
    outlier_dims,
    outlier_mask,
    range_ratio,
    special_token_mask,
    suggest_peg_groups,
    token_ranges,
    top_qk_pair,
    valid_tokens,
)


# --------------------------------------------------------------------------- kurtosis / moments
def test_kurtosis_hand_computed():
    # [0,0,0,0,10]: mean 2, m2 = 80/5 = 16, m4 = (4*16 + 8^4)/5 = 832 -> 832/256 - 3 = 0.25
    assert kurtosis(torch.tensor([0.0, 0, 0, 0, 10])) == pytest.approx(0.25)
    # [1,2,3,4]: m2 = 1.25, m4 = 2.5625 -> 2.5625/1.5625 - 3 = -1.36
    assert kurtosis([1.0, 2, 3, 4]) == pytest.approx(-1.36)
    assert math.isnan(kurtosis(torch.ones(5)))


def test_kurtosis_matches_scipy_fisher_biased():
    x = np.random.default_rng(0).standard_t(3, size=1000)
    assert kurtosis(torch.tensor(x)) == pytest.approx(scipy.stats.kurtosis(x, fisher=True, bias=True))


def test_moments_streaming_equals_one_shot():
    rng = np.random.default_rng(1)
    parts = [rng.normal(i, 1 + i, size=(n, 3)) for i, n in enumerate((7, 1, 50, 3))]
    parts.append(np.array([[100.0, -50.0, 0.0]]))  # an outlier batch
    m = Moments()
    for p in parts:
        m.update(torch.tensor(p, dtype=torch.float32))
    a = np.concatenate(parts).astype(np.float32).astype(np.float64).ravel()
    assert m.n == a.size
    assert m.mean == pytest.approx(a.mean(), rel=1e-9)
    assert m.std == pytest.approx(a.std(), rel=1e-9)
    assert m.kurtosis == pytest.approx(scipy.stats.kurtosis(a), rel=1e-9)
    assert (m.min, m.max) == (a.min(), a.max())
    d = m.to_dict()
    assert d["range"] == pytest.approx(150.0)
    assert Moments().update(torch.zeros(0)).n == 0


# --------------------------------------------------------------------------- ranges, padding
def _padded():
    # 2 sequences of 3 tokens, d = 2; sequence 1 has 1 padding token with huge values
    x = torch.tensor(
        [
            [[1.0, 5.0], [-2.0, 2.0], [0.0, 0.5]],
            [[3.0, -1.0], [4.0, 4.0], [1000.0, -1000.0]],
        ]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return x, mask


def test_token_ranges_per_token_and_nan_at_padding():
    x, mask = _padded()
    r = token_ranges(x, mask)
    assert r[0].tolist() == [4.0, 4.0, 0.5]
    assert r[1, :2].tolist() == [4.0, 0.0]
    assert math.isnan(r[1, 2])


def test_dim_ranges_ignore_padding_and_stream():
    x, mask = _padded()
    # dim 0 over real tokens: {1,-2,0,3,4} -> 6; dim 1: {5,2,0.5,-1,4} -> 6
    assert dim_ranges(x, mask).tolist() == [6.0, 6.0]
    dr = DimRanges().update(x[:1], mask[:1]).update(x[1:], mask[1:])
    assert dr.ranges.tolist() == [6.0, 6.0]
    assert valid_tokens(x, mask).shape == (5, 2)


def test_range_ratio_and_summaries():
    assert range_ratio(torch.tensor([1.0, 2.0, 2.0, 3.0, 100.0])) == pytest.approx(50.0)
    s = distribution_summary([1.0, float("nan"), 3.0, 2.0])
    assert (s["count"], s["min"], s["median"], s["max"]) == (3, 1.0, 2.0, 3.0)
    b = box_stats(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), "1")
    assert (b["whislo"], b["q1"], b["med"], b["q3"], b["whishi"]) == (0.0, 1.0, 2.0, 3.0, 4.0)


# --------------------------------------------------------------------------- 6-sigma outliers
def _outlier_tensor():
    """1 sequence of 100 real tokens (+1 padding token), d = 4; two 100s in dim 2."""
    x = torch.zeros(1, 101, 4)
    x[0, 5, 2] = 100.0
    x[0, 7, 2] = 100.0
    x[0, 100, 0] = 1000.0  # padding: must be ignored everywhere
    mask = torch.ones(1, 101, dtype=torch.long)
    mask[0, 100] = 0
    return x, mask


def test_outlier_dims_hand_computed():
    x, mask = _outlier_tensor()
    # real tokens: mean = 200/400 = 0.5, E[x^2] = 20000/400 = 50, std = sqrt(49.75) = 7.053
    # 6 std = 42.3: |100 - 0.5| > 42.3 (outlier), |0 - 0.5| = 0.5 (not)
    assert outlier_dims(x, mask) == {2: 2}
    assert outlier_dims(x, mask, sigma=20.0) == {}  # 20 std = 141 > 99.5
    m = outlier_mask(torch.tensor([0.0, 42.0, 43.0, -43.0]), mean=0.0, std=7.0)
    assert m.tolist() == [False, False, True, True]


def test_outlier_counts_tokens_and_fractions():
    x, mask = _outlier_tensor()
    strings = [["tok"] * 101]
    strings[0][5], strings[0][7] = "[CLS]", "."
    mean, std = 0.5, math.sqrt(49.75)
    oc = OutlierCounts(d=4)
    # stream in two chunks along the batch: the same sequence twice
    om = oc.update(x, mean, std, mask, strings)
    oc.update(x, mean, std, mask, strings)
    assert om.shape == (1, 101, 4) and int(om.sum()) == 2
    assert oc.tokens == 200 and oc.tokens_with_outlier == 4
    d = oc.to_dict()
    assert d["num_dims"] == 1
    assert d["dims"] == [{"dim": 2, "count": 4, "fraction": 0.02, "tokens": {"[CLS]": 2, ".": 2}}]
    assert d["token_counts"] == {"[CLS]": 2, ".": 2}
    assert d["fraction_tokens"] == pytest.approx(0.02)


# --------------------------------------------------------------------------- attention
def _probs():
    """B=2, H=2, T=3. Sequence 0: [CLS] a [SEP]; sequence 1: [CLS] [SEP] [PAD]."""
    p = torch.zeros(2, 2, 3, 3)
    p[0, 0] = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]])
    p[0, 1] = torch.eye(3)
    p[1, 0] = torch.tensor([[0.3, 0.7, 0.0], [0.6, 0.4, 0.0], [0.2, 0.2, 0.6]])  # row 2: padding query
    p[1, 1] = torch.tensor([[0.5, 0.5, 0.0], [0.4, 0.4, 0.2], [0.0, 0.0, 1.0]])  # 0.2 on the padding key
    ids = torch.tensor([[101, 7, 102], [101, 102, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return p, ids, mask


def test_special_token_share_hand_computed():
    p, ids, mask = _probs()
    special = special_token_mask(ids, [101, 102, None])
    assert special.tolist() == [[True, False, True], [True, True, False]]
    # head 0: (0.8 + 0.9 + 0.4 + 1.0 + 1.0) / 5 = 0.82; head 1: (1 + 0 + 1 + 1 + 0.8) / 5 = 0.76
    share = attention_share(p, special, mask)
    assert share.tolist() == pytest.approx([0.82, 0.76])
    # marking the padding key as "special" changes nothing: padding keys never count
    pad_too = special | (ids == 0)
    assert attention_share(p, pad_too, mask).tolist() == pytest.approx([0.82, 0.76])
    # separator only ([SEP] = 102): head 0 (0.3+0.8+0.2+0.7+0.4)/5 = 0.48; head 1 (0+0+1+0.5+0.4)/5 = 0.38
    sep = special_token_mask(ids, [102])
    assert attention_share(p, sep, mask).tolist() == pytest.approx([0.48, 0.38])
    sums, n = attention_mass_on(p, sep, mask)
    assert n == 5 and sums.tolist() == pytest.approx([2.4, 1.9])


def test_top_qk_pair_and_head_slice():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    top = top_qk_pair(q, k)
    assert (top["query"], top["key"], top["score"]) == (0, 0, 3.0)
    assert top["contributions"].tolist() == [3.0, 0.0]
    top = top_qk_pair(q, k, valid=torch.tensor([0, 1]))
    assert (top["query"], top["key"], top["score"]) == (1, 1, 2.0)
    x = torch.arange(12.0).reshape(1, 1, 12)
    assert head_slice(x, 2, 4).flatten().tolist() == [6.0, 7.0, 8.0]
    with pytest.raises(ValueError, match="divisible"):
        head_slice(x, 0, 5)


# --------------------------------------------------------------------------- PEG suggestion
def test_suggest_peg_groups():
    r = np.ones(12)
    r[3], r[7] = 50.0, 40.0
    s = suggest_peg_groups(r, [3, 7])
    # divisors of 12 among candidates: 2, 3, 4, 6, 12; K >= 3 and both outliers in the widest group
    assert [row["K"] for row in s["table"]] == [2, 3, 4, 6, 12]
    assert s["K"] == 3 and s["group_size"] == 4
    assert s["table"][1]["widest_range_outside"] == 1.0
    # 6 outlier dims: only K = 2 (group of 6) holds them all
    r2 = np.ones(12)
    r2[:6] = 10.0
    assert suggest_peg_groups(r2, range(6))["K"] == 2
    # K = 4 (groups of 3) splits 4 outliers, K = 3 (groups of 4) holds them
    r3 = np.ones(12)
    r3[[0, 1, 2, 5]] = 9.0
    row = {t["K"]: t["outliers_fit"] for t in suggest_peg_groups(r3, [0, 1, 2, 5])["table"]}
    assert row == {2: True, 3: True, 4: False, 6: False, 12: False}
