"""AdaRound over a real MiniLM (pegq.adaround_model): every Linear of the quantized layers gets a learned,
frozen rounding that reconstructs its output better than round-to-nearest; an interrupted run resumes
after its finished layers; `pegq ptq --adaround` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from pegq.adaround_model import AdaRoundRun, adaround_model, calibration_sequences, linear_weight_quantizers
from pegq.quant.adaround import AdaRoundConfig

# only layer 0's six Linear weights are quantized (keeps the test fast); embeddings stay 4-bit (not Linear)
ONLY_LAYER0 = ["encoder.layer.[1-5].*.weight=off", "pooler.weight=off", "classifier.weight=off"]


@pytest.fixture(scope="module")
def rt():
    from pegq.data import load_task

    return load_task("rotten_tomatoes")


def _calibrated(minilm_path, rt):
    from pegq.api import calibrate, quantize
    from pegq.config import get_preset
    from pegq.models import load_model
    from pegq.pipeline import calibration_batches

    model, tok = load_model(minilm_path, num_labels=2)
    cfg = get_preset("w4a32").with_overrides(ONLY_LAYER0)
    cfg.calibration.num_batches = 2
    qm = quantize(model, cfg)
    calibrate(qm, calibration_batches(rt, tok, cfg), progress=False)
    return qm, tok


def test_adaround_model_improves_every_layer_and_resumes(minilm_path, rt, tmp_path, monkeypatch):
    torch.manual_seed(0)
    qm, tok = _calibrated(minilm_path, rt)
    layers = linear_weight_quantizers(qm)
    assert list(layers) == [f"encoder.layer.0.{n}.weight" for n in
                            ("attn.query", "attn.key", "attn.value", "attn.output", "ffn.intermediate", "ffn.output")]
    seqs = calibration_sequences(rt, tok, 16, batch_size=8)
    run = AdaRoundRun(num_samples=16, layer=AdaRoundConfig(iters=60, batch_rows=256, lr=5e-3))
    state = tmp_path / "state"
    info = adaround_model(qm, seqs, run, state_dir=state, progress=False)
    assert info["layers"] == 6 and info["layers_improved"] == 6, info["per_layer"]
    assert info["mse_adaround_sum"] < 0.97 * info["mse_nearest_sum"]
    for n in layers:
        q = qm.quantizers[n]
        assert q.round_offset is not None and q.round_offset.shape == qm.weight_shape(n)
    assert all(i["rows"] == int(sum(b["attention_mask"].sum() for b in seqs)) for i in info["per_layer"].values())
    offsets = {n: qm.quantizers[n].round_offset.clone() for n in layers}

    # a second run with the same settings finds every layer done: nothing is optimised again
    import pegq.adaround_model as am

    def boom(*a, **k):
        raise AssertionError("re-optimised a finished layer")

    monkeypatch.setattr(am, "optimize_rounding", boom)
    qm2, _ = _calibrated(minilm_path, rt)
    adaround_model(qm2, seqs, run, state_dir=state, progress=False)
    for n in layers:
        assert torch.equal(qm2.quantizers[n].round_offset, offsets[n])
    # other settings: the saved state is not reused
    other = AdaRoundRun(num_samples=16, layer=AdaRoundConfig(iters=61))
    with pytest.raises(AssertionError, match="re-optimised"):
        adaround_model(qm2, seqs, other, state_dir=state, progress=False)


def test_adaround_needs_calibrated_linear_weights(minilm_path, rt):
    from pegq.api import quantize
    from pegq.models import load_model

    model, tok = load_model(minilm_path, num_labels=2)
    qm = quantize(model, "w32a8")
    with pytest.raises(ValueError, match="nothing for AdaRound"):
        adaround_model(qm, [], progress=False)
    with pytest.raises(ValueError, match="calibrate first"):
        adaround_model(quantize(qm, "w4a32"), [], progress=False)


def test_ptq_adaround_cli(minilm_path, tmp_path):
    from typer.testing import CliRunner

    from pegq.cli import app

    out = tmp_path / "ptq"
    args = ["ptq", "-m", minilm_path, "-t", "rotten_tomatoes", "-o", str(out), "-p", "w4a32", "--calib-batches", "2",
            "--adaround", "--adaround-iters", "10", "--adaround-samples", "8", "--max-eval-examples", "32", "--quiet"]
    for o in ONLY_LAYER0:
        args += ["--override", o]
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "size: x" in res.output
    r = json.loads((out / "results.json").read_text())
    assert r["config_name"] == "w4a32+adaround" and r["adaround"]["layers"] == 6
    assert r["adaround"]["num_sequences"] == 8 and r["adaround"]["settings"]["layer"]["iters"] == 10
    assert r["size"]["params_by_bits"]["4"] > 0 and r["size"]["reduction"] > 1
    assert not (out / ".adaround-state").exists()
    res = CliRunner().invoke(app, args + ["--adaround-iters", "0", "--overwrite"], catch_exceptions=False)
    assert res.exit_code == 2 and "iterations" in res.output
