"""The `pegq` CLI: errors are one clear line with a non-zero exit; a small real end-to-end run."""

from __future__ import annotations

import json
import os

import pytest
from cli_support import one_line_error, run

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_help_lists_subcommands():
    res = run("--help")
    assert res.exit_code == 0
    for cmd in ("finetune", "ptq", "eval", "list-quantizers", "demo", "presets"):
        assert cmd in res.output


def test_missing_model_path(tmp_path):
    res = run("ptq", "-m", str(tmp_path / "nope"), "-t", "rotten_tomatoes", "-o", str(tmp_path / "o"))
    one_line_error(res, "nope")
    assert not (tmp_path / "o" / "results.json").exists()


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    res = run("eval", "-m", str(tmp_path / "m"), "-t", "rotten_tomatoes")
    one_line_error(res, "config.json")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    res = run("list-quantizers", "-m", str(tmp_path / "m"))
    one_line_error(res, "gpt2", "bert")


def test_unknown_task(minilm_path, tmp_path):
    res = run("eval", "-m", minilm_path, "-t", "imagenet")
    one_line_error(res, "imagenet")


def test_glue_task_without_files(minilm_path, tmp_path, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    res = run("eval", "-m", minilm_path, "-t", "sst2", "--data-dir", str(tmp_path))
    one_line_error(res, "dev")


def test_unknown_preset_and_bad_override(minilm_path, tmp_path):
    res = run("list-quantizers", "-m", minilm_path, "-p", "w8a9")
    one_line_error(res, "w8a9", "w8a8")
    res = run("list-quantizers", "-m", minilm_path, "-p", "w8a8", "--override", "encoder.layer.*.ffn.resid=a16")
    one_line_error(res, "matches no quantizer")
    res = run("list-quantizers", "-m", minilm_path, "-p", "w8a8", "--override", "x=a99")
    one_line_error(res, "a99")


def test_list_quantizers_minilm(minilm_path):
    res = run("list-quantizers", "-m", minilm_path, "-p", "w8a8", "--override",
              "encoder.layer.*.ffn.residual_sum=a16")
    assert res.exit_code == 0, res.output
    assert "encoder.layer.5.ffn.residual_sum" in res.output
    # 3 embeddings + 6 x 13 per layer + pooler + logits
    assert "83 activation" in res.output


def test_existing_results_refused_without_overwrite(minilm_path, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text("{}")
    res = run("ptq", "-m", minilm_path, "-t", "rotten_tomatoes", "-o", str(out))
    one_line_error(res, "--overwrite")
    assert (out / "results.json").read_text() == "{}"


@pytest.mark.slow
def test_small_real_finetune_then_ptq(minilm_path, tmp_path):
    """Fine-tune real MiniLM on 640 real sentences, then W8A32/W8A8 PTQ on 128 dev sentences."""
    ckpt = tmp_path / "ckpt"
    res = run("finetune", "-m", minilm_path, "-t", "rotten_tomatoes", "-o", str(ckpt), "--epochs", "1",
              "--max-train-examples", "640", "--lr", "5e-5", "-q")
    assert res.exit_code == 0, res.output
    assert (ckpt / "config.json").exists() and (ckpt / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.partial*"))
    info = json.loads((ckpt / "pegq_finetune.json").read_text())
    assert info["dev"]["score"] > 60.0  # far above chance (50) after 40 steps on real data
    for preset in ("w8a32", "w8a8"):
        out = tmp_path / preset
        res = run("ptq", "-m", str(ckpt), "-t", "rotten_tomatoes", "-o", str(out), "-p", preset,
                  "--max-eval-examples", "128", "--calib-batches", "4", "-q")
        assert res.exit_code == 0, res.output
        r = json.loads((out / "results.json").read_text())
        assert r["task"] == "rotten_tomatoes" and r["metric"] == "accuracy"
        assert r["dev_examples"] == 128
        assert r["config"]["name"] == preset
        assert 0.0 <= r["quantized_score"] <= 100.0
        if preset == "w8a32":  # 8-bit weights alone barely move accuracy
            assert abs(r["delta"]) <= 3.0
    assert r["quantizers"]["activation_quantizers"] == 83


def test_ptq_clipping_report(minilm_path, tmp_path):
    """`pegq ptq --clipping`: each activation quantizer's dev-split error split into clipping and rounding."""
    out = tmp_path / "o"
    res = run("ptq", "-m", minilm_path, "-t", "rotten_tomatoes", "-o", str(out), "-p", "sq-gemm",
              "--max-eval-examples", "32", "--calib-batches", "2", "--clipping", "-q")
    assert res.exit_code == 0, res.output
    assert "clipping vs rounding" in res.output
    clip = json.loads((out / "results.json").read_text())["clipping"]
    assert len(clip["rows"]) > 10 and clip["total"]["elements"] == sum(r["elements"] for r in clip["rows"])
    # 2 calibration sentences cannot cover 32 others: some values fall outside the calibrated ranges
    assert clip["total"]["clipped"] > 0 and 0.0 < clip["total"]["clip_share"] < 1.0


def test_ptq_bad_gptq_settings_say_why_before_any_work(minilm_path, tmp_path):
    """``--gptq-cls-weight`` / ``--gptq-asym-damp`` reach GPTQ; out-of-range values are one-line errors, and no
    output folder is written."""
    out = tmp_path / "g"
    res = run("ptq", "-m", minilm_path, "-t", "rotten_tomatoes", "-o", str(out), "--gptq", "--gptq-cls-weight", "0")
    one_line_error(res, "cls_weight must be > 0")
    res = run("ptq", "-m", minilm_path, "-t", "rotten_tomatoes", "-o", str(out), "--gptq", "--gptq-asymmetric",
              "--gptq-asym-damp", "1.5")
    one_line_error(res, "asym_damp must be in (0, 1)")
    assert not out.exists()
