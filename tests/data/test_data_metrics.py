"""The paper's metrics, checked against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pegq.data import TASKS, DataError, compute_metrics, glue_score


def test_matthews_by_hand():
    y = [1, 1, 1, 0, 0, 0, 1, 0]
    p = [1, 0, 1, 0, 1, 0, 1, 0]
    # confusion matrix: TP=3 (0,2,6), FN=1 (1), TN=3 (3,5,7), FP=1 (4)
    tp, fn, tn, fp = 3, 1, 3, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert mcc == 0.5
    out = compute_metrics("cola", p, y)
    assert out["metric"] == "matthews" and out["n"] == 8
    assert out["score"] == pytest.approx(100 * mcc) and out["mcc"] == pytest.approx(50.0)


def test_f1_accuracy_by_hand():
    y = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    p = [1, 1, 1, 0, 0, 0, 1, 1, 0, 1]
    # TP=4 (0,2,6,9), FP=2 (1,7), FN=2 (3,8), TN=2 (4,5)
    acc = 6 / 10
    precision, recall = 4 / 6, 4 / 6
    f1 = 2 * precision * recall / (precision + recall)
    for task in ("mrpc", "qqp"):
        out = compute_metrics(task, p, y)
        assert out["metric"] == "f1_accuracy"
        assert out["accuracy"] == pytest.approx(100 * acc)
        assert out["f1"] == pytest.approx(100 * f1)
        assert out["score"] == pytest.approx(100 * (f1 + acc) / 2)


def test_pearson_spearman_by_hand():
    p = [1.0, 2.0, 3.0, 4.0, 5.0]
    y = [2.0, 4.0, 5.0, 4.0, 5.0]
    # Pearson: dx = -2..2, dy = [-2, 0, 1, 0, 1]: sum dx*dy = 6, sum dx^2 = 10, sum dy^2 = 6
    pearson = 6 / math.sqrt(10 * 6)
    # Spearman: ranks of y with ties averaged = [1, 2.5, 4.5, 2.5, 4.5]; sum dx*dr = 7, sum dr^2 = 9
    spearman = 7 / math.sqrt(10 * 9)
    out = compute_metrics("stsb", p, y)
    assert out["metric"] == "pearson_spearman"
    assert out["pearson"] == pytest.approx(100 * pearson)
    assert out["spearman"] == pytest.approx(100 * spearman)
    assert out["score"] == pytest.approx(50 * (pearson + spearman))
    # [N, 1] regression outputs and torch tensors are accepted
    out2 = compute_metrics(TASKS["stsb"], torch.tensor(p).reshape(-1, 1), torch.tensor(y))
    assert out2["score"] == pytest.approx(out["score"], rel=1e-6)


def test_accuracy_with_logits_and_ids():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    y = [0, 1, 1, 0]  # argmax = [0, 1, 2, 0]: 3 of 4 right
    for task in ("mnli", "mnli-mm"):
        out = compute_metrics(task, logits, y)
        assert out == {"metric": "accuracy", "score": 75.0, "accuracy": 75.0, "n": 4}
    assert compute_metrics("sst2", torch.tensor([1, 0, 1]), np.array([1, 1, 1]))["score"] == pytest.approx(
        200 / 3
    )
    assert compute_metrics("rotten_tomatoes", [1.0, 0.0], [1, 0])["score"] == 100.0  # integral floats are ids
    for task in ("qnli", "rte"):
        assert compute_metrics(task, torch.randn(5, 2).argmax(-1), [0] * 5)["metric"] == "accuracy"


def test_degenerate_cases_are_zero():
    assert compute_metrics("cola", [1, 1, 1, 1], [0, 1, 0, 1])["score"] == 0.0
    out = compute_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 3.0, 5.0])
    assert out["score"] == 0.0 and out["pearson"] == 0.0 and out["spearman"] == 0.0
    out = compute_metrics("mrpc", [0, 0], [0, 0])
    assert out["f1"] == 0.0 and out["accuracy"] == 100.0


def test_glue_score_is_a_macro_average():
    assert glue_score({"cola": 50.0, "sst2": 90.0, "rte": 70.0}) == pytest.approx(70.0)


@pytest.mark.parametrize(
    ("task", "preds", "labels", "match"),
    [
        ("sst2", [1, 0], [1, 0, 1], r"2 predictions for 3 labels"),
        ("sst2", [0.2, 0.7], [1, 0], r"needs class ids .* or logits of shape \[N, C\]"),
        ("sst2", [0, 2], [1, 0], r"outside the class ids 0\.\.1"),
        ("mnli", np.zeros((2, 2)), [1, 0], r"logits have 2 columns but task 'mnli' has 3 classes"),
        ("sst2", [], [], r"labels: empty"),
        ("stsb", [[1.0, 2.0]], [1.0], r"regression needs shape \[N\] or \[N, 1\]"),
        ("stsb", [float("nan"), 1.0], [1.0, 2.0], r"must be finite"),
        ("sst2", ["a", "b"], [1, 0], r"expected numbers"),
        ("cola", [1, 0], [[1, 0]], r"labels: expected shape \[N\]"),
        ("csv", [1], [1], r"csv_task_spec"),
    ],
)
def test_bad_metric_inputs(task, preds, labels, match):
    with pytest.raises(DataError, match=match):
        compute_metrics(task, preds, labels)
