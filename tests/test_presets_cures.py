"""The paper's PTQ cures: per-quantizer overrides, the Table 4/5/6 presets resolved on real models, the
16-bit share, and the range-based permutation of PEG (paper section 4)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pegq.api import apply_config, calibrate, quantizer_summary
from pegq.config import (
    PRESETS,
    ConfigError,
    QuantConfig,
    get_preset,
    parse_override,
)
from pegq.models import load_model, wrap
from pegq.peg import prepare_permutations, quantizers_off, range_permutation
from pegq.pipeline import a16_share
from pegq.quant import PerEmbedding, PerEmbeddingGroup, PerTensor, Quantizer
from pegq.quant.granularity import group_index_from_perm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CURES = ["peg-1", "mp-ptq-res", "mp-ptq-ffn", "mp-ptq", "peg-d-all", "peg-d", "peg-6", "peg-3", "peg-3p",
         "peg-6p", "peg-ptq"]
FFN_KINDS = ("attn.layernorm", "ffn.output", "ffn.residual_sum")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def minilm_cls(minilm_path):
    """Real MiniLM-L6 with a 2-class head (83 activation quantizers)."""
    torch.manual_seed(0)
    m, tok = load_model(minilm_path, num_labels=2)
    return wrap(m), tok


@pytest.fixture(scope="module")
def minilm_bare(minilm_path):
    """Real MiniLM-L6 without a head (82 activation quantizers)."""
    m, _ = load_model(minilm_path, for_classification=False)
    return wrap(m)


@pytest.fixture(scope="module")
def bert_base():
    """Random-init BERT-base architecture (12 layers, d=768) with a 2-class head; small vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=512, num_labels=2)
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (12, 768)
    return wrap(BertForSequenceClassification(cfg).eval())


def names_weight(qm) -> dict[str, bool]:
    ws = qm.weight_quantizers()
    return {n: n in ws for n in qm.quantizers}


def a16_names(qm) -> set[str]:
    return {n for n, q in qm.activation_quantizers().items() if q.bits == 16}


def kind_of(name: str) -> str:
    return name.split(".", 3)[-1] if name.startswith("encoder.layer.") else name


# --------------------------------------------------------------------------- 1. override grammar
@pytest.mark.parametrize(
    "text, field, value",
    [
        ("encoder.layer.*.ffn.residual_sum=a16", "bits", 16),
        ("encoder.layer.*.attn.scores=w4", "bits", 4),
        ("encoder.layer.*.attn.scores=off", "bits", None),
        ("encoder.layer.*.attn.scores=tensor", "granularity", "tensor"),
        ("encoder.layer.*.attn.scores=channel2", "axis", 2),
        ("encoder.layer.*.attn.scores=embedding", "granularity", "embedding"),
        ("encoder.layer.*.attn.scores=peg12", "groups", 12),
        ("encoder.layer.*.attn.scores=mse", "estimator", "mse"),
        ("encoder.layer.*.attn.scores=running", "estimator", "running_minmax"),
        ("encoder.layer.*.attn.scores=min-max", "estimator", "current_minmax"),
        ("encoder.layer.*.attn.scores=sym", "symmetric", True),
        ("pooler=a16,optional", "optional", True),
    ],
)
def test_override_tokens_cover_bits_onoff_granularity_estimator(text, field, value):
    o = parse_override(text)
    assert getattr(o, field) == value
    assert parse_override(o.text()) == o  # the text form round-trips, `optional` included


def test_override_changes_only_what_it_names():
    c = get_preset("w8a8").with_overrides(["x=peg6p", "x=a16", "x=mse"])
    s = c.resolve({"x": False, "y": False})
    assert (s["x"].bits, s["x"].granularity, s["x"].groups, s["x"].permute, s["x"].estimator) == (
        16, "peg", 6, True, "mse")
    assert (s["y"].bits, s["y"].granularity, s["y"].estimator) == (8, "tensor", "running_minmax")


@pytest.mark.parametrize("text", ["x=peg0", "x=a0", "x=2bits", "x=off;rm", "x=peg6q", "x=channelx", "=off"])
def test_malformed_overrides_are_config_errors(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_bad_pattern_lists_close_real_names(minilm_cls):
    qm, _ = minilm_cls
    cfg = get_preset("w8a8").with_overrides(["encoder.layer.*.ffn.residual_summ=a16"])
    with pytest.raises(ConfigError, match=r"matches no quantizer; close names: .*ffn\.residual_sum"):
        cfg.resolve(names_weight(qm))
    cfg = get_preset("w8a8").with_overrides(["nothing.like.this=a16"])
    with pytest.raises(ConfigError, match="matches no quantizer"):
        cfg.resolve(names_weight(qm))


def test_optional_pattern_may_match_nothing(minilm_bare):
    names = names_weight(minilm_bare)
    assert "classifier.output" not in names
    get_preset("w8a8").with_overrides(["classifier.output=a16,optional"]).resolve(names)  # no error
    with pytest.raises(ConfigError, match="classifier.output"):
        get_preset("w8a8").with_overrides(["classifier.output=a16"]).resolve(names)


def test_overrides_reach_the_real_quantizers(minilm_cls):
    qm, _ = minilm_cls
    cfg = get_preset("w8a8").with_overrides(
        ["encoder.layer.3.ffn.residual_sum=a16", "encoder.layer.*.attn.probs=off",
         "encoder.layer.*.ffn.output=peg6p,mse", "encoder.layer.*.attn.query.weight=w4,channel0"])
    apply_config(qm, cfg)
    q = qm.quantizers
    assert q["encoder.layer.3.ffn.residual_sum"].bits == 16 and q["encoder.layer.2.ffn.residual_sum"].bits == 8
    assert all(not q[f"encoder.layer.{i}.attn.probs"].enabled for i in range(6))
    assert q["encoder.layer.0.ffn.output"].granularity == PerEmbeddingGroup(6, True)
    assert q["encoder.layer.0.ffn.output"].estimator.kind == "mse"
    w = q["encoder.layer.5.attn.query.weight"]
    assert (w.bits, w.symmetric, w.granularity.describe()) == (4, True, "channel(axis=0)")


# --------------------------------------------------------------------------- 2. presets
def test_cure_presets_are_registered_and_documented():
    import pegq.config as config_module

    for name in CURES:
        assert name in PRESETS
        assert f"``{name}``" in config_module.__doc__, name
        c = get_preset(name)
        assert c.name == name and c.description
        # section 5: current min-max from a single calibration sequence; 8-bit weights and activations
        assert (c.calibration.batch_size, c.calibration.num_batches) == (1, 1)
        assert (c.activations.bits, c.activations.estimator, c.weights.bits) == (8, "current_minmax", 8)
        assert QuantConfig.from_json(c.to_json()) == c


def test_peg_ptq_is_k6_permuted_on_the_ffn():
    a, b = get_preset("peg-ptq"), get_preset("peg-6p")
    assert a.overrides == b.overrides


def _resolve(qm, preset):
    apply_config(qm, get_preset(preset))
    return qm.activation_quantizers()


@pytest.mark.parametrize(
    "preset, n16",
    [("peg-1", 0), ("mp-ptq-res", 6), ("mp-ptq-ffn", 18), ("mp-ptq", 20)],
)
def test_mixed_precision_presets_on_minilm(minilm_cls, preset, n16):
    qm, _ = minilm_cls
    acts = _resolve(qm, preset)
    assert len(acts) == 83
    hi = a16_names(qm)
    assert len(hi) == n16
    assert a16_share(quantizer_summary(qm)) == {"a16_count": n16, "a16_share": n16 / 83}
    assert all(q.bits == 8 for n, q in acts.items() if n not in hi)
    assert all(q.bits == 8 for q in qm.weight_quantizers().values())
    if preset == "mp-ptq-res":
        assert hi == {f"encoder.layer.{i}.ffn.residual_sum" for i in range(6)}
    if preset == "mp-ptq-ffn":
        assert hi == {f"encoder.layer.{i}.{k}" for i in range(6) for k in FFN_KINDS}
    if preset == "mp-ptq":
        assert hi - {f"encoder.layer.{i}.{k}" for i in range(6) for k in FFN_KINDS} == {"pooler",
                                                                                         "classifier.output"}
        assert acts["classifier.output"].estimator.kind == "mse"
        assert acts["pooler"].estimator.kind == "current_minmax"


def test_mp_ptq_on_a_bare_encoder(minilm_bare):
    acts = _resolve(minilm_bare, "mp-ptq")
    assert len(acts) == 82
    assert len(a16_names(minilm_bare)) == 19  # 18 FFN tensors + the pooler; no logits to keep


@pytest.mark.parametrize("preset, n16", [("mp-ptq-res", 12), ("mp-ptq-ffn", 36), ("mp-ptq", 38)])
def test_mixed_precision_share_on_bert_base(bert_base, preset, n16):
    """Paper section 5: "36 out of 161 activation quantizers for BERT-base" = FFN input, output and
    residual sum of the 12 layers (MP-PTQ*+); the final-output variant adds the pooler and the logits."""
    _resolve(bert_base, preset)
    s = quantizer_summary(bert_base)
    assert s["activation_quantizers"] == 161
    assert a16_share(s)["a16_count"] == n16


@pytest.mark.parametrize(
    "preset, gran, count",
    [
        ("peg-d", PerEmbedding(), 18),
        ("peg-6", PerEmbeddingGroup(6, False), 18),
        ("peg-3", PerEmbeddingGroup(3, False), 18),
        ("peg-3p", PerEmbeddingGroup(3, True), 18),
        ("peg-6p", PerEmbeddingGroup(6, True), 18),
        ("peg-ptq", PerEmbeddingGroup(6, True), 18),
        ("peg-d-all", PerEmbedding(), 83 - 12 - 2),
    ],
)
def test_peg_presets_on_minilm(minilm_cls, preset, gran, count):
    qm, _ = minilm_cls
    acts = _resolve(qm, preset)
    hit = {n for n, q in acts.items() if q.granularity == gran}
    assert len(hit) == count
    assert all(q.granularity == PerTensor() for n, q in acts.items() if n not in hit)
    assert all(q.bits == 8 for q in acts.values())
    if preset != "peg-d-all":
        assert {kind_of(n) for n in hit} == set(FFN_KINDS)
    else:  # softmax input/output: the last dim is a key position, not an embedding dim; the head has
        # one vector per sequence (per-dim ranges from one calibration sequence would be single values)
        assert {kind_of(n) for n in acts if n not in hit} == {"attn.scores", "attn.probs", "pooler",
                                                               "classifier.output"}


@pytest.mark.parametrize("names", [("mp-ptq", "peg-d-all", "peg-3p")])
def test_cures_calibrate_and_run_on_minilm(minilm_cls, names):
    """One preset per mechanism (16-bit + MSE logits, per-embedding everywhere, permuted PEG)
    configures, calibrates on one real sequence and gives finite logits that differ from FP32."""
    qm, tok = minilm_cls
    batch = dict(tok(["a gripping, beautifully shot film ."], padding="max_length", max_length=32,
                     return_tensors="pt"))
    evalb = dict(tok(["dull .", "the best movie of the year , by far"], padding="max_length", max_length=32,
                     return_tensors="pt"))
    with quantizers_off(qm):
        ref = qm(**evalb).logits
    for name in names:
        apply_config(qm, get_preset(name))
        calibrate(qm, [batch], progress=False)
        with qm.cached_weights():
            out = qm(**evalb).logits
        assert torch.isfinite(out).all(), name
        assert not torch.equal(out, ref), name  # quantization is really on


def _tiny(family: str, head: bool):
    """A tiny random encoder of ``family`` whose FFN width (24) K=3 and K=6 divide."""
    import transformers as tf

    small = dict(vocab_size=100, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=36, max_position_embeddings=64, num_labels=2)
    cfgs = {
        "bert": lambda: tf.BertConfig(**small),
        "roberta": lambda: tf.RobertaConfig(**small, type_vocab_size=1, pad_token_id=1),
        "mpnet": lambda: tf.MPNetConfig(**small),
        "distilbert": lambda: tf.DistilBertConfig(vocab_size=100, dim=24, n_layers=2, n_heads=4, hidden_dim=36,
                                                  max_position_embeddings=64, num_labels=2),
        "mobilebert": lambda: tf.MobileBertConfig(**small, embedding_size=12, intra_bottleneck_size=24,
                                                  true_hidden_size=24, num_feedforward_networks=2),
    }
    prefix = {"bert": "Bert", "roberta": "Roberta", "mpnet": "MPNet", "distilbert": "DistilBert",
              "mobilebert": "MobileBert"}[family]
    cls = getattr(tf, f"{prefix}ForSequenceClassification" if head else f"{prefix}Model")
    torch.manual_seed(0)
    return cls(cfgs[family]()).eval()


@pytest.mark.parametrize("family", ["bert", "roberta", "mpnet", "distilbert", "mobilebert"])
@pytest.mark.parametrize("head", [True, False])
def test_every_cure_works_on_every_family(family, head, one_thread):
    """The presets' patterns exist in every adapter (head patterns are optional), and every preset
    calibrates and runs; the mixed-precision presets keep 3 FFN tensors per layer at 16 bits."""
    qm = wrap(_tiny(family, head))
    pad = 1 if family == "roberta" else 0
    ids = torch.tensor([[5, 17, 23, 42, 9, 11, 7, 3], [5, 30, 31, 8, pad, pad, pad, pad]])
    batch = {"input_ids": ids, "attention_mask": (ids != pad).long()}
    calib = [{k: v[:1] for k, v in batch.items()}]
    n_layers = qm.num_layers
    for name in CURES:
        apply_config(qm, get_preset(name))
        calibrate(qm, calib, progress=False)
        with torch.no_grad():
            out = qm(**batch)
        y = out.logits if head else out.last_hidden_state
        assert torch.isfinite(y).all(), (family, name)
        # the head has one vector per sequence: per-dim ranges from one calibration sequence would clip
        # every logit to that sequence's sign pattern (all predictions one class), so it stays per-tensor
        for n, q in qm.activation_quantizers().items():
            if not n.startswith(("encoder.", "embeddings.")):
                assert q.granularity == PerTensor(), (family, name, n)
        hi = a16_names(qm)
        if name == "mp-ptq-res":
            assert len(hi) == n_layers
        if name == "mp-ptq-ffn":
            assert len(hi) == 3 * n_layers
        if name == "mp-ptq":
            extra = {n for n in hi if not n.startswith("encoder.layer.")}
            assert extra <= {"pooler", "classifier.dense", "classifier.output"}
            assert ("classifier.output" in extra) == head


# --------------------------------------------------------------------------- 3. range-based permutation
def test_range_sorted_grouping_puts_largest_range_dims_together():
    torch.manual_seed(0)
    d, K = 48, 3
    x = torch.randn(4, 10, d)
    outliers = [3, 17, 40, 41]
    x[..., outliers] *= 50.0
    lo, hi = x.reshape(-1, d).amin(0), x.reshape(-1, d).amax(0)
    perm = range_permutation(hi - lo)
    gi = group_index_from_perm(perm, K)
    assert set(gi[outliers].tolist()) == {K - 1}  # all outliers in the last group
    assert torch.bincount(gi).tolist() == [d // K] * K  # K even groups
    assert perm[-len(outliers):].sort().values.tolist() == outliers
    # without the permutation the outliers land in different (consecutive) groups
    assert len(set((torch.tensor(outliers) // (d // K)).tolist())) > 1


@pytest.mark.parametrize("K", [1, 3, 6, 48])
def test_permuted_peg_equals_unpermuted_peg_on_permuted_data(K):
    torch.manual_seed(K)
    d = 48
    x = torch.randn(2, 7, d) * torch.linspace(0.1, 20.0, d)[torch.randperm(d)]
    perm = torch.randperm(d)
    qp = Quantizer("p", bits=8, granularity=PerEmbeddingGroup(K, True))
    qp.set_permutation(perm)
    qu = Quantizer("u", bits=8, granularity=PerEmbeddingGroup(K, False))
    qp(x)
    qu(x[..., perm])  # estimate ranges
    qp.freeze()
    qu.freeze()
    y = torch.randn(3, 5, d) * 10
    torch.testing.assert_close(qp(y)[..., perm], qu(y[..., perm]), rtol=0, atol=0)
    # and a different permutation gives different groups (K between 1 and d)
    if 1 < K < d:
        assert not torch.equal(qp.group_index, group_index_from_perm(torch.arange(d), K))


def _permuted_with(minilm_cls, preset: str):
    """MiniLM configured with ``preset``, ranges reset, permutations prepared on two sentences."""
    qm, tok = minilm_cls
    apply_config(qm, get_preset(preset))
    batches = [dict(tok([s], padding="max_length", max_length=24, return_tensors="pt"))
               for s in ("an engrossing tale .", "it never finds its footing , sadly .")]
    for q in qm.quantizers.values():
        if q.enabled:
            q.reset()
    prepare_permutations(qm, batches)
    return qm, batches


def test_prepare_permutations_shares_the_ffn_output_permutation(minilm_cls):
    """Section 4: one permutation per layer for FFN input, output and residual sum, from the FP32 ranges
    of the FFN output on the calibration data."""
    qm, batches = _permuted_with(minilm_cls, "peg-ptq")
    with quantizers_off(qm), qm.capture("encoder.layer.*.ffn.output") as store:
        for b in batches:
            qm(**b)
    for i in range(qm.num_layers):
        names = qm.ffn_names(i)
        xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in store[names["output"]]])
        expected = torch.argsort(xs.amax(0) - xs.amin(0), stable=True)
        perms = [qm.quantizers[names[k]].perm for k in ("input", "output", "residual_sum")]
        for p in perms:
            assert p is not None and torch.equal(p, expected), i
    # the outlier dims of a late layer's FFN output all sit in the last group
    last = qm.ffn_names(qm.num_layers - 1)["output"]
    xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in store[last]])
    r = xs.amax(0) - xs.amin(0)
    top = torch.topk(r, 8).indices
    gi = qm.quantizers[last].group_index
    assert set(gi[top].tolist()) == {5}


def test_peg_on_the_ffn_input_alone_takes_its_own_permutation(minilm_cls):
    """Int8 deployment presets PEG-quantize only the FFN input (its FFN output and residual sum stay
    float): its permutation then comes from its own FP32 ranges, so its widest dims form the last group."""
    qm, batches = _permuted_with(minilm_cls, "peg-gemm")
    name = qm.ffn_names(2)["input"]
    with quantizers_off(qm), qm.capture([name, qm.ffn_names(2)["output"]]) as store:
        for b in batches:
            qm(**b)
    xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in store[name]])
    own = torch.argsort(xs.amax(0) - xs.amin(0), stable=True)
    assert torch.equal(qm.quantizers[name].perm, own)
    ys = torch.cat([x.reshape(-1, x.shape[-1]) for x in store[qm.ffn_names(2)["output"]]])
    assert not torch.equal(own, torch.argsort(ys.amax(0) - ys.amin(0), stable=True))


# --------------------------------------------------------------------------- 4. ptq job reports the share
def test_ptq_results_report_a16_share(minilm_path, tmp_path):
    from pegq.pipeline import results_table, run_ptq

    r = run_ptq(minilm_path, "rotten_tomatoes", "mp-ptq-ffn", tmp_path / "o", max_eval_examples=8,
                eval_batch_size=8, progress=False)
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["a16_count"] == 18 and saved["a16_share"] == pytest.approx(18 / 83)
    assert saved["quantizers"]["activation_bits"] == {"8": 65, "16": 18}
    from rich.console import Console

    con = Console(record=True, width=200)
    con.print(results_table([r]))
    assert "18/83 (22%)" in con.export_text()
