"""pegq.analysis.clipping: each activation quantizer's error split into clipping and rounding (real MiniLM,
real rotten_tomatoes sentences)."""

import copy

import pytest
import torch

import pegq
from pegq.analysis.clipping import CLIP_STEPS, clipping_report


@pytest.fixture(scope="module")
def model_and_tok(minilm_dir):
    import transformers

    from pegq.models import load_model

    transformers.logging.set_verbosity_error()
    return load_model(str(minilm_dir), num_labels=2)


def _batch(tok, sentences):
    return dict(tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt"))


def _calibrated(model, batch, preset="sq-gemm"):
    qm = pegq.quantize(copy.deepcopy(model), preset)
    pegq.calibrate(qm, [batch], progress=False)
    return qm


def test_no_clipping_on_the_calibration_data_itself(model_and_tok, rt_sentences, one_thread):
    # one calibration batch: every min-max range covers that batch, so its error is rounding only
    model, tok = model_and_tok
    batch = _batch(tok, rt_sentences[:8])
    qm = _calibrated(model, batch)
    rep = clipping_report(qm, [batch], progress=False)
    assert len(rep["rows"]) == sum(q.enabled for q in qm.activation_quantizers().values()) > 10
    assert rep["total"]["clipped"] == 0 and rep["total"]["clip_energy"] == 0.0
    assert 0.3 < rep["total"]["max_error_steps"] <= CLIP_STEPS
    assert rep["total"]["error_energy"] > 0


def test_held_out_data_and_a_narrowed_range_show_clipping(model_and_tok, rt_sentences, one_thread):
    model, tok = model_and_tok
    qm = _calibrated(model, _batch(tok, rt_sentences[:8]))
    held_out = [_batch(tok, rt_sentences[8:16]), _batch(tok, rt_sentences[16:24])]
    rep = clipping_report(qm, held_out, progress=False)
    rows = {r["name"]: r for r in rep["rows"]}
    for r in rep["rows"]:
        assert 0.0 <= r["clip_share"] <= 1.0 and r["clip_energy"] <= r["error_energy"] + 1e-12
        assert (r["clipped"] > 0) == (r["clip_energy"] > 0) == (r["max_error_steps"] > CLIP_STEPS)
    assert rep["total"]["clipped"] == sum(r["clipped"] for r in rep["rows"])
    # the rows are sorted by clipped energy
    energies = [r["clip_energy"] for r in rep["rows"]]
    assert energies == sorted(energies, reverse=True)

    # halve one per-tensor range (about its middle): most of its error on held-out data becomes clipping
    name = "encoder.layer.2.attn.context"
    q = qm.quantizers[name]
    mid = (q.x_max + q.x_min) / 2
    q.x_min.copy_(mid + (q.x_min - mid) / 2)
    q.x_max.copy_(mid + (q.x_max - mid) / 2)
    narrowed = {r["name"]: r for r in clipping_report(qm, held_out, progress=False)["rows"]}
    assert narrowed[name]["clipped"] > rows[name]["clipped"]
    assert narrowed[name]["clip_share"] > 0.5 > rows[name]["clip_share"]


def test_uncalibrated_model_is_refused(model_and_tok, rt_sentences):
    model, tok = model_and_tok
    qm = pegq.quantize(copy.deepcopy(model), "w8a8")
    with pytest.raises(ValueError, match="not calibrated"):
        clipping_report(qm, [_batch(tok, rt_sentences[:2])], progress=False)
    assert torch.is_grad_enabled()


def test_per_token_quantizers_never_clip_on_held_out_data(model_and_tok, rt_sentences, one_thread):
    """``sq-token-gemm``: the per-token quantizers take each token's range at run time, so on sentences they were
    not calibrated on they clip nothing, and every error is within half of that token's own step."""
    model, tok = model_and_tok
    qm = _calibrated(model, _batch(tok, rt_sentences[:4]), preset="sq-token-gemm")
    rep = clipping_report(qm, [_batch(tok, rt_sentences[40:56])], progress=False)
    token = {n for n, q in qm.activation_quantizers().items() if q.enabled and q.granularity.dynamic}
    rows = {r["name"]: r for r in rep["rows"]}
    assert len(token) == 6 * 4 + 1 and token <= set(rows)
    for n in token:
        assert rows[n]["clipped"] == 0 and rows[n]["max_error_steps"] <= 0.5 + 1e-3, rows[n]
    assert sum(rows[n]["clipped"] for n in set(rows) - token) > 0  # the static ones do clip there
