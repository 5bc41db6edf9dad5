"""The generic ``csv`` task: your own sentence(-pair) classification or regression data.

Files
-----
``train_file`` / ``dev_file``: paths (relative ones are resolved against ``data_dir`` when given). When
omitted and ``data_dir`` is given, ``train.csv`` / ``train.tsv`` and ``dev.csv`` / ``dev.tsv`` /
``validation.csv`` / ``validation.tsv`` are looked for there. The separator comes from the extension:
``.tsv`` / ``.tab`` -> tab, read with ``quoting=csv.QUOTE_NONE`` like GLUE; anything else -> comma with
standard CSV quoting; ``sep=`` overrides (a tab ``sep`` also turns quoting off). The first line is a header.

Columns and labels
------------------
``text_columns``: one or two column names (two -> encoded as a pair). ``label_column`` (default
``"label"``). Classification (default): ``labels=[...]`` gives the class values in id order; without it
the distinct values of the loaded files are sorted (numerically if they are all integers, else as
strings) and numbered 0..n-1 -- pass ``labels`` when you load one split only, so that ids do not depend
on which split was read. A value not in ``labels`` is an error. ``regression=True``: float targets,
metric Pearson/Spearman. ``metric=`` picks ``accuracy`` (default), ``matthews`` or ``f1_accuracy``
(binary, positive class = id 1) for classification. ``num_labels=1`` is the same as
``regression=True``; ``num_labels=n`` checks the number of classes (label values that are the integers
``0..n-1`` are taken as ids even when some are absent). ``train_csv`` / ``dev_csv`` are aliases of
``train_file`` / ``dev_file``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ._common import check_columns, check_field_counts, check_texts, convert_labels, make_split, read_table
from .errors import DataError
from .splits import TaskData
from .tasks import csv_task_spec

__all__ = ["CSV_OPTIONS", "read_csv_task"]

#: the keyword options of ``load_task("csv", ...)``
CSV_OPTIONS = (
    "train_file",
    "dev_file",
    "text_columns",
    "label_column",
    "labels",
    "regression",
    "metric",
    "sep",
    "task_name",
    "label_range",
    "num_labels",
    "train_csv",
    "dev_csv",
)

_DEFAULT_FILES = {
    "train": ("train.csv", "train.tsv"),
    "dev": ("dev.csv", "dev.tsv", "validation.csv", "validation.tsv"),
}


def _resolve(split: str, given: str | os.PathLike | None, data_dir: Path | None) -> Path:
    if given is not None:
        p = Path(given)
        if not p.is_absolute() and data_dir is not None:
            p = data_dir / p
        if not p.is_file():
            raise DataError(f"csv task: {split} file {p} not found; check the {split}_file= path")
        return p
    if data_dir is None:
        raise DataError(
            f"csv task: no {split} file; pass {split}_file=<path> (or data_dir= holding "
            f"{' / '.join(_DEFAULT_FILES[split])})"
        )
    if not data_dir.is_dir():
        raise DataError(f"csv task: data directory {data_dir} does not exist")
    for name in _DEFAULT_FILES[split]:
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(
        f"csv task: no {split} file in {data_dir}; expected one of {list(_DEFAULT_FILES[split])} "
        f"or pass {split}_file=<path>"
    )


def _read(path: Path, sep: str | None) -> pd.DataFrame:
    if sep is None:
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    if sep == "\t":
        with path.open("r", encoding="utf-8-sig", newline="") as f:
            first = f.readline().rstrip("\r\n")
        if not first:
            raise DataError(f"{path}: the file is empty or starts with a blank line; it needs a header line")
        check_field_counts(path, first.count("\t") + 1, skip_first=True)
        return read_table(path, sep=sep, header=True, quote_none=True)
    return read_table(path, sep=sep, header=True, quote_none=False)


def _sorted_values(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=lambda v: int(v))
    except ValueError:
        return sorted(values)


def read_csv_task(
    data_dir: str | os.PathLike | None,
    splits: Sequence[str],
    *,
    text_columns: str | Sequence[str] | None = None,
    label_column: str = "label",
    train_file: str | os.PathLike | None = None,
    dev_file: str | os.PathLike | None = None,
    labels: Sequence[object] | None = None,
    regression: bool = False,
    metric: str | None = None,
    sep: str | None = None,
    task_name: str = "csv",
    label_range: tuple[float, float] | None = None,
    num_labels: int | None = None,
    train_csv: str | os.PathLike | None = None,
    dev_csv: str | os.PathLike | None = None,
) -> TaskData:
    """Read a generic CSV/TSV task (see the module docstring)."""
    for alias, value, canonical in (("train_csv", train_csv, "train_file"), ("dev_csv", dev_csv, "dev_file")):
        if value is not None:
            if (train_file if canonical == "train_file" else dev_file) is not None:
                raise DataError(f"csv task: pass either {alias}= or {canonical}=, not both")
            if canonical == "train_file":
                train_file = value
            else:
                dev_file = value
    if num_labels is not None:
        if not isinstance(num_labels, int) or num_labels < 1:
            raise DataError(f"csv task: num_labels must be 1 (regression) or >= 2, got {num_labels!r}")
        if num_labels == 1:
            regression = True
        elif regression:
            raise DataError(
                f"csv task: regression=True contradicts num_labels={num_labels}; use num_labels=1"
            )
        if labels is not None and num_labels != 1 and len(labels) != num_labels:
            raise DataError(f"csv task: {len(labels)} labels given but num_labels={num_labels}")
    if text_columns is None:
        raise DataError("csv task: pass text_columns='<column>' or ('<column a>', '<column b>')")
    cols = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
    root = None if data_dir is None else Path(data_dir)
    given = {"train": train_file, "dev": dev_file}
    paths = {s: _resolve(s, given[s], root) for s in splits}

    frames: dict[str, pd.DataFrame] = {}
    for s, p in paths.items():
        df = _read(p, sep)
        check_columns(
            list(df.columns), [*cols, label_column], f"csv task {p}", hint="set text_columns=/label_column="
        )
        if len(df) == 0:
            raise DataError(
                f"csv task {p}: split {s!r} is empty (no data rows); it needs at least one example"
            )
        frames[s] = df

    if regression:
        spec = csv_task_spec(cols, regression=True, metric=metric, name=task_name, label_range=label_range)
    else:
        if labels is None:
            found: set[str] = set()
            for df in frames.values():
                found.update(v.strip() for v in df[label_column].tolist())
            labels = _sorted_values(found)
            if num_labels is not None and len(labels) != num_labels:
                ids = {str(i) for i in range(num_labels)}
                if not set(labels) <= ids:
                    raise DataError(
                        f"csv task: num_labels={num_labels} but the label column {label_column!r} holds "
                        f"{len(labels)} distinct values {labels[:10]}; pass labels=[...] in id order"
                    )
                labels = [str(i) for i in range(num_labels)]  # ids 0..n-1, some absent from these files
            if len(labels) < 2:
                raise DataError(
                    f"csv task: the label column {label_column!r} has a single value {labels}; a "
                    "classification task needs at least 2 classes (pass labels=[...] or regression=True)"
                )
        spec = csv_task_spec(cols, labels=labels, metric=metric, name=task_name)

    out = {}
    for s, df in frames.items():
        where = f"csv task {paths[s]}"
        texts = [check_texts(df[c].tolist(), c, where, 2) for c in cols]
        fmt = "float" if regression else "name"
        y = convert_labels(df[label_column].tolist(), fmt, spec, where, 2)
        out[s] = make_split(s, texts, y, where)
    location = ", ".join(str(p) for p in paths.values())
    return TaskData(spec=spec, train=out.get("train"), dev=out.get("dev"), source="csv", location=location)
