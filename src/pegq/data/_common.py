"""Shared helpers of the readers: TSV/CSV reading with field-count checks, label conversion, split assembly.

Every check raises :class:`~pegq.data.errors.DataError` with a one-line message that names the file
(``where``) and, for row-level problems, the first offending line numbers (1-based, as an editor shows
them) or row indices.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError
from .splits import Split
from .tasks import TaskSpec

_SHOW = 5  # how many bad values / line numbers a message lists


def _show(items: Sequence[object]) -> str:
    items = list(items)
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(str(x) for x in items[:_SHOW]) + more


def check_field_counts(path: Path, expected: int, *, sep: str = "\t", skip_first: bool) -> None:
    """With ``quoting=QUOTE_NONE`` a TSV line is one row: check every non-blank line has ``expected`` fields.

    pandas fills short rows with empty strings silently (and may turn a long first row into an index),
    so the count is checked here first.
    """
    bad: list[tuple[int, int]] = []
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and skip_first:
                continue
            stripped = line.rstrip("\r\n")
            if not stripped:
                continue
            n = stripped.count(sep) + 1
            if n != expected:
                bad.append((lineno, n))
    if bad:
        lines = _show([f"line {ln} has {n}" for ln, n in bad])
        raise DataError(
            f"{path}: {len(bad)} malformed row(s), expected {expected} tab-separated fields: {lines}; "
            "fix or remove those lines"
        )


def read_table(
    path: Path,
    *,
    sep: str,
    header: bool,
    column_names: Sequence[str] | None = None,
    usecols: Sequence[str] | None = None,
    quote_none: bool,
) -> pd.DataFrame:
    """Read a CSV/TSV file with every cell as a string (no NA conversion: "NA", "null" stay text)."""
    kwargs: dict = {
        "sep": sep,
        "dtype": str,
        "keep_default_na": False,
        "na_filter": False,
        "encoding": "utf-8-sig",
        "index_col": False,
        "header": 0 if header else None,
    }
    if quote_none:
        kwargs["quoting"] = csv.QUOTE_NONE
    if column_names is not None:
        kwargs["names"] = list(column_names)
    if usecols is not None:
        kwargs["usecols"] = lambda c: str(c).strip() in set(usecols)
    try:
        df = pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError as e:
        need = "a header line and data rows" if header else "data rows"
        raise DataError(f"{path}: the file is empty; it needs {need}") from e
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{path}: cannot parse the file ({msg}); check the separator and the field counts"
        ) from e
    df.columns = [str(c).strip() for c in df.columns]
    return df


def check_columns(found: Sequence[str], required: Sequence[str], where: str, hint: str = "") -> None:
    missing = [c for c in required if c not in found]
    if missing:
        extra = f"; {hint}" if hint else ""
        raise DataError(
            f"{where}: missing column(s) {missing}; expected {list(required)}, found {list(found)}{extra}"
        )


def _row_ref(i: int, line_offset: int | None) -> str:
    return f"line {i + line_offset}" if line_offset is not None else f"row {i}"


def labels_from_ids(
    values: Sequence[object], spec: TaskSpec, where: str, line_offset: int | None = None
) -> np.ndarray:
    """Integer class ids ("0", "1", 1, 2.0...) -> int64, checked against ``0..num_labels-1``."""
    out = np.empty(len(values), dtype=np.int64)
    bad: list[str] = []
    for i, v in enumerate(values):
        try:
            f = float(v.strip()) if isinstance(v, str) else float(v)
            ok = math.isfinite(f) and f == int(f) and 0 <= int(f) < spec.num_labels
        except (TypeError, ValueError):
            ok = False
        if not ok:
            bad.append(f"{_row_ref(i, line_offset)}: {v!r}")
            continue
        out[i] = int(f)
    if bad:
        raise DataError(
            f"{where}: {len(bad)} label(s) are not class ids in 0..{spec.num_labels - 1} "
            f"({', '.join(f'{k}={n}' for k, n in spec.id2label.items())}): {_show(bad)}; fix the label column"
        )
    return out


def labels_from_names(
    values: Sequence[object], spec: TaskSpec, where: str, line_offset: int | None = None
) -> np.ndarray:
    """Label strings ("entailment"...) -> int64 ids via ``spec.label2id``."""
    table = spec.label2id
    out = np.empty(len(values), dtype=np.int64)
    bad: list[str] = []
    unknown: dict[object, None] = {}
    for i, v in enumerate(values):
        key = v.strip() if isinstance(v, str) else v
        if key in table:
            out[i] = table[key]
        else:
            bad.append(_row_ref(i, line_offset))
            unknown[key] = None
    if bad:
        raise DataError(
            f"{where}: {len(bad)} unknown label string(s) {_show([repr(u) for u in unknown])} "
            f"at {_show(bad)}; "
            f"allowed labels: {list(spec.labels)}"
        )
    return out


def labels_from_floats(
    values: Sequence[object], spec: TaskSpec, where: str, line_offset: int | None = None
) -> np.ndarray:
    """Regression targets -> float32, finite and inside ``spec.label_range`` when it is set."""
    out = np.empty(len(values), dtype=np.float32)
    bad: list[str] = []
    lo, hi = spec.label_range if spec.label_range is not None else (-math.inf, math.inf)
    for i, v in enumerate(values):
        try:
            f = float(v.strip()) if isinstance(v, str) else float(v)
            ok = math.isfinite(f) and lo <= f <= hi
        except (TypeError, ValueError):
            ok = False
        if not ok:
            bad.append(f"{_row_ref(i, line_offset)}: {v!r}")
            continue
        out[i] = f
    if bad:
        rng = f" in [{lo:g}, {hi:g}]" if spec.label_range is not None else ""
        raise DataError(
            f"{where}: {len(bad)} target(s) are not finite numbers{rng}: {_show(bad)}; fix the column"
        )
    return out


def convert_labels(
    values: Sequence[object], label_format: str, spec: TaskSpec, where: str, line_offset: int | None = None
) -> np.ndarray:
    if label_format == "id":
        return labels_from_ids(values, spec, where, line_offset)
    if label_format == "name":
        return labels_from_names(values, spec, where, line_offset)
    if label_format == "float":
        return labels_from_floats(values, spec, where, line_offset)
    raise DataError(f"{where}: unknown label format {label_format!r}")  # pragma: no cover - internal


def check_texts(
    values: Sequence[object], column: str, where: str, line_offset: int | None = None
) -> list[str]:
    texts = list(values)
    bad = [_row_ref(i, line_offset) for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise DataError(
            f"{where}: column {column!r} has {len(bad)} missing/non-text value(s) at {_show(bad)}"
        )
    return texts


def make_split(
    name: str,
    texts: Sequence[list[str]],
    labels: np.ndarray,
    where: str,
) -> Split:
    if len(labels) == 0:
        raise DataError(f"{where}: split {name!r} is empty (no data rows); it needs at least one example")
    return Split(name=name, text_a=texts[0], text_b=texts[1] if len(texts) > 1 else None, labels=labels)
