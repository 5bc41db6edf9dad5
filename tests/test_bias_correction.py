"""Empirical bias correction over a real MiniLM (pegq.bias_correction): after it, every quantized Linear's
mean output over the correction sequences equals the FP32 model's; only biases change."""

from __future__ import annotations

import pytest
import torch

from pegq.adaround_model import calibration_sequences, linear_weight_quantizers, shared_input_groups
from pegq.bias_correction import _input_means, correct_bias

# weights quantized in layers 0-1 only (keeps the test fast); activations everywhere
LATER_OFF = ["encoder.layer.[2-5].*.weight=off", "pooler.weight=off", "classifier.weight=off"]


@pytest.fixture(scope="module")
def rt():
    from pegq.data import load_task

    return load_task("rotten_tomatoes")


def _calibrated(minilm_path, rt, preset: str, overrides=()):
    from pegq.api import calibrate, quantize
    from pegq.config import get_preset
    from pegq.models import load_model
    from pegq.pipeline import calibration_batches

    model, tok = load_model(minilm_path, num_labels=2)
    cfg = get_preset(preset).with_overrides(list(overrides))
    cfg.calibration.num_batches = 4
    qm = quantize(model, cfg)
    calibrate(qm, calibration_batches(rt, tok, cfg), progress=False)
    return qm, tok


def _mean_outputs(qm, layers, seqs, quantized: bool) -> dict[str, torch.Tensor]:
    from contextlib import nullcontext

    from pegq.peg import quantizers_off

    with nullcontext() if quantized else quantizers_off(qm):
        means = _input_means(qm, layers, seqs)
        return {n: lin.weight.double() @ means[n] + lin.bias.double() for n, lin in layers.items()}


@torch.no_grad()
def test_bias_correction_matches_fp32_mean_outputs(minilm_path, rt):
    # 4-bit per-tensor weights in layers 0-1 and 8-bit activations: large output offsets to remove
    qm, tok = _calibrated(minilm_path, rt, "w8a8", ["*.weight=w4", *LATER_OFF])
    layers = linear_weight_quantizers(qm)
    assert len(layers) == 2 * 6
    seqs = calibration_sequences(rt, tok, 24, seed=1, batch_size=8)
    groups = shared_input_groups(qm, layers, seqs[0], "cpu")
    assert groups[0] == [f"encoder.layer.0.attn.{p}.weight" for p in ("query", "key", "value")]
    assert len(groups) == 2 * 4 and sum(map(len, groups)) == len(layers)
    fp = _mean_outputs(qm, layers, seqs, quantized=False)
    before = _mean_outputs(qm, layers, seqs, quantized=True)
    weights = {n: lin.parametrizations.weight.original.clone() for n, lin in layers.items()}
    biases = {n: lin.bias.clone() for n, lin in layers.items()}

    rep = correct_bias(qm, seqs, progress=False)

    assert rep["layers"] == len(layers) and rep["sequences"] == 24
    after = _mean_outputs(qm, layers, seqs, quantized=True)
    for n in layers:
        err_before = float((before[n] - fp[n]).norm())
        err_after = float((after[n] - fp[n]).norm())
        assert err_after <= 1e-4 * max(1.0, float(fp[n].norm())), (n, err_before, err_after)
        assert torch.equal(layers[n].parametrizations.weight.original, weights[n])  # weights untouched
    # the offsets were real: the biases moved, most of all where the outlier dims feed a layer
    moved = [float((layers[n].bias - biases[n]).norm()) for n in layers]
    assert min(moved) > 0
    assert max(r["relative"] for r in rep["per_layer"].values()) > 0.01


@torch.no_grad()
def test_bias_correction_held_out_error_drops(minilm_path, rt):
    # on sequences it was not fitted on, the mean-output error of the last corrected layer goes down
    qm, tok = _calibrated(minilm_path, rt, "w8a8", ["*.weight=w4", *LATER_OFF])
    layers = linear_weight_quantizers(qm)
    last = {n: m for n, m in layers.items() if n.startswith("encoder.layer.1.")}
    held = calibration_sequences(rt, tok, 32, seed=7, batch_size=8)
    fp = _mean_outputs(qm, last, held, quantized=False)
    before = _mean_outputs(qm, last, held, quantized=True)
    correct_bias(qm, calibration_sequences(rt, tok, 32, seed=1, batch_size=8), progress=False)
    after = _mean_outputs(qm, last, held, quantized=True)
    e_before = sum(float((before[n] - fp[n]).norm()) for n in last)
    e_after = sum(float((after[n] - fp[n]).norm()) for n in last)
    assert e_after < 0.5 * e_before, (e_before, e_after)


def test_bias_correction_needs_quantized_weights(minilm_path, rt):
    qm, tok = _calibrated(minilm_path, rt, "w32a8")
    with pytest.raises(ValueError, match="no enabled weight quantizer"):
        correct_bias(qm, calibration_sequences(rt, tok, 4, batch_size=4), progress=False)
