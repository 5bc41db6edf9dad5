"""Smoothing (pegq.smooth): per-dim activation scales moved into the weights of the Linears reading them."""

import copy
import sys
from pathlib import Path

import pytest
import torch

import pegq
from pegq.config import ConfigError, parse_override
from pegq.smooth import AUTO_ALPHAS, SmoothingError, prepare_smoothing, smooth_scale

sys.path.insert(0, str(Path(__file__).parent / "models"))

LN = ["encoder.layer.*.attn.layernorm", "encoder.layer.*.ffn.layernorm", "embeddings.layernorm"]
CALIB = ["a gorgeous, witty, seductive movie.", "the story is predictable and the characters are thin.",
         "it's a charming and often affecting journey.", "unfunny and lame.",
         "a sharp, funny and surprisingly moving portrait of a family in crisis."]
HELD_OUT = ["dull", "an utterly charming and hilarious film that reaches for the stars",
            "the plot is thin, the acting is wooden and the jokes fall flat more often than not",
            "one of the year's best: tender, strange and beautifully acted"]


def smoothed(alpha: float) -> list[str]:
    return [f"{p}=tensor,sq{alpha:g},optional" for p in LN]


@pytest.fixture(scope="module")
def minilm_model(minilm_path):
    import transformers

    from pegq.models import load_model

    transformers.logging.set_verbosity_error()
    return load_model(minilm_path, num_labels=2)


def _calibrated(model, tok, preset, overrides):
    qm = pegq.quantize(copy.deepcopy(model), preset, overrides=overrides)
    pegq.calibrate(qm, [dict(tok(CALIB, padding=True, return_tensors="pt"))], progress=False)
    return qm


def _hidden_cos(qm, model, tok, sentences=HELD_OUT) -> float:
    b = dict(tok(sentences, padding=True, return_tensors="pt"))
    with torch.no_grad():
        ref = model.bert(**b).last_hidden_state
        out = qm.model.bert(**b).last_hidden_state
    m = b["attention_mask"].bool()
    return float(torch.nn.functional.cosine_similarity(ref[m].flatten(), out[m].flatten(), dim=0))


def test_smooth_scale_is_smoothquants_formula():
    a = torch.tensor([4.0, 1.0, 100.0])
    w = torch.tensor([1.0, 4.0, 0.25])
    torch.testing.assert_close(smooth_scale(a, w, 0.5), torch.sqrt(a / w))
    torch.testing.assert_close(smooth_scale(a, w, 1.0), a)
    assert (smooth_scale(torch.zeros(3), torch.zeros(3), 0.5) > 0).all()  # dead dims: no division by zero


def test_smoothing_finds_the_readers_and_keeps_the_function(minilm_model):
    """On the real MiniLM: Q/K/V share one s (the previous LayerNorm's output), the first FFN Linear gets the
    FFN input's; the last layer's output (read by the pooler through a slice) stays per-tensor. At 16 bits
    the smoothed model computes the FP32 function (up to 16-bit rounding)."""
    model, tok = minilm_model
    qm = _calibrated(model, tok, "w8a8", smoothed(0.8) + ["*=16,optional"])
    q = qm.quantizers
    s = 1.0 / q["encoder.layer.2.ffn.layernorm"].smooth
    for lin in ("query", "key", "value"):
        torch.testing.assert_close(q[f"encoder.layer.3.attn.{lin}.weight"].smooth, s)
    torch.testing.assert_close(q["encoder.layer.3.ffn.intermediate.weight"].smooth,
                               1.0 / q["encoder.layer.3.attn.layernorm"].smooth)
    assert q["embeddings.layernorm"].smooth is not None and q["encoder.layer.0.attn.query.weight"].smooth is not None
    assert q["encoder.layer.5.ffn.layernorm"].smooth is None
    assert q["encoder.layer.3.attn.output.weight"].smooth is None
    assert _hidden_cos(qm, model, tok, CALIB) > 0.99999  # the calibration sentences: nothing clipped


def test_smoothing_lowers_the_layernorm_output_error(minilm_model):
    """The point of it: per-tensor 8-bit LayerNorm outputs with the per-dim ranges moved into the weights are
    closer to FP32 than plain per-tensor ones (MiniLM's outlier dims 99/223 set the plain step)."""
    model, tok = minilm_model
    per_channel = ["encoder.layer.*.weight=channel"]  # per-tensor weights cannot absorb column scales well
    plain = _calibrated(model, tok, "w8a8-gemm", per_channel)
    sq = _calibrated(model, tok, "w8a8-gemm", per_channel + smoothed(0.5))
    c_plain, c_sq = _hidden_cos(plain, model, tok), _hidden_cos(sq, model, tok)
    assert c_sq > c_plain + 0.005, (c_plain, c_sq)  # measured: 0.9792 -> 0.9892


def test_recalibration_clears_stale_smoothing(minilm_model):
    model, tok = minilm_model
    qm = _calibrated(model, tok, "w8a8-gemm", smoothed(0.5))
    assert qm.quantizers["encoder.layer.1.attn.query.weight"].smooth is not None
    pegq.quantize(qm, "w8a8-gemm")
    pegq.calibrate(qm, [dict(tok(CALIB, padding=True, return_tensors="pt"))], progress=False)
    assert all(q.smooth is None for q in qm.quantizers.values())


def test_smoothing_config_round_trips_and_bad_settings_say_why():
    o = parse_override("encoder.layer.*.attn.layernorm=sq0.75,optional")
    assert o.smooth == 0.75 and parse_override(o.text()).smooth == 0.75
    assert parse_override("x=sq").smooth == 0.5 and parse_override("x=nosq").smooth is None
    cfg = pegq.config.get_preset("sq-gemm")
    again = pegq.config.QuantConfig.from_json(cfg.to_json())
    assert again.settings_for("encoder.layer.1.ffn.layernorm", False).smooth == \
        cfg.settings_for("encoder.layer.1.ffn.layernorm", False).smooth > 0
    with pytest.raises(ConfigError, match=r"sq1\.5.*migration strength in \(0, 1\]"):
        parse_override("x=sq1.5")
    with pytest.raises(ConfigError, match=r"needs a per-tensor \(or per-token\) quantizer"):
        pegq.config.QuantizerSettings(granularity="peg", groups=2, smooth=0.5)
    # an inherited smoothing ends when the granularity changes
    assert cfg.with_overrides(["encoder.layer.1.ffn.layernorm=peg2po16"]).settings_for(
        "encoder.layer.1.ffn.layernorm", False).smooth is None


def test_smoothing_on_a_weight_or_two_sources_is_refused(one_thread):
    from models_helpers import pad_id_of, padded_batch, tiny_model

    m = tiny_model("bert", True)
    with pytest.raises(ConfigError, match=r"attn\.query\.weight: smoothing .* applies to activations"):
        pegq.quantize(copy.deepcopy(m), "w8a8", overrides=["encoder.layer.0.attn.query.weight=sq0.5"])
    qm = pegq.quantize(copy.deepcopy(m), "w8a8", overrides=["encoder.layer.0.attn.context=sq0.5",
                                                            "encoder.layer.0.attn.probs=sq0.5"])
    # the context is read by the attention output Linear: fine; probs are read by a matmul, not a Linear
    info = prepare_smoothing(qm, [padded_batch(pad_id_of(m), seed=1)])
    assert list(info["smoothed"]) == ["encoder.layer.0.attn.context"]
    assert info["not_smoothed"] == ["encoder.layer.0.attn.probs"]
    assert SmoothingError.__mro__[1] is ValueError


def test_smoothed_weights_refuse_adaround(minilm_model):
    from pegq.adaround_model import AdaRoundRun, adaround_model

    model, tok = minilm_model
    qm = _calibrated(model, tok, "w8a8-gemm", smoothed(0.5))
    with pytest.raises(ValueError, match=r"does not support smoothed weights"):
        adaround_model(qm, [dict(tok(CALIB, padding=True, return_tensors="pt"))], AdaRoundRun(num_samples=1),
                       progress=False)


def test_shift_centres_each_dim_and_keeps_the_function(minilm_model):
    """``shift``: each smoothed dim is centred on the middle of its calibration range before quantizing
    (``q((x - z) m) / m + z``) and ``s`` scales the half-width instead of max |x|, so the per-tensor range of
    the smoothed codes is symmetric. At 16 bits the model is still the FP32 function. (It does not help these
    encoders at 8 bits: docs/results.md.)"""
    model, tok = minilm_model
    qm = _calibrated(model, tok, "w8a8", [f"{p}=tensor,sq0.8,shift,optional" for p in LN] + ["*=16,optional"])
    q = qm.quantizers["encoder.layer.2.attn.layernorm"]
    assert q.shift is not None and q.shift.shape == q.smooth.shape and q.smooth_shift
    assert qm.quantizers["encoder.layer.5.ffn.layernorm"].shift is None  # not smoothed: not shifted
    lo, hi = float(q.x_min), float(q.x_max)
    assert abs(lo + hi) < 0.05 * (hi - lo), (lo, hi)
    unshifted = _calibrated(model, tok, "w8a8", smoothed(0.8) + ["*=16,optional"]).quantizers[q.name]
    assert abs(float(unshifted.x_min + unshifted.x_max)) > abs(lo + hi)
    assert _hidden_cos(qm, model, tok, CALIB) > 0.99999


def test_sqauto_picks_each_alpha_by_the_readers_output_error(minilm_model):
    """``sqauto``: one alpha per smoothed tensor from the grid, the one with the lowest output error of the
    Linears reading it on the calibration rows; the report lists every candidate's error."""
    model, tok = minilm_model
    qm = pegq.quantize(copy.deepcopy(model), "w8a8-gemm",
                       overrides=["encoder.layer.*.weight=channel"] + [f"{p}=tensor,sqauto,optional" for p in LN])
    info = prepare_smoothing(qm, [dict(tok(CALIB, padding=True, return_tensors="pt"))])
    assert set(info["alphas"]) == set(info["smoothed"]) and info["alphas"]
    for r in info["alphas"].values():
        assert set(r["errors"]) == set(AUTO_ALPHAS) and r["errors"][r["alpha"]] == min(r["errors"].values())
    assert len({r["alpha"] for r in info["alphas"].values()}) > 1  # not one global value
    o = parse_override("x=sqauto,shift")
    assert o.smooth == "auto" and o.shift and parse_override(o.text()).text() == o.text()
    with pytest.raises(ConfigError, match=r"shift needs smoothing"):
        pegq.config.QuantizerSettings(shift=True)
