"""Safe output: atomic file writes, atomic checkpoint directories, output-dir guards.

Nothing pegq writes is ever half-written: files go to a temporary name in the same directory and are
``os.replace``-d into place; checkpoints are written into a temporary sibling directory that is
renamed when complete. Input files are only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class OutputError(ValueError):
    """An output location that cannot be used (message says how to fix it)."""


def _umask_mode(default: int) -> int:
    """``default`` masked by the process umask (mkstemp/mkdtemp create 0600/0700 otherwise)."""
    mask = os.umask(0)
    os.umask(mask)
    return default & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``: a
    reader (or a run killed mid-way) sees the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o777))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_output_dir(path: str | Path, overwrite: bool, marker: str = "results.json") -> Path:
    """Create ``path``; refuse if it already holds ``marker`` unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {str(path)!r} exists and is not a directory; choose another --output")
    if (path / marker).exists() and not overwrite:
        raise OutputError(
            f"{str(path / marker)!r} already exists; pass --overwrite to replace it or choose another --output"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path
