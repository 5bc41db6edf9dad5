"""Quantization granularity as types.

A granularity decides which elements of a tensor share one (scale, zero-point) pair:

* :class:`PerTensor`          -- one pair for the whole tensor (paper eq. 1-2).
* :class:`PerChannel`         -- one pair per index along ``axis`` (weights, usually axis 0).
* :class:`PerEmbedding`       -- one pair per index of the last dim (paper eq. 4).
* :class:`PerEmbeddingGroup`  -- ``groups`` pairs over the last dim, each shared by ``d/groups``
  embedding dims (paper eq. 5), optionally after a permutation of the dims (range-based
  permutation, paper section 4).

Every granularity knows how to lay a tensor out as a 2-D ``[C, N]`` view (one row per parameter
pair) for range estimation, and how to broadcast ``C`` parameters back onto the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Granularity:
    """Base class. Subclasses are frozen dataclasses (hashable, comparable, JSON-able)."""

    kind: str = "abstract"

    def num_params(self, shape: torch.Size) -> int:
        raise NotImplementedError

    def as_rows(self, x: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` as ``[C, N]``: row ``c`` holds every element sharing parameter pair ``c``."""
        raise NotImplementedError

    def broadcast(self, p: torch.Tensor, x: torch.Tensor, group_index: torch.Tensor | None = None):
        """Expand ``C`` parameters to a tensor broadcastable against ``x``."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


@dataclass(frozen=True)
class PerTensor(Granularity):
    kind = "tensor"

    def num_params(self, shape):
        return 1

    def as_rows(self, x, perm=None):
        return x.reshape(1, -1)

    def broadcast(self, p, x, group_index=None):
        return p.reshape(())

    def to_dict(self):
        return {"kind": self.kind}


@dataclass(frozen=True)
class PerChannel(Granularity):
    axis: int = 0
    kind = "channel"

    def _axis(self, x_ndim: int) -> int:
        return self.axis % x_ndim

    def num_params(self, shape):
        return int(shape[self.axis % len(shape)])

    def as_rows(self, x, perm=None):
        return x.movedim(self._axis(x.ndim), 0).reshape(x.shape[self._axis(x.ndim)], -1)

    def broadcast(self, p, x, group_index=None):
        a = self._axis(x.ndim)
        return p.reshape([-1] + [1] * (x.ndim - a - 1))

    def to_dict(self):
        return {"kind": self.kind, "axis": self.axis}

    def describe(self):
        return f"channel(axis={self.axis})"


@dataclass(frozen=True)
class PerEmbedding(Granularity):
    kind = "embedding"

    def num_params(self, shape):
        return int(shape[-1])

    def as_rows(self, x, perm=None):
        return x.reshape(-1, x.shape[-1]).t()

    def broadcast(self, p, x, group_index=None):
        return p

    def to_dict(self):
        return {"kind": self.kind}


@dataclass(frozen=True)
class PerEmbeddingGroup(Granularity):
    """``groups`` even groups over the last dim; with a permutation ``perm`` (held by the
    quantizer as a buffer, since it is data-dependent) group ``g`` is ``perm[g*d/K:(g+1)*d/K]``."""

    groups: int = 1
    permute: bool = False
    kind = "peg"

    def num_params(self, shape):
        return self.groups

    def check(self, d: int, name: str = "quantizer") -> None:
        if self.groups < 1 or d % self.groups:
            raise ValueError(
                f"{name}: PEG groups K={self.groups} must divide the embedding size d={d}; "
                f"allowed: a divisor of {d}"
            )

    def as_rows(self, x, perm=None):
        d = x.shape[-1]
        rows = x.reshape(-1, d).t()
        if perm is not None:
            rows = rows.index_select(0, perm)
        return rows.reshape(self.groups, -1)

    def broadcast(self, p, x, group_index=None):
        if group_index is None:
            d = x.shape[-1]
            return p.repeat_interleave(d // self.groups)
        return p.index_select(0, group_index)

    def to_dict(self):
        return {"kind": self.kind, "groups": self.groups, "permute": self.permute}

    def describe(self):
        return f"peg(K={self.groups}{', permuted' if self.permute else ''})"


def group_index_from_perm(perm: torch.Tensor, groups: int) -> torch.Tensor:
    """``index[j]`` = group of embedding dim ``j`` when groups are consecutive slices of ``perm``."""
    d = perm.numel()
    idx = torch.empty(d, dtype=torch.long, device=perm.device)
    idx[perm] = torch.arange(d, device=perm.device) // (d // groups)
    return idx


def granularity_from_dict(d: dict) -> Granularity:
    kind = d.get("kind", "tensor")
    if kind == "tensor":
        return PerTensor()
    if kind == "channel":
        return PerChannel(axis=int(d.get("axis", 0)))
    if kind == "embedding":
        return PerEmbedding()
    if kind == "peg":
        return PerEmbeddingGroup(groups=int(d["groups"]), permute=bool(d.get("permute", False)))
    raise ValueError(
        f"unknown granularity kind {kind!r}; allowed: tensor, channel, embedding, peg"
    )
