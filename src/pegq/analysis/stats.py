"""Pure statistics on activation tensors (no model, no I/O); each is unit-tested on small tensors.

Conventions:

* hidden tensors are ``[B, T, d]`` (batch, tokens, embedding dims), attention probabilities
  ``[B, H, T, T]`` (batch, heads, query, key);
* ``attention_mask`` is ``[B, T]`` with 1 for real tokens and 0 for padding; padding never enters a
  statistic (``None`` = every token is real);
* kurtosis is Fisher's (excess; a normal distribution gives 0) with the biased (population) moment
  estimates, i.e. ``scipy.stats.kurtosis(x, fisher=True, bias=True)``; the standard deviation is
  the population one (``ddof=0``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

#: the paper's outlier criterion: |x - mean| > 6 standard deviations of the activation tensor
DEFAULT_SIGMA = 6.0


# --------------------------------------------------------------------------- masking helpers
def _mask(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]`` bool mask of real tokens for a ``[B, T, ...]`` tensor."""
    if attention_mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    m = attention_mask.to(device=x.device).bool()
    if m.shape != x.shape[:2]:
        raise ValueError(f"attention_mask shape {tuple(m.shape)} does not match tensor {tuple(x.shape)}")
    return m


def valid_tokens(x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The rows of a ``[B, T, d]`` tensor that belong to real tokens, as ``[N, d]``."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    return x[_mask(x, attention_mask)]


# --------------------------------------------------------------------------- moments
def kurtosis(x: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """Fisher (excess) kurtosis with biased moments, over all elements of ``x``."""
    a = torch.as_tensor(np.asarray(x, dtype=np.float64) if not torch.is_tensor(x) else x).double().flatten()
    if a.numel() == 0:
        return float("nan")
    d = a - a.mean()
    m2 = (d * d).mean()
    if m2 == 0:
        return float("nan")
    return float((d**4).mean() / (m2 * m2) - 3.0)


@dataclass
class Moments:
    """Streaming count, min, max, mean, std and kurtosis of every element seen.

    Batches are merged with the pairwise formulas for central moments (Chan et al.; Pébay 2008), so
    the result equals the one over the concatenation of all batches, without storing them.
    """

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def update(self, x: torch.Tensor) -> Moments:
        a = x.detach().double().flatten()
        nb = a.numel()
        if nb == 0:
            return self
        mb = float(a.mean())
        d = a - mb
        d2 = d * d
        m2b, m3b, m4b = float(d2.sum()), float((d2 * d).sum()), float((d2 * d2).sum())
        self.min = min(self.min, float(a.min()))
        self.max = max(self.max, float(a.max()))
        na = self.n
        if na == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = nb, mb, m2b, m3b, m4b
            return self
        n = na + nb
        delta = mb - self.mean
        m2a, m3a, m4a = self.m2, self.m3, self.m4
        self.m4 = (
            m4a
            + m4b
            + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6 * delta**2 * (na * na * m2b + nb * nb * m2a) / n**2
            + 4 * delta * (na * m3b - nb * m3a) / n
        )
        self.m3 = m3a + m3b + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * m2b - nb * m2a) / n
        self.m2 = m2a + m2b + delta**2 * na * nb / n
        self.mean = self.mean + delta * nb / n
        self.n = n
        return self

    @property
    def var(self) -> float:
        return self.m2 / self.n if self.n else float("nan")

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.n else float("nan")

    @property
    def kurtosis(self) -> float:
        if not self.n or self.m2 == 0:
            return float("nan")
        return self.n * self.m4 / (self.m2 * self.m2) - 3.0

    def to_dict(self) -> dict:
        return {
            "count": self.n,
            "min": self.min,
            "max": self.max,
            "range": self.max - self.min,
            "mean": self.mean,
            "std": self.std,
            "kurtosis": self.kurtosis,
        }


# --------------------------------------------------------------------------- ranges
def token_ranges(x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token range ``max_j x[b, t, j] - min_j x[b, t, j]`` as ``[B, T]``; NaN at padding."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    r = (x.amax(dim=-1) - x.amin(dim=-1)).float()
    return r.masked_fill(~_mask(x, attention_mask), float("nan"))


def dim_min_max(
    x: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-embedding-dim min and max over the real tokens (``[d]`` each; +inf/-inf if none)."""
    v = valid_tokens(x, attention_mask)
    if v.shape[0] == 0:
        d = x.shape[-1]
        return torch.full((d,), math.inf), torch.full((d,), -math.inf)
    return v.amin(dim=0).double(), v.amax(dim=0).double()


def dim_ranges(x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-embedding-dim range ``r_j = max(x[:, j]) - min(x[:, j])`` over the real tokens (paper §4)."""
    lo, hi = dim_min_max(x, attention_mask)
    return hi - lo


@dataclass
class DimRanges:
    """Streaming per-embedding-dim min/max (the record behind range-based permutation)."""

    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> DimRanges:
        lo, hi = dim_min_max(x, attention_mask)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        return self

    @property
    def ranges(self) -> torch.Tensor:
        return self.hi - self.lo


def distribution_summary(values: Iterable[float] | np.ndarray | torch.Tensor) -> dict:
    """min / median / mean / 99th percentile / max of a set of numbers (NaNs dropped)."""
    if torch.is_tensor(values):
        values = values.detach().cpu().double().numpy()
    elif not isinstance(values, np.ndarray):
        values = list(values)
    a = np.asarray(values, dtype=np.float64).ravel()
    a = a[~np.isnan(a)]
    if a.size == 0:
        return {"count": 0, "min": None, "median": None, "mean": None, "p99": None, "max": None}
    return {
        "count": int(a.size),
        "min": float(a.min()),
        "median": float(np.median(a)),
        "mean": float(a.mean()),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def range_ratio(ranges: torch.Tensor | np.ndarray) -> float:
    """max / median of per-dim ranges: how far the widest dims stand out (1 = uniform)."""
    r = np.asarray(ranges.cpu() if torch.is_tensor(ranges) else ranges, dtype=np.float64)
    med = float(np.median(r))
    return float(r.max() / med) if med > 0 else float("inf")


def box_stats(x: torch.Tensor, label: str = "") -> dict:
    """Five-number summary of all values of ``x`` (whiskers = min/max) for ``Axes.bxp``."""
    a = x.detach().double().flatten()
    if a.numel() == 0:
        return {"label": label, "whislo": 0.0, "q1": 0.0, "med": 0.0, "q3": 0.0, "whishi": 0.0, "fliers": []}
    q = torch.quantile(a[: 2**24], torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {
        "label": label,
        "whislo": float(a.min()),
        "q1": float(q[0]),
        "med": float(q[1]),
        "q3": float(q[2]),
        "whishi": float(a.max()),
        "fliers": [],
    }


# --------------------------------------------------------------------------- 6-sigma outliers
def outlier_mask(x: torch.Tensor, mean: float, std: float, sigma: float = DEFAULT_SIGMA) -> torch.Tensor:
    """Bool tensor, True where ``|x - mean| > sigma * std`` (the paper's dark cells in Fig. 2b)."""
    return (x.double() - mean).abs() > sigma * std


@dataclass
class OutlierCounts:
    """Per-dim outlier counts and which tokens carry them, accumulated over batches."""

    d: int
    tokens: int = 0  # real tokens seen
    tokens_with_outlier: int = 0  # real tokens with at least one outlier dim
    dim_counts: torch.Tensor = None  # [d] tokens in which dim j is an outlier
    dim_token_counts: dict[int, Counter] = field(default_factory=dict)  # dim -> token string -> count
    token_counts: Counter = field(default_factory=Counter)  # token string -> tokens with any outlier
    position_counts: Counter = field(default_factory=Counter)  # position in sequence -> count

    def __post_init__(self):
        if self.dim_counts is None:
            self.dim_counts = torch.zeros(self.d, dtype=torch.long)

    def update(
        self,
        x: torch.Tensor,
        mean: float,
        std: float,
        attention_mask: torch.Tensor | None = None,
        token_strings: Sequence[Sequence[str]] | None = None,
        sigma: float = DEFAULT_SIGMA,
    ) -> torch.Tensor:
        """Count a ``[B, T, d]`` batch; returns its ``[B, T, d]`` outlier mask (False at padding)."""
        if x.dim() == 2:
            x = x.unsqueeze(0)
        valid = _mask(x, attention_mask)
        om = outlier_mask(x, mean, std, sigma) & valid.unsqueeze(-1)
        self.tokens += int(valid.sum())
        self.dim_counts += om.sum(dim=(0, 1)).cpu()
        any_tok = om.any(dim=-1)
        self.tokens_with_outlier += int(any_tok.sum())
        for b, t in any_tok.nonzero().tolist():
            s = token_strings[b][t] if token_strings is not None else f"pos{t}"
            self.token_counts[s] += 1
            self.position_counts[t] += 1
        for b, t, j in om.nonzero().tolist():
            s = token_strings[b][t] if token_strings is not None else f"pos{t}"
            self.dim_token_counts.setdefault(j, Counter())[s] += 1
        return om

    def top_dims(self, k: int = 10) -> list[dict]:
        """The ``k`` dims that are outliers in the most tokens (only dims with a count > 0)."""
        order = torch.argsort(self.dim_counts, descending=True, stable=True)[:k].tolist()
        out = []
        for j in order:
            c = int(self.dim_counts[j])
            if c == 0:
                break
            out.append(
                {
                    "dim": j,
                    "count": c,
                    "fraction": c / self.tokens if self.tokens else 0.0,
                    "tokens": dict(self.dim_token_counts.get(j, Counter()).most_common(5)),
                }
            )
        return out

    def to_dict(self, k: int = 10) -> dict:
        return {
            "num_dims": int((self.dim_counts > 0).sum()),
            "tokens": self.tokens,
            "tokens_with_outlier": self.tokens_with_outlier,
            "fraction_tokens": self.tokens_with_outlier / self.tokens if self.tokens else 0.0,
            "dims": self.top_dims(k),
            "token_counts": dict(self.token_counts.most_common(10)),
            "position_counts": {str(p): c for p, c in self.position_counts.most_common(5)},
        }


def outlier_dims(
    x: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    sigma: float = DEFAULT_SIGMA,
    mean: float | None = None,
    std: float | None = None,
) -> dict[int, int]:
    """``{dim: number of real tokens where it is a sigma-outlier}``; mean/std default to the tensor's
    own (over real tokens, population std)."""
    v = valid_tokens(x, attention_mask).double()
    if mean is None:
        mean = float(v.mean())
    if std is None:
        std = float(v.std(unbiased=False))
    counts = outlier_mask(v, mean, std, sigma).sum(dim=0)
    return {int(j): int(counts[j]) for j in counts.nonzero().flatten().tolist()}


# --------------------------------------------------------------------------- attention
def special_token_mask(input_ids: torch.Tensor, special_ids: Iterable[int]) -> torch.Tensor:
    """``[B, T]`` bool: the token is one of ``special_ids``."""
    ids = torch.as_tensor(sorted({int(i) for i in special_ids if i is not None}), dtype=input_ids.dtype)
    if ids.numel() == 0:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    return torch.isin(input_ids, ids.to(input_ids.device))


def attention_mass_on(
    probs: torch.Tensor, key_mask: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Sum over real query tokens of the probability mass each head puts on keys in ``key_mask``.

    ``probs`` ``[B, H, T, T]``, ``key_mask`` ``[B, T]`` bool, ``attention_mask`` ``[B, T]``.
    Returns (``[H]`` sums, number of real query tokens); their ratio is the per-head average share.
    Padding keys are excluded from the mass even if ``key_mask`` marks them.
    """
    B, H, T, _ = probs.shape
    valid = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    keys = (key_mask.bool().cpu() & valid).to(probs.dtype)  # [B, T]
    mass = (probs.detach().cpu() * keys[:, None, None, :]).sum(dim=-1)  # [B, H, Tq]
    mass = mass * valid[:, None, :].to(probs.dtype)
    return mass.sum(dim=(0, 2)).double(), int(valid.sum())


def attention_share(
    probs: torch.Tensor, key_mask: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-head share of attention on ``key_mask`` keys, averaged over real query tokens (``[H]``)."""
    s, n = attention_mass_on(probs, key_mask, attention_mask)
    return s / max(n, 1)


# --------------------------------------------------------------------------- query-key
def head_slice(x: torch.Tensor, head: int, num_heads: int) -> torch.Tensor:
    """The ``head``-th slice of a ``[..., d]`` projection (``d / num_heads`` dims)."""
    d = x.shape[-1]
    if d % num_heads:
        raise ValueError(f"hidden size {d} is not divisible by {num_heads} heads")
    dh = d // num_heads
    return x[..., head * dh : (head + 1) * dh]


def top_qk_pair(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
    """For one head of one sequence (``q``, ``k``: ``[T, dh]``), the (query i, key j) with the
    highest score ``q_i . k_j`` over real tokens, and its element-wise contributions ``q_i * k_j``."""
    T = q.shape[0]
    scores = q.double() @ k.double().T
    if valid is not None:
        v = valid.bool()
        scores = scores.masked_fill(~(v[:, None] & v[None, :]), -math.inf)
    flat = int(torch.argmax(scores))
    i, j = divmod(flat, T)
    contrib = q[i].double() * k[j].double()
    return {"query": i, "key": j, "score": float(scores[i, j]), "contributions": contrib}


# --------------------------------------------------------------------------- recommendations
def divisors_in(d: int, candidates: Iterable[int]) -> list[int]:
    return [k for k in candidates if 1 < k <= d and d % k == 0]


DEFAULT_K_CANDIDATES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def suggest_peg_groups(
    ranges: torch.Tensor | np.ndarray | Sequence[float],
    outlier_dims: Iterable[int],
    candidates: Iterable[int] = DEFAULT_K_CANDIDATES,
    min_groups: int = 3,
) -> dict:
    """Suggest K for per-embedding-group quantization with range-based permutation.

    With the permutation the dims are sorted by range (``argsort(r)``) and cut into K groups of
    ``d/K``; the outliers all land in the last group iff they are among the ``d/K`` widest dims and
    there are at most ``d/K`` of them. The suggestion is the smallest K (among ``candidates`` that
    divide d, and at least ``min_groups``: with K = 2 half of all dims would share the outliers'
    scale; the paper finds K = 3 + permutation already recovers most accuracy and uses K = 6) for
    which every outlier dim fits into that one group. ``table`` gives, per K, whether they fit and
    the widest range left outside the outlier group.
    """
    r = torch.as_tensor(np.asarray(ranges, dtype=np.float64))
    d = r.numel()
    outs = sorted({int(j) for j in outlier_dims})
    order = torch.argsort(r, stable=True)  # ascending, as the quantizer's range-based permutation
    table = []
    chosen = None
    for k in divisors_in(d, candidates):
        g = d // k
        top = set(order[-g:].tolist())
        fits = all(j in top for j in outs)
        rest = float(r[order[:-g]].max()) if g < d else 0.0
        table.append({"K": k, "group_size": g, "outliers_fit": fits, "widest_range_outside": rest})
        if chosen is None and fits and k >= min_groups:
            chosen = k
    if chosen is None:
        fitting = [row["K"] for row in table if row["outliers_fit"]]
        chosen = fitting[-1] if fitting else (table[-1]["K"] if table else d)
    return {"K": chosen, "group_size": d // chosen, "d": d, "outlier_dims": outs, "table": table}
