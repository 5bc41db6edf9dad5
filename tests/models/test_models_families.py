"""Every supported family on tiny random models, with and without a sequence-classification head."""

import copy

import pytest
import torch
from models_helpers import FAMILIES, all_on, main_output, pad_id_of, padded_batch, tiny_model
from torch import nn
from torch.nn.utils import parametrize

from pegq.models import QuantizedModel, wrap

CASES = [(f, h) for f in FAMILIES for h in (False, True)]
IDS = [f"{f}-{'head' if h else 'bare'}" for f, h in CASES]

# (activation, weight) quantizer counts of the 2-layer tiny configs
COUNTS = {
    ("bert", False): (30, 16),
    ("bert", True): (31, 17),
    ("roberta", False): (30, 16),
    ("roberta", True): (31, 17),
    ("mpnet", False): (29, 16),
    ("mpnet", True): (30, 17),
    ("distilbert", False): (28, 14),
    ("distilbert", True): (30, 16),
    ("mobilebert", False): (53, 27),
    ("mobilebert", True): (54, 28),
}

PER_LAYER = [
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
]


def eager_copy(model):
    ref = copy.deepcopy(model)
    ref.config._attn_implementation = "eager"
    return ref


@pytest.mark.parametrize(("family", "head"), CASES, ids=IDS)
def test_off_equals_original_on_padded_batch(family, head):
    model = tiny_model(family, head)
    batch = padded_batch(pad_id_of(model))
    ref_model = eager_copy(model)
    with torch.no_grad():
        ref = main_output(model(**batch))
        ref_eager = main_output(ref_model(**batch))
    qm = wrap(model)
    assert isinstance(qm, QuantizedModel) and qm.family == family and qm.num_layers == 2
    with torch.no_grad():
        out = main_output(qm(**batch))
        # capturing every point forces the quantizing (eager) attention path
        with qm.capture() as cap:
            out_eager = main_output(qm(**batch))
    assert (out - ref).abs().max() <= 1e-5
    assert (out_eager - ref_eager).abs().max() <= 1e-5
    assert (out_eager - ref).abs().max() <= 1e-5
    # every activation point saw data exactly once
    assert set(cap) == set(qm.activation_quantizers())
    assert all(len(v) == 1 for v in cap.values()), [n for n, v in cap.items() if len(v) != 1]


@pytest.mark.parametrize(("family", "head"), CASES, ids=IDS)
def test_quantizers_named_present_and_cover_every_weight(family, head):
    model = tiny_model(family, head)
    qm = wrap(model)
    acts, ws = qm.activation_quantizers(), qm.weight_quantizers()
    assert (len(acts), len(ws)) == COUNTS[(family, head)]
    assert len(qm.quantizers) == len(acts) + len(ws)
    for i in range(2):
        for n in PER_LAYER:
            assert f"encoder.layer.{i}.{n}" in acts
        for n in ("attn.query", "attn.key", "attn.value", "attn.output", "ffn.intermediate", "ffn.output"):
            assert f"encoder.layer.{i}.{n}.weight" in ws
        names = qm.ffn_names(i)
        assert names["output"] == f"encoder.layer.{i}.ffn.output"
        assert names["residual_sum"] == f"encoder.layer.{i}.ffn.residual_sum"
        assert names["input"] in acts
    assert {"embeddings.sum", "embeddings.layernorm"} <= set(acts)
    assert ("embeddings.sum_token_type" in acts) == (family in ("bert", "roberta", "mobilebert"))
    assert ("classifier.output" in acts) == head
    assert ("classifier.dense" in acts) == (head and family in ("roberta", "mpnet", "distilbert"))
    assert {"embeddings.word.weight", "embeddings.position.weight"} <= set(ws)
    # every Linear and every embedding table has a weight quantizer, nothing else does
    wq = {id(q) for q in ws.values()}
    covered = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            assert parametrize.is_parametrized(m, "weight"), name
            assert id(m.parametrizations.weight[0]) in wq, name
            covered += 1
        elif parametrize.is_parametrized(m):
            pytest.fail(f"unexpected parametrization on {name}")
    assert covered == len(ws)


@pytest.mark.parametrize(("family", "head"), CASES, ids=IDS)
def test_quantized_forward_finite_and_unwrap(family, head):
    model = tiny_model(family, head)
    batch = padded_batch(pad_id_of(model))
    with torch.no_grad():
        ref = main_output(model(**batch))
    qm = wrap(model)
    all_on(qm, 8)
    with torch.no_grad():
        out = main_output(qm(**batch))
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref)
    keep = batch["attention_mask"].bool() if out.dim() == 3 else slice(None)
    assert (out[keep] - ref[keep]).abs().max() < 0.5
    m = qm.unwrap()
    with torch.no_grad():
        assert torch.equal(main_output(m(**batch)), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_qat_gradients_reach_fp32_weights(family):
    model = tiny_model(family, True)
    batch = padded_batch(pad_id_of(model))
    qm = wrap(model)
    all_on(qm, 8)
    qm.train()
    out = qm(**batch, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and parametrize.is_parametrized(m, "weight"):
            assert m.parametrizations.weight.original.grad is not None, name


MOBILEBERT_VARIANTS = {
    "no-bottleneck": dict(use_bottleneck=False, true_hidden_size=32, num_feedforward_networks=1),
    "layer-norm-no-trigram": dict(normalization_type="layer_norm", trigram_input=False, embedding_size=32),
    "bottleneck-attention": dict(use_bottleneck_attention=True, num_feedforward_networks=3),
    "no-shared-qk-no-pooler": dict(
        key_query_shared_bottleneck=False, use_bottleneck_attention=True, classifier_activation=False
    ),
}


@pytest.mark.parametrize("variant", list(MOBILEBERT_VARIANTS))
def test_mobilebert_config_variants(variant):
    from models_helpers import tiny_config
    from transformers import MobileBertForSequenceClassification

    cfg = tiny_config("mobilebert")
    for k, v in MOBILEBERT_VARIANTS[variant].items():
        setattr(cfg, k, v)
    if not cfg.use_bottleneck:
        cfg.intra_bottleneck_size = cfg.true_hidden_size = cfg.hidden_size
    torch.manual_seed(0)
    model = MobileBertForSequenceClassification(cfg).eval()
    batch = padded_batch(pad_id_of(model))
    with torch.no_grad():
        ref = model(**batch).logits
    qm = wrap(model)
    with torch.no_grad(), qm.capture() as cap:
        out = qm(**batch).logits
    assert (out - ref).abs().max() <= 1e-5
    assert all(len(v) == 1 for v in cap.values()), [n for n, v in cap.items() if len(v) != 1]
    n_ffn = cfg.num_feedforward_networks
    acts = qm.activation_quantizers()
    assert sum(n.endswith("residual_sum") and ".ffn." in n for n in acts) == 2 * n_ffn
    assert ("pooler" in acts) == cfg.classifier_activation
    assert ("encoder.layer.0.output_bottleneck.residual_sum" in acts) == cfg.use_bottleneck
    # every Linear / Embedding is covered, except modules the config leaves unused (they never see data)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and not parametrize.is_parametrized(m, "weight"):
            assert name.endswith(("embedding_transformation", "bottleneck.attention.dense")), name
    all_on(qm, 8)
    with torch.no_grad():
        assert torch.isfinite(qm(**batch).logits).all()


def test_distilbert_sinusoidal_and_inputs_embeds_paths():
    from models_helpers import tiny_config
    from transformers import DistilBertModel

    cfg = tiny_config("distilbert")
    cfg.sinusoidal_pos_embds = True
    torch.manual_seed(0)
    model = DistilBertModel(cfg).eval()
    batch = padded_batch()
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    qm = wrap(model)
    with torch.no_grad():
        assert (qm(**batch).last_hidden_state - ref).abs().max() <= 1e-5

    # BERT adapter embeddings: explicit token types / positions and inputs_embeds
    model = tiny_model("bert", False)
    emb = model.embeddings.word_embeddings(batch["input_ids"]).detach()
    tt = torch.randint(0, 2, batch["input_ids"].shape)
    pos = torch.arange(9).flip(0)[None].expand(3, -1)
    kw = [
        dict(input_ids=batch["input_ids"], token_type_ids=tt, position_ids=pos),
        dict(inputs_embeds=emb, attention_mask=batch["attention_mask"]),
    ]
    with torch.no_grad():
        refs = [model(**k).last_hidden_state for k in kw]
    qm = wrap(model)
    with torch.no_grad(), qm.capture("embeddings.sum_token_type") as cap:
        for k, r in zip(kw, refs, strict=True):
            assert (qm(**k).last_hidden_state - r).abs().max() <= 1e-5
    assert len(cap["embeddings.sum_token_type"]) == 2
