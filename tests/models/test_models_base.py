"""QuantizedModel mechanics: counting, capture, selection, masks, copies, registry and loader errors."""

import copy
import json

import pytest
import torch
from models_helpers import all_on, main_output, padded_batch, tiny_model
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2Model

from pegq.models import (
    SUPPORTED_FAMILIES,
    ModelError,
    describe_quantizers,
    load_model,
    wrap,
)
from pegq.models.base import apply_mask


def test_bert_base_has_the_papers_161_activation_quantizers():
    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig())
    qm = wrap(model)
    acts = qm.activation_quantizers()
    # 3 embeddings + 12 layers x 13 + pooler + logits
    assert len(acts) == 161
    assert qm.num_layers == 12 and qm.hidden_size == 768
    assert len(qm.weight_quantizers()) == 3 + 12 * 6 + 1 + 1
    assert sum(n.endswith("ffn.residual_sum") for n in acts) == 12


def test_num_layers_read_from_the_model():
    model = tiny_model("bert", False)
    del model.encoder.layer[1]
    qm = wrap(model)
    assert qm.num_layers == 1
    assert not any(n.startswith("encoder.layer.1.") for n in qm.quantizers)
    with pytest.raises(ValueError, match="out of range"):
        qm.ffn_names(1)


def test_unknown_architecture():
    model = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(ValueError) as e:
        wrap(model)
    assert str(e.value) == (
        "unsupported architecture 'gpt2'; supported: bert, roberta, mpnet, distilbert, mobilebert"
    )
    assert SUPPORTED_FAMILIES == ("bert", "roberta", "mpnet", "distilbert", "mobilebert")


def test_unsupported_head_and_double_wrap():
    from transformers import BertForMaskedLM

    with pytest.raises(ValueError, match="unsupported model class BertForMaskedLM"):
        wrap(BertForMaskedLM(tiny_model("bert", False).config))
    model = tiny_model("bert", True)
    qm = wrap(model)
    with pytest.raises(ValueError, match="already"):
        wrap(model)
    with pytest.raises(ValueError, match="already"):
        wrap(qm)


def test_capture_patterns_and_nesting():
    model = tiny_model("bert", True)
    batch = padded_batch()
    qm = wrap(model)
    with qm.capture(["encoder.layer.*.ffn.residual_sum", "pooler"]) as outer:
        with qm.capture("encoder.layer.1.attn.scores") as inner:
            qm(**batch)
        qm(**batch)
    assert list(outer) == ["encoder.layer.0.ffn.residual_sum", "encoder.layer.1.ffn.residual_sum", "pooler"]
    assert [len(v) for v in outer.values()] == [2, 2, 2]
    assert len(inner["encoder.layer.1.attn.scores"]) == 1
    scores = inner["encoder.layer.1.attn.scores"][0]
    assert scores.shape == (3, 4, 9, 9)
    # scores are captured before the padding mask: finite, no finfo.min
    assert torch.isfinite(scores).all() and scores.abs().max() < 1e3
    qm(**batch)  # outside: nothing recorded
    assert [len(v) for v in outer.values()] == [2, 2, 2]
    with pytest.raises(ValueError, match="matches no activation quantizer"):
        with qm.capture("encoder.layer.0.attn.query.weight"):
            pass
    assert not qm._captures


def test_capture_records_inputs_even_when_quantizing():
    model = tiny_model("bert", False)
    qm = wrap(model)
    all_on(qm, 4)
    x = {"input_ids": torch.randint(5, 100, (2, 6))}
    names = ["encoder.layer.0.attn.layernorm", "encoder.layer.0.ffn.intermediate"]
    with torch.no_grad(), qm.capture(names) as c:
        qm(**x)
    ln = c["encoder.layer.0.attn.layernorm"][0]
    # the captured LayerNorm output is FP (not on a 4-bit grid): many more than 16 distinct values
    assert ln.unique().numel() > 16


def test_select_and_apply():
    qm = wrap(tiny_model("roberta", True))
    sel = qm.select("*.ffn.*", kind="activation")
    assert all(".ffn." in n and qm.kind(n) == "activation" for n in sel)
    assert len(sel) == 2 * 4
    seen = []
    qm.apply(lambda n, q: q.configure(bits=6), "classifier.*", kind="weight")
    for n, q in qm.quantizers.items():
        if q.enabled:
            seen.append(n)
    assert seen == ["classifier.dense.weight", "classifier.weight"]
    with pytest.raises(ValueError, match="matches no"):
        qm.select("nope.*")


@pytest.mark.parametrize("kind", ["bool", "additive", "additive_inf"])
def test_user_4d_masks_are_handled(kind):
    model = tiny_model("bert", True)
    batch = padded_batch()
    with torch.no_grad():
        ref = main_output(model(**batch))
    am = batch["attention_mask"].bool()
    m4 = am[:, None, None, :].expand(-1, 1, am.shape[1], -1)
    if kind == "bool":
        mask = m4
    else:
        fill = float("-inf") if kind == "additive_inf" else torch.finfo(torch.float32).min
        mask = torch.zeros(m4.shape).masked_fill(~m4, fill)
    qm = wrap(model)
    with torch.no_grad(), qm.capture("*attn.probs") as cap:
        out = main_output(qm(input_ids=batch["input_ids"], attention_mask=mask))
    assert (out - ref).abs().max() <= 1e-5
    probs = cap["encoder.layer.0.attn.probs"][0]
    assert probs[2, :, :, 2:].abs().max() == 0  # padded keys get no attention


def test_apply_mask_formats():
    s = torch.randn(1, 1, 2, 3)
    keep = torch.tensor([True, True, False])[None, None, None, :].expand(1, 1, 2, 3)
    a = torch.softmax(apply_mask(s, keep), -1)
    b = torch.softmax(apply_mask(s, torch.zeros(1, 1, 2, 3).masked_fill(~keep, -1e9)), -1)
    c = torch.softmax(apply_mask(s, keep.long()), -1)
    assert torch.allclose(a, b) and torch.equal(a, c) and a[..., 2].abs().max() == 0
    assert torch.equal(apply_mask(s, None), s)


def test_scores_quantized_before_mask():
    """A 16-bit softmax-input quantizer barely changes a padded batch; if the -inf/min mask were in its
    range every real score would collapse onto one grid step."""
    model = tiny_model("bert", True)
    batch = padded_batch()
    with torch.no_grad():
        ref = main_output(model(**batch))
    qm = wrap(model)
    for q in qm.select("*attn.scores").values():
        q.configure(bits=16)
    with torch.no_grad():
        out = main_output(qm(**batch))
    assert (out - ref).abs().max() < 1e-3


def test_deepcopy_is_independent():
    qm = wrap(tiny_model("bert", True))
    qm2 = copy.deepcopy(qm)
    assert qm2.model is not qm.model
    q = qm2.quantizers["encoder.layer.0.attn.query.weight"]
    assert q is qm2.model.bert.encoder.layer[0].attention.self.query.parametrizations.weight[0]
    with qm2.capture("pooler") as c2, qm.capture("pooler") as c1:
        qm2(**padded_batch())
    assert len(c2["pooler"]) == 1 and len(c1["pooler"]) == 0
    batch = padded_batch()
    with torch.no_grad():
        ref = main_output(qm(**batch))
    plain = qm2.unwrap()
    assert plain.config._attn_implementation == "sdpa"
    assert qm.model.config._attn_implementation == "pegq"
    assert not any("forward" in m.__dict__ for m in plain.modules())
    assert "forward" in qm.model.bert.embeddings.__dict__
    with torch.no_grad():
        assert torch.equal(main_output(qm(**batch)), ref)
        assert torch.equal(main_output(plain(**batch)), ref)


def test_state_dict_holds_quantizer_state_once_per_name():
    qm = wrap(tiny_model("bert", True))
    all_on(qm)
    qm(**padded_batch())
    keys = [k for k in qm.state_dict() if k.startswith("quantizer_modules.")]
    assert any(k.startswith("quantizer_modules.encoder__layer__0__ffn__residual_sum.") for k in keys)


def test_describe_quantizers_rows():
    qm = wrap(tiny_model("distilbert", True))
    qm.quantizers["encoder.layer.0.ffn.residual_sum"].configure(bits=8)
    rows = describe_quantizers(qm)
    assert [r["name"] for r in rows] == list(qm.quantizers)
    by = {r["name"]: r for r in rows}
    assert by["embeddings.word.weight"]["kind"] == "weight"
    assert by["embeddings.word.weight"]["shape"] == (100, 32)
    assert by["encoder.layer.0.ffn.intermediate.weight"]["shape"] == (37, 32)
    r = by["encoder.layer.0.ffn.residual_sum"]
    assert r["kind"] == "activation" and r["shape"] is None
    assert r["settings"].startswith("8b asym") and r["spec"]["bits"] == 8
    assert by["encoder.layer.0.ffn.output"]["settings"] == "off"
    json.dumps([r["spec"] for r in rows])


def test_cached_weights_context():
    qm = wrap(tiny_model("bert", True))
    all_on(qm)
    batch = padded_batch()
    with torch.no_grad():
        a = main_output(qm(**batch))
        with qm.cached_weights():
            b = main_output(qm(**batch))
    assert torch.allclose(a, b)


# --------------------------------------------------------------------------- loader


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(tmp_path)
    f = tmp_path / "file.bin"
    f.write_text("x")
    with pytest.raises(ModelError, match="not a folder"):
        load_model(f)
    # a hub id without hub access (HF_HUB_OFFLINE=1 in these tests): one clear line
    with pytest.raises(ModelError) as e:
        load_model("some-org/surely-not-cached-model-xyz")
    msg = str(e.value)
    assert "\n" not in msg and "hub" in msg and "local model folder" in msg


def test_load_model_rejects_unsupported_architecture(tmp_path):
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_model(tmp_path)


def test_load_model_tiny_folder_roundtrip(tmp_path, minilm_path):
    from transformers import AutoTokenizer

    model = tiny_model("bert", False)
    model.config.vocab_size = 100
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path)
    m, tok = load_model(tmp_path, num_labels=4)
    assert type(m).__name__ == "BertForSequenceClassification" and m.config.num_labels == 4
    assert m.config.problem_type is None
    m2, _ = load_model(str(tmp_path), for_classification=False)
    assert type(m2).__name__ == "BertModel"
    # a fine-tuned classifier with a different label count is refused clearly
    m.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    with pytest.raises(ModelError, match="classifier with 4 labels but the task has 2"):
        load_model(tmp_path / "clf", task_num_labels=2)
