"""GLUE TSV folders: every task of the paper from the miniature GLUE root."""

from __future__ import annotations

import numpy as np
import pytest

from pegq.data import GLUE_TASKS, TaskData, load_task

# task -> (train size, dev size, dev labels, first dev text_a, first dev text_b)
EXPECTED = {
    "cola": (5, 4, [1, 0, 1, 0], "The sailors rode the breeze clear of the rocks.", None),
    "sst2": (5, 3, [1, 0, 0], "it 's a charming and often affecting journey . ", None),
    "mrpc": (
        3,
        4,
        [1, 0, 0, 1],
        "He said the foodservice pie business doesn 't fit the company 's long-term growth strategy .",
        '" The foodservice pie business does not fit our long-term growth strategy .',
    ),
    "stsb": (
        4,
        5,
        [5.0, 4.75, 5.0, 2.4, 0.0],
        "A man with a hard hat is dancing.",
        "A man wearing a hard hat is dancing.",
    ),
    "qqp": (
        3,
        4,
        [0, 0, 1, 1],
        "Why are African-Americans so beautiful?",
        "Why are hispanics so beautiful?",
    ),
    "mnli": (
        4,
        3,
        [1, 2, 0],  # neutral, contradiction, entailment
        "The new rights are nice enough",
        "Everyone really likes the newest benefits ",
    ),
    "mnli-mm": (
        4,
        4,
        [2, 2, 0, 1],
        "Your contribution helped make it possible for us to provide our students with a quality education.",
        "Your contributions were of no help with our students' education.",
    ),
    "qnli": (
        3,
        3,
        [0, 1, 1],
        "What came into force after the new constitution was herald?",
        "As of that day, the new constitution heralding the Second Republic came into force.",
    ),
    "rte": (
        3,
        2,
        [1, 0],
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.",
        "Christopher Reeve had an accident.",
    ),
}


def test_every_glue_task_has_a_fixture():
    assert set(GLUE_TASKS) | {"mnli-mm"} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reads_every_task_from_the_glue_root(glue_root, name):
    n_train, n_dev, dev_labels, a0, b0 = EXPECTED[name]
    task = load_task(name, glue_root)
    assert isinstance(task, TaskData) and task.source == "tsv"
    assert task.spec.name == name
    assert len(task.train) == n_train and len(task.dev) == n_dev
    assert task.dev.is_pair == task.spec.is_pair
    ex = task.dev[0]
    assert ex.text_a == a0 and ex.text_b == b0
    if task.spec.is_regression:
        assert task.dev.labels.dtype == np.float32
        np.testing.assert_allclose(task.dev.labels, dev_labels, rtol=0, atol=1e-6)
        assert isinstance(ex.label, float)
    else:
        assert task.dev.labels.dtype == np.int64
        assert task.dev.labels.tolist() == dev_labels
        assert isinstance(ex.label, int)
        assert task.train.labels.min() >= 0 and task.train.labels.max() < task.spec.num_labels


def test_task_folder_itself_and_root_give_the_same_data(glue_root):
    a = load_task("rte", glue_root)
    b = load_task("rte", glue_root / "RTE")
    assert a.dev.text_a == b.dev.text_a and a.dev.text_b == b.dev.text_b
    assert a.train.labels.tolist() == b.train.labels.tolist()
    assert b.location == str(glue_root / "RTE")


def test_mnli_and_mnli_mm_share_train_and_differ_in_dev(glue_root):
    m = load_task("mnli", glue_root)
    mm = load_task("MNLI_mismatched", glue_root / "MNLI")
    assert m.train.text_a == mm.train.text_a and m.train.labels.tolist() == mm.train.labels.tolist()
    assert m.dev.text_a != mm.dev.text_a
    assert m.train[2].text_a == 'He said, "Don\'t go."'  # quotes are plain characters (QUOTE_NONE)


def test_quotes_bom_and_na_strings_are_kept_verbatim(glue_root):
    sst = load_task("sst2", glue_root)
    assert sst.train.text_a[3] == '" the lord of the rings " is a triumph '
    assert sst.train.text_a[4] == "NA" and sst.dev.text_a[2] == "null"
    mrpc = load_task("mrpc", glue_root)  # the header starts with a UTF-8 BOM
    assert mrpc.train.labels.tolist() == [1, 0, 1]
    cola = load_task("cola", glue_root)  # headerless; a stray quote inside a sentence
    assert cola.dev.text_a[3] == 'Fred whistled "a tune.'
    assert cola.train.labels.tolist() == [1, 1, 0, 1, 0]


def test_only_the_requested_splits_are_read(glue_copy):
    (glue_copy / "SST-2" / "train.tsv").unlink()
    task = load_task("sst2", glue_copy, splits="dev")
    assert task.train is None and len(task.dev) == 3
    assert task.split("validation") is task.dev
    task = load_task("sst2", glue_copy / "SST-2", splits=["validation"])
    assert len(task.dev) == 3


def test_case_insensitive_folder_and_env_var(glue_copy, monkeypatch):
    (glue_copy / "SST-2").rename(glue_copy / "sst-2")
    assert len(load_task("sst2", glue_copy).dev) == 3
    monkeypatch.setenv("GLUE_DIR", str(glue_copy))
    assert len(load_task("sst2").train) == 5


def test_reading_never_modifies_the_files(glue_root, tree_digest):
    before = tree_digest(glue_root)
    for name in EXPECTED:
        load_task(name, glue_root)
    assert tree_digest(glue_root) == before


def test_split_select_and_iteration(glue_root):
    dev = load_task("mnli", glue_root).dev
    sub = dev.select([2, 0])
    assert sub.text_a == [dev.text_a[2], dev.text_a[0]]
    assert sub.labels.tolist() == [dev.labels[2], dev.labels[0]]
    assert [ex.label for ex in dev] == dev.labels.tolist()
