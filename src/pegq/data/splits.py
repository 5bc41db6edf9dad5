"""In-memory containers: :class:`Split` (columns of one split) and :class:`TaskData` (a loaded task).

A split is stored column-wise (``text_a``, optional ``text_b``, a numpy ``labels`` array: int64 class
ids for classification, float32 targets for regression). Indexing one row gives an :class:`Example`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, overload

import numpy as np

from .errors import DataError
from .tasks import TaskSpec

__all__ = ["Example", "Split", "TaskData"]


class Example(NamedTuple):
    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a task. ``labels`` is int64 (class ids) or float32 (regression)."""

    name: str
    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.text_a)
        if self.text_b is not None and len(self.text_b) != n:
            raise DataError(f"split {self.name!r}: {n} first texts but {len(self.text_b)} second texts")
        if len(self.labels) != n:
            raise DataError(f"split {self.name!r}: {n} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.text_a)

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> Split: ...

    def __getitem__(self, i):
        """``split[i]`` is an :class:`Example`; ``split[a:b]`` is a new :class:`Split` (e.g. the first N)."""
        if isinstance(i, slice):
            return self.select(range(len(self))[i])
        label = self.labels[i]
        label = float(label) if self.labels.dtype.kind == "f" else int(label)
        return Example(self.text_a[i], None if self.text_b is None else self.text_b[i], label)

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]

    @property
    def is_pair(self) -> bool:
        return self.text_b is not None

    def __repr__(self) -> str:
        kind = "regression" if self.labels.dtype.kind == "f" else "classification"
        return f"Split({self.name!r}, n={len(self)}, pair={self.is_pair}, {kind})"

    def select(self, indices: Sequence[int] | np.ndarray) -> Split:
        """A new split with the rows at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise DataError(f"split {self.name!r}: indices out of range for {len(self)} rows")
        return Split(
            name=self.name,
            text_a=[self.text_a[i] for i in idx],
            text_b=None if self.text_b is None else [self.text_b[i] for i in idx],
            labels=self.labels[idx].copy(),
        )


@dataclass(frozen=True, eq=False)
class TaskData:
    """A loaded task: its spec and its splits (``train`` is None when not requested)."""

    spec: TaskSpec
    train: Split | None = None
    dev: Split | None = None
    source: str = ""
    location: str = ""
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def split(self, name: str) -> Split:
        """``"train"`` or ``"dev"`` (aliases: ``"validation"``, ``"eval"``)."""
        key = {"validation": "dev", "eval": "dev", "val": "dev"}.get(name, name)
        if key not in ("train", "dev"):
            raise DataError(f"unknown split {name!r}; use 'train' or 'dev'")
        out = self.train if key == "train" else self.dev
        if out is None:
            raise DataError(
                f"task {self.spec.name!r}: split {key!r} was not loaded; pass splits=(..., {key!r})"
            )
        return out

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{k}={len(v)}" for k, v in (("train", self.train), ("dev", self.dev)) if v is not None
        )
        return f"TaskData({self.spec.name!r}, {sizes}, source={self.source!r})"
