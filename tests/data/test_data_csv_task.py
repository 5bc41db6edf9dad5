"""The generic csv task."""

from __future__ import annotations

import numpy as np
import pytest

from pegq.data import DataError, compute_metrics, load_task


def test_classification_with_sorted_labels(csv_dir):
    task = load_task("csv", csv_dir, text_columns="review", label_column="sentiment")
    assert task.spec.labels == ("neg", "neutral", "pos") and task.spec.num_labels == 3
    assert task.spec.metric == "accuracy" and not task.spec.is_pair
    assert task.train.labels.tolist() == [2, 0, 1, 2, 0]
    assert task.train.text_a[0] == "great film, loved it"  # quoted commas
    assert task.train.text_a[3] == 'she said "wow" twice'  # doubled quotes
    assert task.dev.labels.tolist() == [2, 0, 1]
    assert compute_metrics(task, [2, 0, 0], task.dev.labels)["score"] == pytest.approx(200 / 3)


def test_given_labels_fix_the_ids_and_one_split(csv_dir):
    task = load_task(
        "csv",
        dev_file=csv_dir / "dev.csv",
        splits="dev",
        text_columns=["review", "topic"],
        label_column="sentiment",
        labels=["pos", "neg", "neutral"],
        task_name="my_reviews",
    )
    assert task.train is None and task.spec.name == "my_reviews" and task.spec.is_pair
    assert task.dev.labels.tolist() == [0, 1, 2]
    assert task.dev.text_b == ["film", "music", "film"]


def test_regression(csv_dir):
    task = load_task("csv", csv_dir, text_columns="review", label_column="stars", regression=True)
    assert task.spec.is_regression and task.spec.metric == "pearson_spearman"
    assert task.train.labels.dtype == np.float32
    np.testing.assert_allclose(task.train.labels, [4.5, 1.0, 3.0, 4.0, 0.5])


def test_tsv_pairs_with_integer_labels(csv_dir):
    f = csv_dir / "pairs.tsv"
    task = load_task(
        "csv",
        train_file=f,
        dev_file=f,
        text_columns=("premise", "hypothesis"),
        metric="f1_accuracy",
    )
    assert task.spec.labels == ("0", "1") and task.spec.metric == "f1_accuracy"
    assert task.dev.text_a[0] == '"a man" sleeps'  # TSV: quotes are plain characters
    assert task.dev.labels.tolist() == [1, 0, 1]


def test_integer_labels_sort_numerically(tmp_path):
    rows = "text,label\n" + "".join(f"t{i},{v}\n" for i, v in enumerate([10, 2, 1, 2, 10]))
    (tmp_path / "train.csv").write_text(rows)
    (tmp_path / "dev.csv").write_text("text,label\nx,2\n")
    task = load_task("csv", tmp_path, text_columns="text")
    assert task.spec.labels == ("1", "2", "10")
    assert task.train.labels.tolist() == [2, 1, 0, 1, 2]


def test_csv_errors(tmp_path, csv_dir):
    with pytest.raises(DataError, match="pass text_columns="):
        load_task("csv", csv_dir)
    with pytest.raises(DataError, match=r"unknown option\(s\) \['text_column'\]"):
        load_task("csv", csv_dir, text_column="review")
    with pytest.raises(DataError, match=r"no train file; pass train_file=<path>"):
        load_task("csv", text_columns="review")
    with pytest.raises(DataError, match=r"no dev file in .*expected one of \['dev.csv'"):
        (tmp_path / "train.csv").write_text("text,label\na,0\nb,1\n")
        load_task("csv", tmp_path, text_columns="text")
    with pytest.raises(DataError, match=r"train file .*nope.csv not found"):
        load_task("csv", csv_dir, train_file="nope.csv", text_columns="review")
    with pytest.raises(
        DataError,
        match=r"missing column\(s\) \['label'\]; expected \['review', 'label'\], "
        r"found \['review', 'topic', 'sentiment', 'stars'\]",
    ):
        load_task("csv", csv_dir, text_columns="review")
    with pytest.raises(
        DataError, match=r"unknown label string\(s\) 'neutral' at line 4.*allowed labels: \['pos', 'neg'\]"
    ):
        load_task("csv", csv_dir, text_columns="review", label_column="sentiment", labels=["pos", "neg"])
    with pytest.raises(DataError, match=r"not finite numbers: line 2: 'pos'"):
        load_task("csv", csv_dir, text_columns="review", label_column="sentiment", regression=True)
    (tmp_path / "one.csv").write_text("text,label\na,1\nb,1\n")
    with pytest.raises(DataError, match="single value"):
        load_task("csv", train_file=tmp_path / "one.csv", dev_file=tmp_path / "one.csv", text_columns="text")
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="split 'dev' is empty"):
        load_task("csv", splits="dev", dev_file=tmp_path / "empty.csv", text_columns="text", labels=[0, 1])
    with pytest.raises(DataError, match="reads local files only"):
        load_task("csv", csv_dir, source="hub", text_columns="review")
    with pytest.raises(DataError, match=r"only apply to the 'csv' task"):
        load_task("sst2", csv_dir, text_columns="review")


def test_cli_style_options(csv_dir, tmp_path):
    task = load_task(
        "csv",
        train_csv=str(csv_dir / "train.csv"),
        dev_csv=str(csv_dir / "dev.csv"),
        text_columns=["review"],
        label_column="stars",
        num_labels=1,
    )
    assert task.spec.is_regression
    (tmp_path / "train.csv").write_text("text,label\na,0\nb,2\n")
    (tmp_path / "dev.csv").write_text("text,label\nc,2\n")
    task = load_task("csv", tmp_path, text_columns="text", num_labels=3)  # class 1 absent from the files
    assert task.spec.labels == ("0", "1", "2") and task.train.labels.tolist() == [0, 2]
    with pytest.raises(
        DataError, match=r"num_labels=4 but the label column 'sentiment' holds 3 distinct values"
    ):
        load_task("csv", csv_dir, text_columns="review", label_column="sentiment", num_labels=4)
    with pytest.raises(DataError, match="either train_csv= or train_file="):
        load_task("csv", train_csv="a.csv", train_file="b.csv", text_columns="text")
    with pytest.raises(DataError, match="regression=True contradicts num_labels=3"):
        load_task("csv", csv_dir, text_columns="review", regression=True, num_labels=3)
