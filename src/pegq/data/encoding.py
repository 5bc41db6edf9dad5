"""Tokenisation to fixed-length tensors, DataLoaders, and seeded subsets.

Encoding (appendix B.1 of the paper): every example is tokenised with the model's Hugging Face
tokenizer -- sentence pairs as pairs (``[CLS] a [SEP] b [SEP]`` for BERT, token type ids 0/1) --
truncated (``longest_first`` for pairs) and padded with the tokenizer's pad token (``[PAD]``) to
``max_length=128``. The result, :class:`EncodedDataset`, holds int64 tensors ``input_ids``,
``attention_mask``, ``token_type_ids`` (only when the tokenizer produces them) and ``labels`` (int64
class ids, or float32 regression targets), all ``[N, 128]`` except ``labels`` ``[N]``.

Batches are dicts of tensors that can be passed as ``model(**batch)``. :class:`EncodedDataset`
implements ``__getitems__``, so a DataLoader fetches a whole batch with one tensor index.

Subsets: :func:`subset_indices` ``(N, n, seed)`` = the first ``n`` entries of
``numpy.random.default_rng(seed).permutation(N)``. For one seed the subsets are nested (the 16-example
subset is the start of the 256-example one) and their order is random, so a calibration run with seed
``s`` sees the same examples in the same order every time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from .errors import DataError
from .splits import Split
from .tasks import TaskSpec

__all__ = [
    "MAX_LENGTH",
    "EncodedDataset",
    "encode",
    "make_dataloader",
    "make_loader",
    "random_subset",
    "sample",
    "subset_indices",
]

MAX_LENGTH = 128


class EncodedDataset(Dataset):
    """Tensors of one encoded split; ``ds[i]`` is a dict of per-example tensors."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        if "input_ids" not in tensors:
            raise DataError(f"EncodedDataset needs 'input_ids', got {sorted(tensors)}")
        n = tensors["input_ids"].shape[0]
        for k, v in tensors.items():
            if v.shape[0] != n:
                raise DataError(f"EncodedDataset: {k!r} has {v.shape[0]} rows, input_ids has {n}")
        self.tensors: dict[str, torch.Tensor] = dict(tensors)

    def __len__(self) -> int:
        return int(self.tensors["input_ids"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {k: v.index_select(0, idx) for k, v in self.tensors.items()}

    @property
    def columns(self) -> list[str]:
        return list(self.tensors)

    def select(self, indices: Sequence[int] | np.ndarray) -> EncodedDataset:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise DataError(f"EncodedDataset.select: indices out of range for {len(self)} rows")
        return EncodedDataset({k: v.index_select(0, idx) for k, v in self.tensors.items()})

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.tensors.items())
        return f"EncodedDataset({shapes})"


def _check_against_spec(split: Split, spec: TaskSpec) -> None:
    is_float = split.labels.dtype.kind == "f"
    if spec.is_regression != is_float:
        want = "float regression targets" if spec.is_regression else "integer class ids"
        raise DataError(
            f"encode: task {spec.name!r} needs {want}, split {split.name!r} has {split.labels.dtype}"
        )
    if spec.is_pair != split.is_pair:
        raise DataError(
            f"encode: task {spec.name!r} has {len(spec.text_fields)} text field(s), "
            f"split {split.name!r} has {2 if split.is_pair else 1}"
        )
    if not is_float and len(split) and (split.labels.min() < 0 or split.labels.max() >= spec.num_labels):
        raise DataError(f"encode: split {split.name!r} has labels outside 0..{spec.num_labels - 1}")


def encode(
    split: Split,
    tokenizer,
    spec: TaskSpec | None = None,
    max_length: int = MAX_LENGTH,
    *,
    chunk_size: int = 8192,
) -> EncodedDataset:
    """Tokenise a :class:`~pegq.data.Split`: truncate and pad to ``max_length`` (see module docstring).

    ``spec`` (optional, e.g. ``task.spec``) checks that the split fits the task: label kind, number of
    texts, label range.
    """
    if not isinstance(split, Split):
        raise DataError(f"encode: expected a pegq.data.Split (e.g. task.dev), got {type(split).__name__}")
    if spec is not None and not isinstance(spec, TaskSpec):
        raise DataError(
            f"encode: the third argument is the task spec (e.g. task.spec), got {type(spec).__name__}; "
            "pass max_length= by keyword"
        )
    if len(split) == 0:
        raise DataError(f"encode: split {split.name!r} is empty; nothing to encode")
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"encode: max_length must be an integer >= 2, got {max_length!r}")
    if spec is not None:
        _check_against_spec(split, spec)
    if getattr(tokenizer, "pad_token", None) is None:
        raise DataError("encode: the tokenizer has no pad token; set tokenizer.pad_token before encoding")

    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(split), chunk_size):
        a = split.text_a[start : start + chunk_size]
        b = None if split.text_b is None else split.text_b[start : start + chunk_size]
        enc = tokenizer(
            a,
            b,
            truncation=True,
            padding="max_length",
            max_length=max_length,
            return_tensors="np",
        )
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            if k in enc:
                parts.setdefault(k, []).append(np.asarray(enc[k], dtype=np.int64))
    tensors = {k: torch.from_numpy(np.concatenate(v, axis=0)) for k, v in parts.items()}
    if tensors["input_ids"].shape[1] != max_length:  # pragma: no cover - tokenizer contract
        raise DataError(
            f"encode: tokenizer returned length {tensors['input_ids'].shape[1]}, not {max_length}"
        )
    if split.labels.dtype.kind == "f":
        tensors["labels"] = torch.from_numpy(split.labels.astype(np.float32))
    else:
        tensors["labels"] = torch.from_numpy(split.labels.astype(np.int64))
    return EncodedDataset(tensors)


def _collate(batch):
    """A dict from ``__getitems__`` is already a batch; otherwise torch's default collation."""
    if isinstance(batch, Mapping):
        return dict(batch)
    return default_collate(batch)


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader of dict batches; ``shuffle`` order from ``torch.Generator().manual_seed(seed)``.

    Use ``shuffle=True`` for training, ``False`` (in order) for evaluation.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"make_dataloader: batch_size must be a positive integer, got {batch_size!r}")
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=_collate,
    )


def subset_indices(n_total: int, n: int, seed: int) -> np.ndarray:
    """The first ``n`` of ``numpy.random.default_rng(seed).permutation(n_total)`` (int64)."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"subset: n must be a positive integer, got {n!r}")
    if n > n_total:
        raise DataError(f"subset: asked for {n} examples but the data has only {n_total}; lower n")
    return np.random.default_rng(seed).permutation(n_total)[:n].astype(np.int64)


def random_subset(data, n: int, seed: int):
    """A deterministic random subset of ``n`` examples (e.g. calibration data, ``seed`` = sampling seed).

    :class:`Split` and :class:`EncodedDataset` give the same type back; any other sized dataset gives a
    ``torch.utils.data.Subset``.
    """
    try:
        total = len(data)
    except TypeError as e:
        raise DataError(f"random_subset: {type(data).__name__} has no length") from e
    idx = subset_indices(total, n, seed)
    if isinstance(data, (Split, EncodedDataset)):
        return data.select(idx)
    return Subset(data, idx.tolist())


#: alias of :func:`make_dataloader`
make_loader = make_dataloader
#: alias of :func:`random_subset`
sample = random_subset
