"""GLUE as a ``datasets`` DatasetDict saved with save_to_disk, and the hub code path (mocked, no network)."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from pegq.data import TASKS, DataError, load_task
from pegq.data.glue import DEFAULT_HUB_ID, read_dataset_dict

MNLI_NAMES = ["entailment", "neutral", "contradiction"]


def _mnli_dict(label_names=MNLI_NAMES) -> DatasetDict:
    feats = Features(
        {
            "premise": Value("string"),
            "hypothesis": Value("string"),
            "label": ClassLabel(names=label_names),
            "idx": Value("int32"),
        }
    )

    def ds(prem, hyp, lab):
        return Dataset.from_dict(
            {"premise": prem, "hypothesis": hyp, "label": lab, "idx": list(range(len(lab)))}, features=feats
        )

    return DatasetDict(
        {
            "train": ds(["p0", "p1", "p2"], ["h0", "h1", "h2"], [0, 1, 2]),
            "validation_matched": ds(["m0", "m1"], ["hm0", "hm1"], [2, 0]),
            "validation_mismatched": ds(["x0", "x1", "x2", "x3"], ["hx0", "hx1", "hx2", "hx3"], [1, 1, 0, 2]),
            "test_matched": ds(["t0"], ["ht0"], [-1]),
        }
    )


def _stsb_dict() -> DatasetDict:
    feats = Features({"sentence1": Value("string"), "sentence2": Value("string"), "label": Value("float32")})
    return DatasetDict(
        {
            "train": Dataset.from_dict(
                {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0.5, 4.0]}, features=feats
            ),
            "validation": Dataset.from_dict(
                {"sentence1": ["e", "f", "g"], "sentence2": ["h", "i", "j"], "label": [5.0, 2.25, 0.0]},
                features=feats,
            ),
        }
    )


@pytest.fixture
def mnli_disk(tmp_path):
    path = tmp_path / "mnli"
    _mnli_dict().save_to_disk(str(path))
    return path


def test_mnli_matched_and_mismatched_from_disk(mnli_disk):
    m = load_task("mnli", mnli_disk)
    assert m.source == "disk"
    assert m.train.text_a == ["p0", "p1", "p2"] and m.train.text_b == ["h0", "h1", "h2"]
    assert m.dev.text_a == ["m0", "m1"] and m.dev.labels.tolist() == [2, 0]
    mm = load_task("mnli-mm", mnli_disk, splits="dev")
    assert mm.train is None and mm.dev.labels.tolist() == [1, 1, 0, 2]
    assert mm.dev.labels.dtype == np.int64


def test_parent_folder_with_a_subfolder_per_task(mnli_disk, tmp_path):
    # mnli_disk is tmp_path/"mnli": the hub config name is found as a subfolder
    assert load_task("mnli", tmp_path).dev.text_a == ["m0", "m1"]
    assert load_task("mnli-mm", tmp_path, source="disk").dev.text_a[0] == "x0"


def test_regression_from_disk(tmp_path):
    _stsb_dict().save_to_disk(str(tmp_path / "stsb"))
    task = load_task("stsb", tmp_path / "stsb")
    assert task.dev.labels.dtype == np.float32
    np.testing.assert_allclose(task.dev.labels, [5.0, 2.25, 0.0])


def test_classlabel_in_another_order_is_remapped_by_name(tmp_path):
    names = ["contradiction", "entailment", "neutral"]  # the old transformers processor order
    _mnli_dict(names).save_to_disk(str(tmp_path / "d"))
    task = load_task("mnli", tmp_path / "d")
    # stored ids 0,1,2 mean contradiction, entailment, neutral -> hub ids 2, 0, 1
    assert task.train.labels.tolist() == [2, 0, 1]


def test_string_labels_are_mapped_by_name(tmp_path):
    dd = DatasetDict(
        {
            "train": Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "label": ["not_entailment"]}),
            "validation": Dataset.from_dict(
                {"sentence1": ["c", "d"], "sentence2": ["e", "f"], "label": ["entailment", "not_entailment"]}
            ),
        }
    )
    dd.save_to_disk(str(tmp_path / "rte"))
    task = load_task("rte", tmp_path)
    assert task.train.labels.tolist() == [1] and task.dev.labels.tolist() == [0, 1]


def test_split_names_override(tmp_path):
    dd = _mnli_dict()
    DatasetDict({"validation": dd["validation_mismatched"]}).save_to_disk(str(tmp_path / "mm"))
    with pytest.raises(DataError, match=r"missing split\(s\) \['validation_mismatched'\].*split_names="):
        load_task("mnli-mm", tmp_path / "mm", splits="dev")
    task = load_task("mnli-mm", tmp_path / "mm", splits="dev", split_names={"dev": "validation"})
    assert task.dev.text_a == ["x0", "x1", "x2", "x3"]


def test_disk_errors(tmp_path, mnli_disk):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no dataset_dict.json"):
        load_task("mnli", tmp_path / "empty", source="disk")
    # wrong columns (an SST-2 layout read as MNLI)
    sst = DatasetDict({"train": Dataset.from_dict({"sentence": ["x"], "label": [0]})})
    sst.save_to_disk(str(tmp_path / "sst"))
    with pytest.raises(
        DataError, match=r"missing column\(s\) \['premise', 'hypothesis'\].*found \['sentence', 'label'\]"
    ):
        load_task("mnli", tmp_path / "sst", splits="train")
    # unlabeled test split used as dev
    with pytest.raises(DataError, match=r"not class ids in 0\.\.2.*label -1 marks an unlabeled test split"):
        load_task("mnli", mnli_disk, splits="dev", split_names={"dev": "test_matched"})
    # a single Dataset rather than a DatasetDict
    Dataset.from_dict({"sentence": ["x"], "label": [0]}).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(DataError, match="single Dataset, not a DatasetDict"):
        load_task("sst2", tmp_path / "single", source="disk")
    # unknown ClassLabel names
    _mnli_dict(["yes", "maybe", "no"]).save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(DataError, match=r"ClassLabel names .* contain \['yes', 'maybe', 'no'\]"):
        load_task("mnli", tmp_path / "odd")
    # empty split (datasets cannot load_from_disk an empty saved split, so read it in memory)
    feats = Features({"sentence": Value("string"), "label": Value("int64")})
    empty = DatasetDict({"train": Dataset.from_dict({"sentence": [], "label": []}, features=feats)})
    with pytest.raises(DataError, match="split 'train' is empty"):
        read_dataset_dict(TASKS["sst2"], empty, ["train"], where="mem", source="disk")


def test_hub_is_used_only_when_asked(monkeypatch, mnli_disk):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return _mnli_dict()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task("mnli-mm", source="hub")
    assert calls == [(DEFAULT_HUB_ID, "mnli")]
    assert task.source == "hub" and task.dev.text_a[0] == "x0"
    # never by default: without data_dir the auto source fails instead of downloading
    with pytest.raises(DataError, match="needs data: pass data_dir="):
        load_task("mnli")
    load_task("mnli", mnli_disk)
    assert len(calls) == 1


def test_hub_failure_is_a_data_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load 'nyu-mll/glue' config 'sst2'.*check network"):
        load_task("sst2", source="hub")
