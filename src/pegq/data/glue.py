"""GLUE readers: a local TSV folder, a ``datasets`` DatasetDict saved with ``save_to_disk``, or the hub.

TSV layout (the files written by the classic ``download_glue_data.py``)
-----------------------------------------------------------------------
``data_dir`` is either a GLUE root holding the standard task folders, or one task folder itself::

    GLUE/                         (or pass GLUE/SST-2 directly)
      CoLA/  train.tsv dev.tsv    no header; columns: source, label (0/1), original label, sentence
      SST-2/ train.tsv dev.tsv    sentence, label (0/1)
      MRPC/  train.tsv dev.tsv    Quality (0/1), #1 ID, #2 ID, #1 String, #2 String
      STS-B/ train.tsv dev.tsv    ..., sentence1, sentence2, score (float in [0, 5])
      QQP/   train.tsv dev.tsv    id, qid1, qid2, question1, question2, is_duplicate (0/1)
      MNLI/  train.tsv dev_matched.tsv dev_mismatched.tsv
                                  ..., sentence1, sentence2, ..., gold_label
                                  (entailment/neutral/contradiction)
      QNLI/  train.tsv dev.tsv    index, question, sentence, label (entailment/not_entailment)
      RTE/   train.tsv dev.tsv    index, sentence1, sentence2, label (entailment/not_entailment)

Columns are found by header name (extra columns are ignored), except for CoLA, which has no header.
Files are read with pandas, ``sep="\\t"``, ``quoting=csv.QUOTE_NONE`` (quotes are ordinary characters in
GLUE), every cell as a string, a UTF-8 byte-order mark tolerated (MRPC has one). A row whose field count
differs from the header's is an error (not silently padded). Files are only ever read.

DatasetDict on disk
-------------------
``data_dir`` is a folder written by ``DatasetDict.save_to_disk`` (it holds ``dataset_dict.json``), or a
folder holding one such folder per task named after the hub config (``sst2``, ``mnli``...), the task
name or the GLUE folder name. Column names are those of the hub ``glue`` dataset (``sentence``,
``sentence1``/``sentence2``, ``question1``/``question2``, ``question``/``sentence``,
``premise``/``hypothesis``, ``label``); splits ``train`` and ``validation`` (MNLI:
``validation_matched`` / ``validation_mismatched``). ``split_names={"dev": "validation"}`` overrides the
split names (e.g. for a saved ``mnli_mismatched`` config). ``ClassLabel`` names are matched by name, so a
different label order is remapped; string labels are mapped by name; integer labels are range-checked.

Hub
---
Only with ``source="hub"``: ``datasets.load_dataset("nyu-mll/glue", config)`` (the hub's ``glue``). This
needs network access; it is never used by default nor by the tests.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ._common import (
    check_columns,
    check_field_counts,
    check_texts,
    convert_labels,
    labels_from_floats,
    labels_from_ids,
    labels_from_names,
    make_split,
    read_table,
)
from .errors import DataError
from .splits import Split, TaskData
from .tasks import TaskSpec

__all__ = [
    "DEFAULT_HUB_ID",
    "find_dataset_dict",
    "find_glue_tsv_dir",
    "read_dataset_dict",
    "read_glue_disk",
    "read_glue_hub",
    "read_glue_tsv",
]

DEFAULT_HUB_ID = "nyu-mll/glue"


def _child_dir(parent: Path, name: str) -> Path | None:
    """``parent/name``, also matched case-insensitively (``sst-2`` for ``SST-2``)."""
    exact = parent / name
    if exact.is_dir():
        return exact
    low = name.lower()
    try:
        for child in sorted(parent.iterdir()):
            if child.is_dir() and child.name.lower() == low:
                return child
    except OSError:
        return None
    return None


def _expected_files(spec: TaskSpec, splits: Sequence[str]) -> list[str]:
    assert spec.tsv is not None
    return [spec.tsv.file_for(s) for s in splits]


def find_glue_tsv_dir(spec: TaskSpec, data_dir: Path, splits: Sequence[str]) -> Path | None:
    """``data_dir`` itself if it holds one of the task's files, else ``data_dir/<Folder>``, else None."""
    assert spec.tsv is not None
    files = _expected_files(spec, splits)
    if any((data_dir / f).is_file() for f in files):
        return data_dir
    child = _child_dir(data_dir, spec.tsv.folder)
    if child is not None:
        return child
    return None


def _read_tsv_split(spec: TaskSpec, path: Path, split: str) -> Split:
    layout = spec.tsv
    assert layout is not None
    where = f"{spec.display_name} {path}"
    if not path.is_file():
        raise DataError(f"{where}: file not found")
    if layout.column_names is None:
        with path.open("r", encoding="utf-8-sig", newline="") as f:
            first = f.readline().rstrip("\r\n")
        if not first:
            raise DataError(f"{where}: the file is empty or starts with a blank line; it needs a header line")
        header = [h.strip() for h in first.split("\t")]
        required = [*layout.text_columns, layout.label_column]
        check_columns(header, required, where, hint="is this the right task folder?")
        check_field_counts(path, len(header), skip_first=True)
        df = read_table(path, sep="\t", header=True, usecols=required, quote_none=True)
        line_offset = 2  # row 0 is on line 2
    else:
        check_field_counts(path, len(layout.column_names), skip_first=False)
        df = read_table(path, sep="\t", header=False, column_names=layout.column_names, quote_none=True)
        line_offset = 1
    if len(df) == 0:
        raise DataError(f"{where}: split {split!r} is empty (no data rows); it needs at least one example")
    texts = [check_texts(df[c].tolist(), c, where, line_offset) for c in layout.text_columns]
    labels = convert_labels(df[layout.label_column].tolist(), layout.label_format, spec, where, line_offset)
    return make_split(split, texts, labels, where)


def read_glue_tsv(spec: TaskSpec, data_dir: str | os.PathLike, splits: Sequence[str]) -> TaskData:
    """Read the requested splits of a GLUE task from its TSV folder (see the module docstring)."""
    if spec.tsv is None:
        raise DataError(f"task {spec.name!r} has no GLUE TSV layout")
    root = Path(data_dir)
    files = _expected_files(spec, splits)
    if not root.is_dir():
        raise DataError(
            f"{spec.display_name}: data directory {root} does not exist; pass a GLUE root containing "
            f"{spec.tsv.folder}/ (with {', '.join(files)}) or the {spec.tsv.folder} folder itself"
        )
    task_dir = find_glue_tsv_dir(spec, root, splits)
    if task_dir is None:
        raise DataError(
            f"{spec.display_name}: found neither {', '.join(files)} nor a {spec.tsv.folder}/ folder "
            f"in {root}; pass a GLUE root containing {spec.tsv.folder}/ or the task folder itself"
        )
    missing = [f for f in files if not (task_dir / f).is_file()]
    if missing:
        raise DataError(
            f"{spec.display_name}: missing file(s) {missing} in {task_dir}; "
            f"expected {files} (GLUE TSV layout)"
        )
    out = {s: _read_tsv_split(spec, task_dir / spec.tsv.file_for(s), s) for s in splits}
    return TaskData(
        spec=spec, train=out.get("train"), dev=out.get("dev"), source="tsv", location=str(task_dir)
    )


# --------------------------------------------------------------------------------------------------
# datasets (save_to_disk / hub)


def find_dataset_dict(spec: TaskSpec, data_dir: Path) -> Path | None:
    """``data_dir`` if it is a saved DatasetDict, else a child named after the task, or None."""
    if (data_dir / "dataset_dict.json").is_file():
        return data_dir
    names = [spec.name]
    if spec.hub is not None:
        names.insert(0, spec.hub.config)
    if spec.tsv is not None:
        names.append(spec.tsv.folder)
    for name in dict.fromkeys(names):
        child = _child_dir(data_dir, name)
        if child is not None and (child / "dataset_dict.json").is_file():
            return child
    return None


def _split_name(spec: TaskSpec, split: str, split_names: Mapping[str, str] | None) -> str:
    if split_names and split in split_names:
        return split_names[split]
    assert spec.hub is not None
    return spec.hub.split_for(split)


_TEST_SPLIT_HINT = "; label -1 marks an unlabeled test split, use the validation split"


def _dataset_labels(spec: TaskSpec, ds, column: str, where: str):
    """Labels of a ``datasets.Dataset`` column -> int64 ids / float32 targets (see module docstring)."""
    from datasets import ClassLabel

    feature = ds.features[column]
    values = list(ds[column])
    if spec.is_regression:
        return labels_from_floats(values, spec, where)
    if getattr(feature, "dtype", "") in ("string", "large_string"):
        return labels_from_names(values, spec, where)
    # integer ids, either plain or a ClassLabel whose names may be in another order
    names = list(feature.names) if isinstance(feature, ClassLabel) else list(spec.labels)
    unknown = [n for n in names if n not in spec.label2id]
    if unknown:
        raise DataError(
            f"{where}: ClassLabel names {names} contain {unknown}, which task {spec.name!r} does not "
            f"know; expected names {list(spec.labels)}"
        )
    try:
        ids = labels_from_ids(values, spec, where)
    except DataError as e:
        hint = _TEST_SPLIT_HINT if any(v == -1 for v in values) else ""
        raise DataError(f"{e}{hint}") from None
    if names != list(spec.labels):  # remap by name
        remap = np.array([spec.label2id[n] for n in names], dtype=np.int64)
        ids = remap[ids]
    return ids


def read_dataset_dict(
    spec: TaskSpec,
    dd,
    splits: Sequence[str],
    *,
    where: str,
    source: str,
    split_names: Mapping[str, str] | None = None,
) -> TaskData:
    """Convert a ``datasets.DatasetDict`` with hub ``glue`` columns into a :class:`TaskData`."""
    from datasets import Dataset, DatasetDict

    if spec.hub is None:
        raise DataError(f"task {spec.name!r} has no hub/datasets layout")
    if isinstance(dd, Dataset):
        raise DataError(
            f"{where}: holds a single Dataset, not a DatasetDict; save a DatasetDict with splits "
            f"{[_split_name(spec, s, split_names) for s in splits]}"
        )
    if not isinstance(dd, DatasetDict):
        raise DataError(f"{where}: expected a datasets.DatasetDict, got {type(dd).__name__}")
    wanted = {s: _split_name(spec, s, split_names) for s in splits}
    missing = [name for name in wanted.values() if name not in dd]
    if missing:
        raise DataError(
            f"{where}: missing split(s) {missing}; expected {list(wanted.values())}, found {list(dd)}; "
            "pass split_names={'dev': '<name>'} to use other split names"
        )
    out: dict[str, Split] = {}
    for split, hub_split in wanted.items():
        ds = dd[hub_split]
        w = f"{where} [{hub_split}]"
        cols = list(ds.column_names)
        check_columns(
            cols, [*spec.hub.text_columns, spec.hub.label_column], w, hint="columns of the hub 'glue' dataset"
        )
        if ds.num_rows == 0:
            raise DataError(f"{w}: split {hub_split!r} is empty (no rows); it needs at least one example")
        texts = [check_texts(list(ds[c]), c, w) for c in spec.hub.text_columns]
        labels = _dataset_labels(spec, ds, spec.hub.label_column, w)
        out[split] = make_split(split, texts, labels, w)
    return TaskData(spec=spec, train=out.get("train"), dev=out.get("dev"), source=source, location=where)


def read_glue_disk(
    spec: TaskSpec,
    data_dir: str | os.PathLike,
    splits: Sequence[str],
    split_names: Mapping[str, str] | None = None,
) -> TaskData:
    """Read a DatasetDict saved with ``save_to_disk`` (see the module docstring)."""
    from datasets import load_from_disk

    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(
            f"{spec.display_name}: data directory {root} does not exist; pass a save_to_disk folder"
        )
    path = find_dataset_dict(spec, root)
    if path is None:
        single = (root / "state.json").is_file() and (root / "dataset_info.json").is_file()
        if single:
            raise DataError(
                f"{root}: holds a single Dataset, not a DatasetDict; "
                "save a DatasetDict (train/validation splits)"
            )
        raise DataError(
            f"{spec.display_name}: no dataset_dict.json in {root} "
            f"(nor in a {spec.hub.config if spec.hub else spec.name}/ subfolder); "
            "pass a folder written by DatasetDict.save_to_disk"
        )
    try:
        dd = load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError / json errors
        raise DataError(f"{path}: cannot load with datasets.load_from_disk ({type(e).__name__}: {e})") from e
    return read_dataset_dict(spec, dd, splits, where=str(path), source="disk", split_names=split_names)


def read_glue_hub(
    spec: TaskSpec,
    splits: Sequence[str],
    *,
    hub_id: str = DEFAULT_HUB_ID,
    cache_dir: str | os.PathLike | None = None,
    split_names: Mapping[str, str] | None = None,
) -> TaskData:
    """Download with ``datasets.load_dataset(hub_id, config)``: needs network; only on explicit request."""
    import datasets

    if spec.hub is None:
        raise DataError(f"task {spec.name!r} is not on the hub 'glue' dataset; use its own source")
    try:
        dd = datasets.load_dataset(
            hub_id, spec.hub.config, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except Exception as e:
        raise DataError(
            f"cannot load {hub_id!r} config {spec.hub.config!r} from the hub ({type(e).__name__}: {e}); "
            "check network access or pass data_dir= with local GLUE data"
        ) from e
    return read_dataset_dict(
        spec, dd, splits, where=f"hub:{hub_id}/{spec.hub.config}", source="hub", split_names=split_names
    )
