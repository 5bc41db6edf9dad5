"""Encoding with the real MiniLM (BERT) tokenizer, DataLoaders and seeded subsets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pegq.data import (
    MAX_LENGTH,
    DataError,
    EncodedDataset,
    Split,
    encode,
    load_task,
    make_dataloader,
    random_subset,
    subset_indices,
)


def test_single_sentences_to_128(glue_root, tokenizer):
    task = load_task("sst2", glue_root)
    enc = encode(task.train, tokenizer)
    assert isinstance(enc, EncodedDataset) and len(enc) == 5
    assert set(enc.columns) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert enc.tensors[k].shape == (5, MAX_LENGTH) == (5, 128)
        assert enc.tensors[k].dtype == torch.int64
    assert enc.tensors["labels"].dtype == torch.int64
    assert enc.tensors["labels"].tolist() == task.train.labels.tolist()
    ids, mask = enc.tensors["input_ids"][0], enc.tensors["attention_mask"][0]
    n = int(mask.sum())
    assert ids[0] == tokenizer.cls_token_id and ids[n - 1] == tokenizer.sep_token_id
    assert (ids[n:] == tokenizer.pad_token_id).all() and tokenizer.pad_token == "[PAD]"
    assert (mask[:n] == 1).all() and (mask[n:] == 0).all()
    assert (enc.tensors["token_type_ids"] == 0).all()
    expected = tokenizer(task.train.text_a[0])["input_ids"]
    assert ids[:n].tolist() == expected


def test_pairs_are_encoded_as_pairs(glue_root, tokenizer):
    task = load_task("rte", glue_root)
    enc = encode(task.dev, tokenizer)
    ex = enc[0]
    n = int(ex["attention_mask"].sum())
    ref = tokenizer(task.dev.text_a[0], task.dev.text_b[0])
    assert ex["input_ids"][:n].tolist() == ref["input_ids"]
    assert ex["token_type_ids"][:n].tolist() == ref["token_type_ids"]
    assert ex["token_type_ids"][:n].max() == 1 and ex["token_type_ids"][n:].max() == 0
    assert (ex["input_ids"] == tokenizer.sep_token_id).sum() == 2


def test_regression_labels_are_float(glue_root, tokenizer):
    enc = encode(load_task("stsb", glue_root).dev, tokenizer)
    assert enc.tensors["labels"].dtype == torch.float32
    np.testing.assert_allclose(enc.tensors["labels"].numpy(), [5.0, 4.75, 5.0, 2.4, 0.0], atol=1e-6)


def test_long_inputs_are_truncated(tokenizer):
    long = " ".join(["word"] * 400)
    split = Split("dev", [long, "short"], [long, "also short"], np.array([0, 1]))
    enc = encode(split, tokenizer)
    assert enc.tensors["input_ids"].shape == (2, 128)
    assert enc.tensors["attention_mask"][0].all()  # filled to 128 exactly
    assert enc.tensors["input_ids"][0, -1] == tokenizer.sep_token_id
    assert enc.tensors["token_type_ids"][0].max() == 1  # both segments kept (longest_first)
    small = encode(split, tokenizer, max_length=16, chunk_size=1)  # chunked encoding concatenates
    assert small.tensors["input_ids"].shape == (2, 16)


def test_tokenizer_without_token_type_ids(tokenizer, glue_root):
    tok = copy.deepcopy(tokenizer)
    tok.model_input_names = ["input_ids", "attention_mask"]
    enc = encode(load_task("sst2", glue_root).dev, tok)
    assert set(enc.columns) == {"input_ids", "attention_mask", "labels"}


def test_dataloader_batches_and_seeded_shuffle(glue_root, tokenizer):
    enc = encode(load_task("sst2", glue_root).train, tokenizer)
    batches = list(make_dataloader(enc, batch_size=2))
    assert [b["input_ids"].shape for b in batches] == [(2, 128), (2, 128), (1, 128)]
    assert torch.equal(torch.cat([b["labels"] for b in batches]), enc.tensors["labels"])

    def order(seed):
        return torch.cat(
            [b["input_ids"][:, 1] for b in make_dataloader(enc, 2, shuffle=True, seed=seed)]
        ).tolist()

    assert order(0) == order(0)
    assert sorted(order(0)) == sorted(enc.tensors["input_ids"][:, 1].tolist())
    assert any(order(0) != order(s) for s in (1, 2, 3))
    # a Subset of an EncodedDataset goes through the same collation
    sub = random_subset(torch.utils.data.ConcatDataset([enc]), 3, seed=0)
    (batch,) = list(make_dataloader(sub, 3))
    assert batch["input_ids"].shape == (3, 128)
    (batch,) = list(make_dataloader(torch.utils.data.Subset(enc, [4, 0]), 8))  # batched __getitems__ path
    assert torch.equal(batch["labels"], enc.tensors["labels"][[4, 0]])


def test_random_subset_is_deterministic_and_nested(glue_root, tokenizer):
    assert subset_indices(100, 10, seed=3).tolist() == subset_indices(100, 10, seed=3).tolist()
    assert subset_indices(100, 10, seed=3).tolist() != subset_indices(100, 10, seed=4).tolist()
    big = subset_indices(100, 50, seed=7)
    assert subset_indices(100, 16, seed=7).tolist() == big[:16].tolist()
    assert len(set(big.tolist())) == 50
    assert subset_indices(10, 3, seed=0).tolist() == np.random.default_rng(0).permutation(10)[:3].tolist()

    train = load_task("sst2", glue_root).train
    sub = random_subset(train, 3, seed=1)
    idx = subset_indices(5, 3, seed=1)
    assert isinstance(sub, Split) and sub.text_a == [train.text_a[i] for i in idx]
    enc = encode(train, tokenizer)
    esub = random_subset(enc, 3, seed=1)
    assert isinstance(esub, EncodedDataset)
    assert torch.equal(esub.tensors["input_ids"], enc.tensors["input_ids"][torch.as_tensor(idx)])


def test_encoding_errors(tokenizer, glue_root):
    dev = load_task("sst2", glue_root).dev
    with pytest.raises(DataError, match="asked for 4 examples but the data has only 3"):
        random_subset(dev, 4, seed=0)
    with pytest.raises(DataError, match="n must be a positive integer"):
        random_subset(dev, 0, seed=0)
    with pytest.raises(DataError, match="split 'dev' is empty"):
        encode(dev.select([]), tokenizer)
    with pytest.raises(DataError, match="expected a pegq.data.Split"):
        encode(["text"], tokenizer)
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    with pytest.raises(DataError, match="no pad token"):
        encode(dev, tok)
    with pytest.raises(DataError, match="batch_size must be a positive integer"):
        make_dataloader(encode(dev, tokenizer), 0)


def test_spec_check_slicing_and_aliases(glue_root, tokenizer):
    from pegq.data import make_loader, sample

    task = load_task("stsb", glue_root)
    enc = encode(task.dev[:3], tokenizer, task.spec, max_length=32)
    assert enc.tensors["input_ids"].shape == (3, 32) and enc.tensors["labels"].dtype == torch.float32
    assert task.dev[1:].text_a == task.dev.text_a[1:] and len(task.dev[:0]) == 0
    assert make_loader is make_dataloader and sample is random_subset
    sst = load_task("sst2", glue_root)
    with pytest.raises(DataError, match="task 'stsb' needs float regression targets"):
        encode(sst.dev, tokenizer, task.spec)
    with pytest.raises(DataError, match="task 'rte' has 2 text field"):
        encode(sst.dev, tokenizer, load_task("rte", glue_root).spec)
    with pytest.raises(DataError, match="pass max_length= by keyword"):
        encode(sst.dev, tokenizer, 64)
