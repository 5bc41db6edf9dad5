"""`pegq export onnx|packed`: bad input is one clear line with exit status 2 and nothing written; a real run."""

from __future__ import annotations

import json

import pytest
from cli_support import one_line_error, run


def test_help_lists_export_commands():
    res = run("export", "--help")
    assert res.exit_code == 0
    assert "onnx" in res.output and "packed" in res.output
    assert "export" in run("--help").output


def test_output_must_be_an_onnx_file(minilm_path, tmp_path):
    one_line_error(run("export", "onnx", "-m", minilm_path, "-o", str(tmp_path / "m.txt")), ".onnx")


def test_existing_output_needs_overwrite(minilm_path, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep")
    one_line_error(run("export", "onnx", "-m", minilm_path, "-o", str(out)), "--overwrite")
    assert out.read_bytes() == b"keep"
    (tmp_path / "p").mkdir()
    one_line_error(run("export", "packed", "-m", minilm_path, "-o", str(tmp_path / "p")), "--overwrite")


def test_unknown_preset_and_weight_dtype(minilm_path, tmp_path):
    one_line_error(run("export", "onnx", "-m", minilm_path, "-o", str(tmp_path / "a.onnx"), "-p", "w9a9"), "w9a9")
    one_line_error(run("export", "onnx", "-m", minilm_path, "-o", str(tmp_path / "a.onnx"), "--weight-dtype",
                       "int4"), "int4")
    assert not (tmp_path / "a.onnx").exists()


def test_missing_model(tmp_path):
    one_line_error(run("export", "packed", "-m", str(tmp_path / "nope"), "-o", str(tmp_path / "p")), "nope")


@pytest.mark.slow
def test_packed_then_onnx_end_to_end(minilm_path, tmp_path):
    """Calibrate + pack MiniLM, then export the packed checkpoint to ONNX (no re-calibration)."""
    res = run("export", "packed", "-m", minilm_path, "-o", str(tmp_path / "p"), "-p", "peg-ptq", "-q", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["reload_identical"] is True and 3.8 < info["reduction_on_disk"] <= 4.0
    # a packed checkpoint is already calibrated: --preset is refused, not silently ignored
    one_line_error(run("export", "onnx", "-m", str(tmp_path / "p"), "-o", str(tmp_path / "x.onnx"), "-p", "w8a8"),
                   "already quantized")
    res = run("export", "onnx", "-m", str(tmp_path / "p"), "-o", str(tmp_path / "m.onnx"), "-q",
              "--weight-dtype", "uint8", "--eval", "--max-eval-examples", "32")
    assert res.exit_code == 0, res.output
    assert "MatMulIntegerToFloat" in res.output and "packed checkpoint" in res.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["peg_layers"] == 6 and report["parity"]["max_steps"] <= 1
    assert abs(report["eval"]["delta"]) <= 3.2  # at most one of 32 sentences flips
