"""Every bad GLUE input gives one DataError with a one-line message; input files are never modified."""

from __future__ import annotations

import pytest

from pegq.data import DataError, load_task


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    assert isinstance(err.value, ValueError)
    return msg


def _rewrite(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match=r"does not exist") as e:
        load_task("sst2", tmp_path / "nope")
    _one_line(e)
    with pytest.raises(
        DataError, match=r"does not exist; pass a GLUE root containing SST-2/ \(with train.tsv, dev.tsv\)"
    ):
        load_task("sst2", tmp_path / "nope", source="tsv")


def test_no_task_folder_says_what_was_expected(tmp_path):
    with pytest.raises(
        DataError, match=r"expected either the GLUE TSV layout \(QNLI/ with train.tsv, dev.tsv"
    ) as e:
        load_task("qnli", tmp_path)
    assert "save_to_disk" in _one_line(e)


def test_missing_file_names_the_expected_files(glue_copy):
    (glue_copy / "MNLI" / "dev_mismatched.tsv").unlink()
    assert len(load_task("mnli", glue_copy).dev) == 3  # the matched dev file is still there
    with pytest.raises(
        DataError,
        match=r"missing file\(s\) \['dev_mismatched.tsv'\] in .*MNLI; "
        r"expected \['train.tsv', 'dev_mismatched.tsv'\]",
    ) as e:
        load_task("mnli-mm", glue_copy)
    _one_line(e)


def test_wrong_columns_list_expected_and_found(glue_copy):
    path = glue_copy / "QQP" / "dev.tsv"
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace("question2", "q2")
    _rewrite(path, lines)
    with pytest.raises(
        DataError,
        match=r"QQP .*dev.tsv: missing column\(s\) \['question2'\]; expected \['question1', 'question2', "
        r"'is_duplicate'\], found \['id', 'qid1', 'qid2', 'question1', 'q2', 'is_duplicate'\]",
    ) as e:
        load_task("qqp", glue_copy)
    _one_line(e)


def test_wrong_task_folder_passed(glue_root):
    with pytest.raises(
        DataError, match=r"missing column\(s\) \['sentence1', 'sentence2'\].*right task folder"
    ):
        load_task("rte", glue_root / "QNLI")


def test_label_out_of_range(glue_copy):
    path = glue_copy / "SST-2" / "dev.tsv"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace("\t0", "\t2")
    _rewrite(path, lines)
    with pytest.raises(DataError, match=r"1 label\(s\) are not class ids in 0\.\.1 .*: line 3: '2'") as e:
        load_task("sst2", glue_copy)
    _one_line(e)


def test_cola_with_a_header_is_reported(glue_copy):
    path = glue_copy / "CoLA" / "train.tsv"
    _rewrite(path, ["source\tlabel\toriginal\tsentence", *path.read_text().splitlines()])
    with pytest.raises(DataError, match=r"CoLA .*train.tsv: 1 label\(s\) are not class ids.*line 1: 'label'"):
        load_task("cola", glue_copy)


def test_unknown_label_strings(glue_copy):
    path = glue_copy / "MNLI" / "dev_matched.tsv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\tmaybe"
    _rewrite(path, lines)
    with pytest.raises(
        DataError,
        match=r"1 unknown label string\(s\) 'maybe' at line 4; "
        r"allowed labels: \['entailment', 'neutral', 'contradiction'\]",
    ) as e:
        load_task("mnli", glue_copy)
    _one_line(e)


def test_stsb_score_out_of_range_or_not_a_number(glue_copy):
    path = glue_copy / "STS-B" / "dev.tsv"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].rsplit("\t", 1)[0] + "\t7.5"
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\tabc"
    _rewrite(path, lines)
    with pytest.raises(
        DataError, match=r"2 target\(s\) are not finite numbers in \[0, 5\]: line 2: '7.5', line 3: 'abc'"
    ):
        load_task("stsb", glue_copy)


def test_malformed_rows_are_not_silently_padded(glue_copy):
    path = glue_copy / "RTE" / "train.tsv"
    lines = path.read_text().splitlines()
    lines[2] = "\t".join(lines[2].split("\t")[:3])  # label missing
    lines[3] = lines[3] + "\textra"
    _rewrite(path, lines)
    with pytest.raises(
        DataError, match=r"2 malformed row\(s\), expected 4 tab-separated fields: line 3 has 3, line 4 has 5"
    ) as e:
        load_task("rte", glue_copy)
    _one_line(e)
    cola = glue_copy / "CoLA" / "dev.tsv"
    _rewrite(cola, [*cola.read_text().splitlines(), "gj04\t1\tonly three"])
    with pytest.raises(DataError, match=r"expected 4 tab-separated fields: line 5 has 3"):
        load_task("cola", glue_copy)


def test_empty_split_and_empty_file(glue_copy):
    _rewrite(glue_copy / "RTE" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel"])
    with pytest.raises(DataError, match=r"split 'dev' is empty \(no data rows\)") as e:
        load_task("rte", glue_copy)
    _one_line(e)
    (glue_copy / "CoLA" / "dev.tsv").write_text("")  # headerless: an empty file is an empty split
    with pytest.raises(DataError, match=r"CoLA .*dev.tsv: split 'dev' is empty"):
        load_task("cola", glue_copy)
    (glue_copy / "SST-2" / "dev.tsv").write_text("")
    with pytest.raises(DataError, match=r"the file is empty"):
        load_task("sst2", glue_copy)


def test_bad_names_sources_and_splits(glue_root):
    with pytest.raises(DataError, match=r"WNLI is excluded") as e:
        load_task("wnli", glue_root)
    _one_line(e)
    with pytest.raises(
        DataError, match=r"unknown task 'boolq'; known tasks: cola, sst2, mrpc, stsb, qqp, mnli, mnli-mm"
    ):
        load_task("boolq", glue_root)
    with pytest.raises(DataError, match=r"unknown source 'web'"):
        load_task("sst2", glue_root, source="web")
    with pytest.raises(DataError, match=r"unknown split 'test'"):
        load_task("sst2", glue_root, splits=("train", "test"))
    with pytest.raises(DataError, match=r"splits is empty"):
        load_task("sst2", glue_root, splits=())
    with pytest.raises(DataError, match=r"only for rotten_tomatoes"):
        load_task("sst2", glue_root, source="package")
    with pytest.raises(DataError, match=r"split 'train' was not loaded"):
        load_task("sst2", glue_root, splits="dev").split("train")


def test_failed_reads_leave_files_untouched(glue_root, tree_digest):
    before = tree_digest(glue_root)
    for name in ("rte", "mnli-mm", "qqp"):
        with pytest.raises(DataError):
            load_task(name, glue_root / "SST-2")
    assert tree_digest(glue_root) == before
