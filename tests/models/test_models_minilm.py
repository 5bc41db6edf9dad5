"""The real MiniLM-L6 (a BERT: d=384, 6 layers, 12 heads) wrapped end to end."""

import copy

import pytest
import torch
from models_helpers import all_on
from torch import nn
from torch.nn.utils import parametrize

from pegq.models import load_model, wrap
from pegq.quant import Quantizer

EMB = [
    "embeddings.word.weight",
    "embeddings.token_type.weight",
    "embeddings.sum_token_type",
    "embeddings.position.weight",
    "embeddings.sum",
    "embeddings.layernorm",
]
LAYER = [
    "attn.query.weight",
    "attn.query",
    "attn.key.weight",
    "attn.key",
    "attn.value.weight",
    "attn.value",
    "attn.scores",
    "attn.probs",
    "attn.context",
    "attn.output.weight",
    "attn.output",
    "attn.residual_sum",
    "attn.layernorm",
    "ffn.intermediate.weight",
    "ffn.intermediate",
    "ffn.output.weight",
    "ffn.output",
    "ffn.residual_sum",
    "ffn.layernorm",
]
# docs/architecture.md, per-layer activation table
DOC_LAYER_ACTS = {
    "attn.query",
    "attn.key",
    "attn.value",
    "attn.scores",
    "attn.probs",
    "attn.context",
    "attn.output",
    "attn.residual_sum",
    "attn.layernorm",
    "ffn.intermediate",
    "ffn.output",
    "ffn.residual_sum",
    "ffn.layernorm",
}


@pytest.fixture(scope="module")
def loaded(minilm_path, minilm_batch):
    model, tok = load_model(minilm_path, for_classification=False)
    assert type(model).__name__ == "BertModel"
    assert minilm_batch["attention_mask"].eq(0).any(), "the batch must be padded"
    with torch.no_grad():
        ref = model(**minilm_batch)
    return model, ref


@pytest.fixture
def fresh(loaded):
    model, ref = loaded
    return copy.deepcopy(model), ref


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def test_off_equals_original_on_padded_batch(fresh, minilm_batch):
    model, ref = fresh
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        ref_eager = eager(**minilm_batch)
    qm = wrap(model)
    assert all(not q.enabled for q in qm.quantizers.values())
    with torch.no_grad():
        out = qm(**minilm_batch)
    assert type(out) is type(ref)
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max() <= 1e-5
    assert (out.pooler_output - ref.pooler_output).abs().max() <= 1e-5
    # forcing the quantizing (eager) attention path with everything off: the original in eager mode
    # (sdpa and eager themselves differ by ~2e-5 here: the residual stream reaches |x| > 200)
    with torch.no_grad(), qm.capture("*attn.scores") as cap:
        out2 = qm(**minilm_batch)
    assert len(cap) == 6 and all(len(v) == 1 for v in cap.values())
    assert (out2.last_hidden_state - ref_eager.last_hidden_state).abs().max() <= 1e-5
    assert (out2.last_hidden_state - ref.last_hidden_state).abs().max() <= 1e-4


def test_names_follow_documented_scheme(fresh):
    model, _ = fresh
    qm = wrap(model)
    assert qm.family == "bert" and qm.num_layers == 6 and qm.hidden_size == 384
    expected = EMB + [f"encoder.layer.{i}.{n}" for i in range(6) for n in LAYER] + ["pooler.weight", "pooler"]
    assert list(qm.quantizers) == expected
    acts = qm.activation_quantizers()
    assert len(acts) == 3 + 6 * 13 + 1
    for i in range(6):
        prefix = f"encoder.layer.{i}."
        layer_acts = {n[len(prefix) :] for n in acts if n.startswith(prefix)}
        assert layer_acts == DOC_LAYER_ACTS
    assert all(n.endswith(".weight") for n in qm.weight_quantizers())
    assert all(isinstance(q, Quantizer) and q.name == n for n, q in qm.quantizers.items())
    assert qm.ffn_names(5) == {
        "input": "encoder.layer.5.attn.layernorm",
        "output": "encoder.layer.5.ffn.output",
        "residual_sum": "encoder.layer.5.ffn.residual_sum",
    }


def test_every_linear_and_embedding_weight_quantized(fresh):
    model, _ = fresh
    qm = wrap(model)
    wq = set(map(id, qm.weight_quantizers().values()))
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            assert parametrize.is_parametrized(m, "weight"), name
            assert id(m.parametrizations.weight[0]) in wq, name
            n += 1
        if isinstance(m, nn.LayerNorm):
            assert not parametrize.is_parametrized(m), name
    assert n == len(wq) == 3 + 6 * 6 + 1


def test_all_8bit_on_changes_output_a_little_and_shows_outliers(fresh, minilm_batch):
    model, ref = fresh
    qm = wrap(model)
    all_on(qm, 8)
    with torch.no_grad(), qm.capture("*.ffn.residual_sum") as cap:
        out = qm(**minilm_batch)
    h = out.last_hidden_state
    assert torch.isfinite(h).all()
    assert (h - ref.last_hidden_state).abs().max() > 1e-4
    mask = minilm_batch["attention_mask"]
    cos = torch.nn.functional.cosine_similarity(mean_pool(h, mask), mean_pool(ref.last_hidden_state, mask))
    assert cos.min() > 0.6, cos
    B, T = minilm_batch["input_ids"].shape
    assert list(cap) == [f"encoder.layer.{i}.ffn.residual_sum" for i in range(6)]
    for xs in cap.values():
        assert len(xs) == 1
        assert xs[0].shape == (B, T, 384) and xs[0].dtype == torch.float32 and xs[0].device.type == "cpu"
        assert not xs[0].requires_grad
    # MiniLM's real structured outliers in the FFN residual sum
    assert max(x[0].abs().max().item() for x in cap.values()) > 50


def test_unwrap_restores_exact_outputs_and_removes_everything(fresh, minilm_batch):
    model, ref = fresh
    impl = model.config._attn_implementation
    weights = {n: p for n, p in model.named_parameters()}
    qm = wrap(model)
    all_on(qm, 4)
    with torch.no_grad():
        qm(**minilm_batch)
    back = qm.unwrap()
    assert back is model
    assert model.config._attn_implementation == impl
    for name, m in model.named_modules():
        assert not parametrize.is_parametrized(m), name
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert "forward" not in m.__dict__ and "_pegq_attn" not in m.__dict__, name
    after = dict(model.named_parameters())
    assert after.keys() == weights.keys()
    assert all(after[n] is weights[n] for n in weights)
    with torch.no_grad():
        out = model(**minilm_batch)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    with pytest.raises(RuntimeError):
        qm(**minilm_batch)


def test_load_for_classification_regression_head(minilm_path):
    model, tok = load_model(minilm_path, task_num_labels=1)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    assert tok is not None
    qm = wrap(model)
    assert list(qm.quantizers)[-2:] == ["classifier.weight", "classifier.output"]
    assert len(qm.activation_quantizers()) == 3 + 6 * 13 + 2
