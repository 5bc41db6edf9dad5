import json

import pytest

from pegq.config import (
    PRESETS,
    ConfigError,
    QuantConfig,
    QuantizerSettings,
    get_preset,
    parse_override,
)
from pegq.quant import PerChannel, PerEmbedding, PerEmbeddingGroup, PerTensor

NAMES = {
    "embeddings.word.weight": True,
    "embeddings.sum": False,
    "encoder.layer.0.attn.query": False,
    "encoder.layer.0.attn.query.weight": True,
    "encoder.layer.0.ffn.residual_sum": False,
    "encoder.layer.1.ffn.residual_sum": False,
    "encoder.layer.10.ffn.residual_sum": False,
    "encoder.layer.11.ffn.output": False,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_json_and_yaml(name):
    c = get_preset(name)
    assert QuantConfig.from_json(c.to_json()) == c
    assert QuantConfig.from_yaml(c.to_yaml()) == c
    json.loads(c.to_json())


def test_w8a8_defaults_follow_the_paper():
    c = get_preset("w8a8")
    s = c.resolve(NAMES)
    w, a = s["encoder.layer.0.attn.query.weight"], s["encoder.layer.0.attn.query"]
    assert (w.bits, w.symmetric, w.granularity) == (8, True, "tensor")
    assert (a.bits, a.symmetric, a.granularity, a.estimator) == (8, False, "tensor", "running_minmax")
    assert get_preset("w8a32").resolve(NAMES)["embeddings.sum"].bits is None
    assert get_preset("w32a8").resolve(NAMES)["embeddings.word.weight"].bits is None


@pytest.mark.parametrize(
    "text, bits, gran, groups, permute, est",
    [
        ("encoder.layer.*.ffn.residual_sum=a16", 16, None, None, None, None),
        ("x=off", None, None, None, None, None),
        ("x=peg6p", "keep", "peg", 6, True, None),
        ("x=peg3", "keep", "peg", 3, False, None),
        ("x=W4,MSE", 4, None, None, None, "mse"),
        ("x=emb,running", "keep", "embedding", None, None, "running_minmax"),
        ("x=channel1,minmax", "keep", "channel", None, None, "current_minmax"),
    ],
)
def test_override_grammar(text, bits, gran, groups, permute, est):
    o = parse_override(text)
    assert o.bits == bits
    assert o.granularity == gran
    assert o.groups == groups
    assert o.permute == permute
    assert o.estimator == est
    assert parse_override(o.text()) == o


@pytest.mark.parametrize(
    "text",
    ["no-equals", "a=b=c", "=a16", "x=", "x=a17", "x=a1", "x=banana", "x=__import__('os')"],
)
def test_bad_overrides_are_errors(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_overrides_apply_in_order_and_glob_crosses_dots():
    c = get_preset("w8a8").with_overrides(["encoder.layer.*.ffn.residual_sum=a16", "encoder.layer.1?.*=off"])
    s = c.resolve(NAMES)
    assert s["encoder.layer.0.ffn.residual_sum"].bits == 16
    assert s["encoder.layer.1.ffn.residual_sum"].bits == 16
    assert s["encoder.layer.10.ffn.residual_sum"].bits is None
    assert s["encoder.layer.11.ffn.output"].bits is None
    assert s["encoder.layer.0.attn.query"].bits == 8


def test_pattern_matching_nothing_lists_close_names():
    c = get_preset("w8a8").with_overrides(["encoder.layer.*.ffn.residual_summ=a16"])
    with pytest.raises(ConfigError, match="close names: .*ffn.residual_sum"):
        c.resolve(NAMES)


def test_settings_make_granularity_types():
    assert QuantizerSettings(granularity="tensor").make_granularity() == PerTensor()
    assert QuantizerSettings(granularity="channel", axis=1).make_granularity() == PerChannel(1)
    assert QuantizerSettings(granularity="embedding").make_granularity() == PerEmbedding()
    assert QuantizerSettings(granularity="peg", groups=6, permute=True).make_granularity() == PerEmbeddingGroup(6, True)


def test_bad_config_values():
    with pytest.raises(ConfigError):
        QuantizerSettings(bits=1)
    with pytest.raises(ConfigError):
        QuantizerSettings(granularity="blocks")
    with pytest.raises(ConfigError):
        QuantizerSettings(estimator="percentile")
    with pytest.raises(ConfigError, match="unknown config keys"):
        QuantConfig.from_dict({"nme": "x"})
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("w8a9")


def test_config_file_load(tmp_path):
    c = get_preset("w8a8").with_overrides(["encoder.layer.*.ffn.residual_sum=a16"])
    p = tmp_path / "c.yaml"
    p.write_text(c.to_yaml())
    before = p.read_text()
    assert QuantConfig.load(p) == c
    assert p.read_text() == before
    with pytest.raises(ConfigError, match="does not exist"):
        QuantConfig.load(tmp_path / "missing.json")


def test_outlier_group_token_round_trips():
    from pegq.config import parse_override

    o = parse_override("encoder.layer.*.ffn.intermediate=peg2po16")
    assert (o.granularity, o.groups, o.permute, o.outliers) == ("peg", 2, True, 16)
    assert parse_override(o.text()) == o
    assert parse_override("x=peg6p").outliers == 0
    with pytest.raises(ConfigError, match="K >= 2"):
        parse_override("x=peg1po4")


def test_per_token_override_keeps_smoothing_and_is_refused_on_weights(minilm_path):
    """``token``: dynamic per-token activation ranges; with ``sq<alpha>`` the smoothing stays (it acts before the
    grid); a weight quantizer is refused with the reason."""
    import pegq
    from pegq.models import load_model
    from pegq.quant import PerToken

    o = parse_override("encoder.layer.*.attn.layernorm=token,sq0.8")
    assert (o.granularity, o.smooth) == ("token", 0.8)
    assert parse_override(o.text()) == o
    s = o.apply(QuantizerSettings())
    assert s.make_granularity() == PerToken() and s.smooth == 0.8
    assert QuantizerSettings(granularity="token", smooth=0.8).short() == "8b,asym,token,sq0.8,current_minmax"
    cfg = get_preset("sq-token-gemm")
    model, _ = load_model(minilm_path, num_labels=2)
    qm = pegq.quantize(model, cfg)
    tok = {n for n, q in qm.activation_quantizers().items() if q.enabled and q.granularity == PerToken()}
    assert "embeddings.layernorm" in tok and "encoder.layer.5.ffn.intermediate" in tok
    assert "encoder.layer.0.attn.context" in tok and "encoder.layer.0.attn.query" not in tok
    assert qm.quantizers["encoder.layer.0.attn.layernorm"].smooth_alpha == 0.8
    assert "encoder.layer.0.attn.probs" not in tok
    qm = pegq.quantize(load_model(minilm_path, num_labels=2)[0], "sq-token-probs-gemm")
    tok_probs = {n for n, q in qm.activation_quantizers().items() if q.enabled and q.granularity == PerToken()}
    assert tok_probs - tok == {f"encoder.layer.{i}.attn.probs" for i in range(6)}
    with pytest.raises(ConfigError, match=r"attn\.query\.weight: per-token \(dynamic\) ranges are for activations"):
        pegq.quantize(load_model(minilm_path, num_labels=2)[0], "w8a8",
                      overrides=["encoder.layer.0.attn.query.weight=token"])


def test_fixed_zero_point_token_is_checked_and_round_trips(minilm_path):
    """``zp<N>``: a per-token quantizer whose rows share the zero-point N; refused (one line each) where it cannot
    apply; a later granularity or ``sym`` ends an inherited one; the config round-trips through JSON."""
    from pegq.quant import PerToken

    o = parse_override("encoder.layer.*intermediate=token,zp64")
    assert (o.granularity, o.zero_point) == ("token", 64) and parse_override(o.text()) == o
    s = o.apply(QuantizerSettings())
    assert s.make_granularity() == PerToken(zero_point=64) and s.short() == "8b,asym,token,zp64,current_minmax"
    assert parse_override("x=tensor").apply(s).zero_point is None
    assert parse_override("x=sym").apply(s).zero_point is None
    assert parse_override("x=a7").apply(s).zero_point == 64
    for text, msg in [("x=token,zp0", "N >= 1"),
                      ("x=tensor,zp8", "needs an asymmetric per-token quantizer, not tensor"),
                      ("x=token,sym,zp8", "not symmetric token"),
                      ("x=token,a4,zp15", r"inside the 4-bit grid \(1\.\.14\)")]:
        with pytest.raises(ConfigError, match=msg):
            parse_override(text).apply(QuantizerSettings())
    c = get_preset("sq-token-zp-gemm")
    assert QuantConfig.from_json(c.to_json()) == c
    import pegq
    from pegq.models import load_model

    qm = pegq.quantize(load_model(minilm_path, num_labels=2)[0], c)
    assert qm.quantizers["encoder.layer.3.ffn.intermediate"].granularity == PerToken(zero_point=64)
    ln = qm.quantizers["encoder.layer.3.attn.layernorm"]
    assert ln.symmetric and ln.granularity == PerToken()
