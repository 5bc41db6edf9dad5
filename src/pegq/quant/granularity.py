"""Quantization granularity as types (paper sections 2 and 4).

A granularity decides which elements of a tensor share one (scale, zero-point) pair:

* :class:`PerTensor`          -- one pair for the whole tensor (paper eq. 1-2).
* :class:`PerChannel`         -- one pair per index along ``axis`` (weights, usually axis 0;
  Krishnamoorthi 2018).
* :class:`PerEmbedding`       -- one pair per index of the last dim: eq. (1)-(2) broadcast along the
  embedding dimension (paper section 4, the scheme behind eq. 4).
* :class:`PerToken`          -- dynamic: one pair per vector along the last axis (one token's
  embedding), computed from the tensor itself at every forward (not in the paper: SmoothQuant's
  per-token dynamic activation quantization). Calibration only records the tensor's range.
* :class:`PerEmbeddingGroup`  -- PEG, ``groups`` (the paper's ``K``) pairs over the last dim, each
  shared by ``d/K`` embedding dims (paper eq. 5), optionally after a permutation of the dims
  (range-based permutation, paper section 4: ``argsort`` of the per-dim ranges
  ``r_j = max(x_:,j) - min(x_:,j)``, see :func:`range_permutation`). ``K=1`` is per-tensor and
  ``K=d`` is per-embedding.

Every granularity knows how to lay a tensor out as a 2-D ``[C, N]`` view (one row per parameter
pair) for range estimation (:meth:`Granularity.as_rows`), how to get the per-row min/max without
materialising that view (:meth:`Granularity.minmax`, the hot path of range estimation), and how to
broadcast ``C`` parameters back onto the tensor. A permuted PEG is simulated without moving data:
a ``group_index`` maps every embedding dim to its group (:func:`group_index_from_perm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Granularity:
    """Base class. Subclasses are frozen dataclasses (hashable, comparable, JSON-able)."""

    kind: str = "abstract"

    def num_params(self, shape: torch.Size) -> int:
        raise NotImplementedError

    def check(self, shape_or_d, name: str = "quantizer") -> None:
        """Raise ``ValueError`` (naming quantizer ``name``) if a tensor of this shape cannot be used."""

    def as_rows(self, x: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` as ``[C, N]``: row ``c`` holds every element sharing parameter pair ``c``."""
        raise NotImplementedError

    def minmax(
        self, x: torch.Tensor, perm: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(min, max)``, each ``[C]``; same as ``as_rows(x, perm)`` reduced over dim 1."""
        rows = self.as_rows(x, perm)
        return rows.amin(1), rows.amax(1)

    def broadcast(self, p: torch.Tensor, x: torch.Tensor, group_index: torch.Tensor | None = None):
        """Expand ``C`` parameters to a tensor broadcastable against ``x``."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind

    #: True when the (scale, zero-point) pairs are computed from each tensor at run time (:class:`PerToken`)
    dynamic = False


@dataclass(frozen=True)
class PerTensor(Granularity):
    kind = "tensor"

    def num_params(self, shape):
        return 1

    def as_rows(self, x, perm=None):
        return x.reshape(1, -1)

    def minmax(self, x, perm=None):
        return x.amin().reshape(1), x.amax().reshape(1)

    def broadcast(self, p, x, group_index=None):
        return p.reshape(())

    def to_dict(self):
        return {"kind": self.kind}


@dataclass(frozen=True)
class PerToken(Granularity):
    """Dynamic per-token quantization: every vector along the last axis gets its own range, taken from the
    tensor at every forward (so nothing clips). Range estimation (calibration) records the per-tensor range,
    for reports only; the quantizer never uses it to quantize.

    ``zero_point`` (asymmetric quantizers only): every row shares this one integer zero-point ``z`` instead of its
    own, so an integer matmul reading the codes needs no per-row zero-point correction. A row's scale is then the
    smallest that puts both its max on the grid's top (``max / (qmax - z)``) and the calibrated per-tensor min on
    its bottom (``-min / z``): nothing above the calibrated min clips, and 0 stays exact. Meant for tensors with a
    small fixed floor and varying tops, such as a GELU output (min -0.17 whatever the row)."""

    zero_point: int | None = None
    kind = "token"
    dynamic = True

    def __post_init__(self):
        z = self.zero_point
        if z is not None and (isinstance(z, bool) or not isinstance(z, int) or z < 1):
            raise ValueError(f"PerToken zero_point must be a positive integer (or None), got {z!r}")

    def num_params(self, shape):
        return 1

    def check(self, shape_or_d, name="quantizer"):
        if not isinstance(shape_or_d, int) and len(shape_or_d) == 0:
            raise ValueError(f"{name}: per-token quantization needs a tensor with at least one dim")

    def as_rows(self, x, perm=None):
        return x.reshape(1, -1)

    def minmax(self, x, perm=None):
        return x.amin().reshape(1), x.amax().reshape(1)

    def token_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``(min, max)``, each shaped like ``x`` with the last dim 1."""
        return x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)

    def broadcast(self, p, x, group_index=None):
        return p.reshape(())

    def to_dict(self):
        return {"kind": self.kind, **({"zero_point": self.zero_point} if self.zero_point is not None else {})}

    def describe(self):
        return self.kind if self.zero_point is None else f"token(zero_point={self.zero_point})"


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One pair per index along ``axis`` (negative axes count from the end)."""

    axis: int = 0
    kind = "channel"

    def __post_init__(self):
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise ValueError(f"PerChannel axis must be an integer, got {self.axis!r}")

    def _axis(self, x_ndim: int) -> int:
        return self.axis % x_ndim

    def check(self, shape_or_d, name: str = "quantizer") -> None:
        ndim = len(shape_or_d) if not isinstance(shape_or_d, int) else 1
        if not -ndim <= self.axis < ndim:
            raise ValueError(
                f"{name}: per-channel axis {self.axis} is out of range for a tensor of shape "
                f"{tuple(shape_or_d) if not isinstance(shape_or_d, int) else (shape_or_d,)}; "
                f"allowed: {-ndim}..{ndim - 1}"
            )

    def num_params(self, shape):
        return int(shape[self.axis % len(shape)])

    def as_rows(self, x, perm=None):
        return x.movedim(self._axis(x.ndim), 0).reshape(x.shape[self._axis(x.ndim)], -1)

    def minmax(self, x, perm=None):
        a = self._axis(x.ndim)
        dims = tuple(i for i in range(x.ndim) if i != a)
        if not dims:
            return x.clone(), x.clone()
        return x.amin(dim=dims), x.amax(dim=dims)

    def broadcast(self, p, x, group_index=None):
        a = self._axis(x.ndim)
        return p.reshape([-1] + [1] * (x.ndim - a - 1))

    def to_dict(self):
        return {"kind": self.kind, "axis": self.axis}

    def describe(self):
        return f"channel(axis={self.axis})"


def _embedding_minmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # amin/amax over dim 0 are ~10x faster than aminmax(dim=0) or reducing the transposed view
    x2 = x.reshape(-1, x.shape[-1])
    return x2.amin(0), x2.amax(0)


@dataclass(frozen=True)
class PerEmbedding(Granularity):
    kind = "embedding"

    def num_params(self, shape):
        return int(shape[-1])

    def as_rows(self, x, perm=None):
        return x.reshape(-1, x.shape[-1]).t()

    def minmax(self, x, perm=None):
        return _embedding_minmax(x)

    def broadcast(self, p, x, group_index=None):
        return p

    def to_dict(self):
        return {"kind": self.kind}


@dataclass(frozen=True)
class PerEmbeddingGroup(Granularity):
    """``groups`` groups over the last dim; with a permutation ``perm`` (held by the quantizer as a
    buffer, since it is data-dependent) group ``g`` is the ``g``-th slice of ``perm`` (see :meth:`sizes`).

    ``permute`` records that a range-based permutation is wanted; computing it (from FP32
    calibration ranges, :func:`range_permutation`) and handing it to
    :meth:`pegq.quant.Quantizer.set_permutation` is up to the caller. Without a permutation the
    groups are consecutive slices of the embedding dims.

    ``outliers`` (not in the paper, which uses even groups): when > 0 the last group holds only that
    many dims, which after the range-based permutation are the ``outliers`` dims with the largest
    ranges, and the other ``groups - 1`` groups split the remaining dims evenly. ``peg2po16`` thus
    gives the 16 outlier dims their own range and every other dim one shared, narrow range: a
    2-way split of the next matmul instead of K-way (pegq.export.rewrite).
    """

    groups: int = 1
    permute: bool = False
    outliers: int = 0
    kind = "peg"

    def __post_init__(self):
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"PEG groups K must be a positive integer, got {self.groups!r}")
        if isinstance(self.outliers, bool) or not isinstance(self.outliers, int) or self.outliers < 0:
            raise ValueError(f"PEG outlier group size must be a non-negative integer, got {self.outliers!r}")
        if self.outliers and self.groups < 2:
            raise ValueError(
                f"a PEG outlier group of {self.outliers} dims needs K >= 2 groups (the others hold the "
                f"remaining dims), got K={self.groups}"
            )

    def sizes(self, d: int) -> list[int]:
        """Number of embedding dims in each group, in group order (sums to ``d``)."""
        self.check(d)
        if not self.outliers:
            return [d // self.groups] * self.groups
        return [(d - self.outliers) // (self.groups - 1)] * (self.groups - 1) + [self.outliers]

    def check(self, shape_or_d, name: str = "quantizer") -> None:
        d = shape_or_d if isinstance(shape_or_d, int) else int(shape_or_d[-1])
        if self.outliers:
            if not self.outliers < d or (d - self.outliers) % (self.groups - 1):
                raise ValueError(
                    f"{name}: a PEG outlier group of {self.outliers} dims must leave d={d} minus it "
                    f"divisible by K-1={self.groups - 1}; allowed: outliers < d with (d - outliers) a "
                    f"multiple of {self.groups - 1}"
                )
        elif d % self.groups:
            raise ValueError(
                f"{name}: PEG groups K={self.groups} must divide the embedding size d={d}; "
                f"allowed: a divisor of {d}"
            )

    def num_params(self, shape):
        return self.groups

    def as_rows(self, x, perm=None):
        """Even groups: the ``[K, N]`` view. Unequal groups (``outliers``): each row is its group's
        elements repeated cyclically to the longest group's length, so that a per-row mean (the MSE
        range search) weighs the group's elements as the group itself does."""
        d = x.shape[-1]
        rows = x.reshape(-1, d).t()
        if perm is not None:
            rows = rows.index_select(0, perm)
        if not self.outliers:
            return rows.reshape(self.groups, -1)
        parts = [p.reshape(-1) for p in rows.split(self.sizes(d), dim=0)]
        n = max(p.numel() for p in parts)
        return torch.stack([p.index_select(0, torch.arange(n, device=p.device) % p.numel()) for p in parts])

    def minmax(self, x, perm=None):
        mn, mx = _embedding_minmax(x)
        if perm is not None:
            mn, mx = mn.index_select(0, perm), mx.index_select(0, perm)
        if not self.outliers:
            return mn.view(self.groups, -1).amin(1), mx.view(self.groups, -1).amax(1)
        sizes = self.sizes(mn.numel())
        return (torch.stack([t.amin() for t in mn.split(sizes)]),
                torch.stack([t.amax() for t in mx.split(sizes)]))

    def broadcast(self, p, x, group_index=None):
        if group_index is None:
            d = x.shape[-1]
            if not self.outliers:
                return p.repeat_interleave(d // self.groups)
            return p.repeat_interleave(torch.tensor(self.sizes(d), device=p.device))
        return p.index_select(0, group_index)

    def to_dict(self):
        d = {"kind": self.kind, "groups": self.groups, "permute": self.permute}
        if self.outliers:
            d["outliers"] = self.outliers
        return d

    def describe(self):
        extra = (", permuted" if self.permute else "") + (
            f", outlier group of {self.outliers}" if self.outliers else "")
        return f"peg(K={self.groups}{extra})"


def group_index_from_perm(perm: torch.Tensor, groups: int, sizes: list[int] | None = None) -> torch.Tensor:
    """``index[j]`` = group of embedding dim ``j`` when groups are consecutive slices of ``perm``
    (even slices, or of the given ``sizes``)."""
    d = perm.numel()
    if sizes is None:
        if groups < 1 or d % groups:
            raise ValueError(f"PEG groups K={groups} must divide the permutation size d={d}")
        sizes = [d // groups] * groups
    if len(sizes) != groups or sum(sizes) != d:
        raise ValueError(f"PEG group sizes {sizes} must be K={groups} numbers summing to d={d}")
    idx = torch.empty(d, dtype=torch.long, device=perm.device)
    idx[perm] = torch.repeat_interleave(torch.arange(groups, device=perm.device),
                                        torch.tensor(sizes, device=perm.device))
    return idx


def range_permutation(x_min: torch.Tensor, x_max: torch.Tensor | None = None) -> torch.Tensor:
    """Range-based permutation (paper section 4): ``argsort(r)`` with ``r_j = max_j - min_j``.

    Call as ``range_permutation(x_min, x_max)`` with per-embedding-dim ranges (e.g. FP32
    calibration ``PerEmbedding().minmax(x)``) or as ``range_permutation(r)`` with the ranges
    themselves. The dims with the largest ranges (the outliers) end up together in the last group.
    The sort is stable, so ties keep their original order (deterministic).
    """
    r = torch.as_tensor(x_min) if x_max is None else torch.as_tensor(x_max) - torch.as_tensor(x_min)
    return torch.sort(r.flatten(), stable=True).indices


def granularity_from_dict(d: dict) -> Granularity:
    kind = d.get("kind", "tensor")
    if kind == "tensor":
        return PerTensor()
    if kind == "channel":
        return PerChannel(axis=int(d.get("axis", 0)))
    if kind == "embedding":
        return PerEmbedding()
    if kind == "token":
        z = d.get("zero_point")
        return PerToken(zero_point=None if z is None else int(z))
    if kind == "peg":
        return PerEmbeddingGroup(groups=int(d["groups"]), permute=bool(d.get("permute", False)),
                                 outliers=int(d.get("outliers", 0)))
    raise ValueError(
        f"unknown granularity kind {kind!r}; allowed: tensor, channel, embedding, token, peg"
    )
