"""The task registry."""

from __future__ import annotations

import pytest

from pegq.data import GLUE_TASKS, TASK_NAMES, TASKS, DataError, canonical_task_name, csv_task_spec, get_task


def test_registry_holds_the_papers_tasks():
    assert GLUE_TASKS == ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
    assert set(TASKS) == {*GLUE_TASKS, "mnli-mm", "rotten_tomatoes"}
    assert "csv" in TASK_NAMES and "wnli" not in TASK_NAMES


@pytest.mark.parametrize(
    ("name", "n_text", "num_labels", "metric"),
    [
        ("cola", 1, 2, "matthews"),
        ("sst2", 1, 2, "accuracy"),
        ("mrpc", 2, 2, "f1_accuracy"),
        ("stsb", 2, 1, "pearson_spearman"),
        ("qqp", 2, 2, "f1_accuracy"),
        ("mnli", 2, 3, "accuracy"),
        ("mnli-mm", 2, 3, "accuracy"),
        ("qnli", 2, 2, "accuracy"),
        ("rte", 2, 2, "accuracy"),
        ("rotten_tomatoes", 1, 2, "accuracy"),
    ],
)
def test_spec_fields(name, n_text, num_labels, metric):
    spec = TASKS[name]
    assert len(spec.text_fields) == n_text
    assert spec.is_pair == (n_text == 2)
    assert spec.num_labels == num_labels
    assert spec.is_regression == (num_labels == 1)
    assert spec.metric == metric
    assert len(spec.labels) == (0 if num_labels == 1 else num_labels)
    assert spec.label2id == {v: k for k, v in spec.id2label.items()}


def test_label_orders_follow_the_hub_glue_dataset():
    assert TASKS["mnli"].labels == ("entailment", "neutral", "contradiction")
    assert TASKS["mnli-mm"].labels == TASKS["mnli"].labels
    assert TASKS["qnli"].labels == ("entailment", "not_entailment")
    assert TASKS["rte"].labels == ("entailment", "not_entailment")
    assert TASKS["cola"].labels == ("unacceptable", "acceptable")
    assert TASKS["stsb"].label_range == (0.0, 5.0)
    assert TASKS["mnli"].tsv.dev_file == "dev_matched.tsv"
    assert TASKS["mnli-mm"].tsv.dev_file == "dev_mismatched.tsv"
    assert TASKS["mnli-mm"].hub.dev_split == "validation_mismatched"


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("SST-2", "sst2"),
        ("sts-b", "stsb"),
        ("CoLA", "cola"),
        ("MNLI_mismatched", "mnli-mm"),
        ("mnli-m", "mnli"),
        (" RTE ", "rte"),
        ("rotten-tomatoes", "rotten_tomatoes"),
        ("CSV", "csv"),
    ],
)
def test_aliases(alias, canonical):
    assert canonical_task_name(alias) == canonical


@pytest.mark.parametrize("name", ["wnli", "WNLI"])
def test_wnli_is_excluded_with_the_reason(name):
    with pytest.raises(DataError, match=r"WNLI is excluded.*appendix B\.1"):
        get_task(name)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(
        DataError, match=r"unknown task 'imdb'; known tasks: cola, sst2.*rotten_tomatoes, csv"
    ):
        get_task("imdb")


def test_csv_has_no_fixed_spec():
    with pytest.raises(DataError, match="csv_task_spec"):
        get_task("csv")


def test_csv_task_spec():
    spec = csv_task_spec(["a", "b"], labels=[0, 1, 2])
    assert spec.labels == ("0", "1", "2") and spec.num_labels == 3 and spec.metric == "accuracy"
    reg = csv_task_spec("text", regression=True)
    assert reg.is_regression and reg.metric == "pearson_spearman"
    with pytest.raises(DataError, match="at least 2 labels"):
        csv_task_spec("text", labels=["x"])
    with pytest.raises(DataError, match="one or two column names"):
        csv_task_spec(["a", "b", "c"], labels=[0, 1])
    with pytest.raises(DataError, match="needs exactly 2 labels"):
        csv_task_spec("text", labels=[0, 1, 2], metric="f1_accuracy")
    with pytest.raises(DataError, match="unknown metric"):
        csv_task_spec("text", labels=[0, 1], metric="bleu")
    with pytest.raises(DataError, match="duplicate label"):
        csv_task_spec("text", labels=["1", 1])
