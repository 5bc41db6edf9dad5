"""report.html in a real browser: headless Chromium renders it (screenshot) and its DOM holds every image."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def _chromium() -> str | None:
    for cand in ("chromium", "chromium-browser", "/usr/bin/chromium"):
        path = shutil.which(cand) or (cand if os.path.isabs(cand) and os.access(cand, os.X_OK) else None)
        if path:
            return path
    return None


CHROMIUM = _chromium()


def _run(args: list[str], profile: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`)")
def test_report_renders_in_headless_chromium(minilm_run, tmp_path):
    stats, out = minilm_run
    url = (out / "report.html").resolve().as_uri()

    shot = tmp_path / "report.png"
    r = _run([f"--screenshot={shot}", "--window-size=1280,2000", url], tmp_path / "profile1")
    assert shot.exists(), f"no screenshot; chromium said: {r.stderr[-2000:]}"
    img = mpimg.imread(shot)
    assert img.shape[:2] == (2000, 1280)
    assert img[..., :3].var() > 0, "the screenshot is blank"
    # the page is not just one colour in its upper and lower halves (summary text, then figures)
    assert img[:1000, :, :3].var() > 0 and img[1000:, :, :3].var() > 0
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "analysis_report_chromium.png")

    r = _run(["--dump-dom", url], tmp_path / "profile2")
    dom = r.stdout
    assert "<h1>Outlier analysis" in dom, f"no DOM dumped; chromium said: {r.stderr[-2000:]}"
    imgs = re.findall(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', dom)
    assert len(imgs) == len(stats["figures"])
    for f in stats["figures"]:
        assert f'data-file="{f["file"]}"' in dom
    assert "Worst layers" in dom and "What to try" in dom
