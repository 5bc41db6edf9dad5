"""Overhead of simulated quantization (issue 3), measured side by side in one run.

    .venv/bin/python benchmarks/overhead.py --model minilm
    .venv/bin/python benchmarks/overhead.py --model mpnet

1. Forward at batch 8 x 128 (full length): the untouched Hugging Face model in FP32 against the same
   model wrapped by pegq with W8A8 simulated (per-tensor, calibrated, frozen; weights fake-quantized
   once per evaluation via ``parametrize.cached()``, as ``pegq.evaluate`` does; also shown: weights
   re-quantized on every forward). Target <= 1.5x.
2. PTQ calibration wall time (``pegq.calibrate``: reset, estimate ranges on 16 batches of 1 real
   rotten_tomatoes sequence, freeze) against the 16 FP32 forwards of the same batches alone.
   Target <= 3x.

Weights are the pretrained encoder with a fresh classification head: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import median_time, model_path  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import transformers
    from rich.console import Console
    from rich.table import Table
    from torch.nn.utils import parametrize

    from pegq import calibrate, quantize
    from pegq.api import model_inputs
    from pegq.config import resolve_config
    from pegq.data import load_task
    from pegq.models import load_model
    from pegq.pipeline import calibration_batches

    transformers.logging.set_verbosity_error()
    path = str(model_path(args.model))
    torch.manual_seed(0)
    fp32, tok = load_model(path, num_labels=2)
    sim, _ = load_model(path, num_labels=2)
    sim.load_state_dict(fp32.state_dict())
    fp32.eval()
    sim.eval()

    task = load_task("rotten_tomatoes")
    cfg = resolve_config("w8a8")
    calib = calibration_batches(task, tok, cfg)
    texts = task.dev.text_a[: args.batch]
    x = dict(tok(texts, padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt"))

    qm = quantize(sim, cfg)
    calib_info = calibrate(qm, calib, progress=False)

    @torch.no_grad()
    def run_fp32():
        fp32(**x)

    # as pegq.evaluate does: weights fake-quantized once, inside one parametrize.cached() block that
    # stays open over all the cached forwards (opening it per call would re-quantize the 30k-row
    # embedding table on every forward)
    cache = contextlib.ExitStack()

    @torch.no_grad()
    def run_sim_cached():
        qm(**x)

    @torch.no_grad()
    def run_sim():
        qm(**x)

    @torch.no_grad()
    def calib_forwards():
        for b in calib:
            fp32(**model_inputs(b))

    def run_calibrate():
        calibrate(qm, calib, progress=False)

    # interleave the measurements so that load on the machine hits all of them alike
    t = {k: [] for k in ("fp32", "sim_cached", "sim", "calib_fwd", "calibrate")}
    for _ in range(args.repeats):
        t["fp32"].append(median_time(run_fp32, repeats=1, warmup=0 if t["fp32"] else 1))
        with cache:
            cache.enter_context(parametrize.cached())
            t["sim_cached"].append(median_time(run_sim_cached, repeats=1, warmup=1))
        t["sim"].append(median_time(run_sim, repeats=1, warmup=0 if t["sim"] else 1))
        t["calib_fwd"].append(median_time(calib_forwards, repeats=1, warmup=0))
        t["calibrate"].append(median_time(run_calibrate, repeats=1, warmup=0))
    med = {k: sorted(v)[len(v) // 2] for k, v in t.items()}

    tab = Table(title=f"{args.model}: simulated-quantization overhead ({args.threads} threads, "
                      f"median of {args.repeats})")
    for c in ("measurement", "time", "ratio", "target"):
        tab.add_column(c, justify="left" if c == "measurement" else "right")
    b = f"{args.batch}x{args.seq}"
    tab.add_row(f"FP32 forward {b} (HF model)", f"{med['fp32'] * 1e3:.1f} ms", "1.00x", "")
    r1 = med["sim_cached"] / med["fp32"]
    tab.add_row(f"W8A8 simulated forward {b}", f"{med['sim_cached'] * 1e3:.1f} ms", f"{r1:.2f}x", "<= 1.5x")
    tab.add_row("  same, weights re-quantized each call", f"{med['sim'] * 1e3:.1f} ms",
                f"{med['sim'] / med['fp32']:.2f}x", "")
    tab.add_row(f"FP32 forwards of the {len(calib)} calibration batches", f"{med['calib_fwd'] * 1e3:.1f} ms",
                "1.00x", "")
    r2 = med["calibrate"] / med["calib_fwd"]
    tab.add_row("pegq.calibrate (W8A8, running min-max)", f"{med['calibrate'] * 1e3:.1f} ms", f"{r2:.2f}x",
                "<= 3x")
    Console().print(tab)
    print(json.dumps({"model": args.model, "forward_ratio": round(r1, 3), "calibration_ratio": round(r2, 3),
                      "times_s": {k: round(v, 5) for k, v in med.items()},
                      "activation_quantizers": len(qm.activation_quantizers()),
                      "first_calibration_s": round(calib_info["calibration_s"], 3)}))


if __name__ == "__main__":
    main()
