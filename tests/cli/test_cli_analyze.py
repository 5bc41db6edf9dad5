"""`pegq analyze` end to end on the real MiniLM and real rotten_tomatoes dev sentences."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pegq.cli import app

runner = CliRunner()


def test_analyze_minilm_writes_report(minilm_path, tmp_path):
    out = tmp_path / "an"
    res = runner.invoke(app, ["analyze", "-m", minilm_path, "-t", "rotten_tomatoes", "-o", str(out),
                              "-n", "6", "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["settings"]["num_sequences"] == 6
    assert len(stats["settings"]["sequences_preview"]) == 6
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html
    pngs = list(out.glob("*.png"))
    assert len(pngs) >= 5
    # the real MiniLM's outlier dims are named in the summary (dims 99/223 carry values ~200)
    dims = {d["dim"] for d in stats["summary"]["outlier_dims"]}
    assert dims & {99, 223}, dims
    # a second run refuses to overwrite without --overwrite, with one line and exit 2
    res2 = runner.invoke(app, ["analyze", "-m", minilm_path, "-t", "rotten_tomatoes", "-o", str(out), "-n", "6"])
    assert res2.exit_code == 2 and res2.output.strip().startswith("error:")
    assert "--overwrite" in res2.output


def test_analyze_bad_count(minilm_path, tmp_path):
    res = runner.invoke(app, ["analyze", "-m", minilm_path, "-t", "rotten_tomatoes", "-o", str(tmp_path / "x"),
                              "-n", "0"])
    assert res.exit_code == 2 and "num_sequences" in res.output
