"""Forward cost of simulated PEG (``peg-ptq``) against simulated per-tensor W8A8, side by side (issue 4).

    .venv/bin/python benchmarks/peg_overhead.py --model minilm
    .venv/bin/python benchmarks/peg_overhead.py --model mpnet

Batch 8 x 128 (full length, real rotten_tomatoes dev sentences padded to 128). Every configuration is
a separate copy of the same wrapped model, calibrated on the same calibration sequences and frozen;
weights are fake-quantized once, in the warm-up, and reused through ``parametrize.cached()`` (as in
``pegq.evaluate``'s loop), so the times compare the activation quantizers. Measurements are
interleaved (one forward of each configuration per round, the order alternating) so that load on the
machine hits all alike; the median over rounds is reported. Target: ``peg-ptq`` <= 1.10x the
per-tensor W8A8 forward (``peg-1``: same per-tensor setup as the PEG presets).

Weights are the pretrained encoder with a fresh classification head: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import model_path  # noqa: E402

CONFIGS = (
    ("fp32", "FP32 (wrapped, every quantizer off)"),
    ("peg-1", "W8A8 per-tensor (reference)"),
    ("peg-ptq", "PEG-PTQ: K=6 + permutation, FFN in/out/sum"),
    ("peg-6", "PEG K=6, no permutation"),
    ("peg-12p", "PEG K=12 + permutation (not in the paper)"),
    ("peg-d", "per-embedding, FFN in/out/sum"),
    ("mp-ptq", "MP-PTQ (16-bit FFN in/out/sum + head)"),
)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved measurement rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import transformers
    from rich.console import Console
    from rich.table import Table
    from torch.nn.utils import parametrize

    from pegq import calibrate, quantize
    from pegq.config import get_preset
    from pegq.data import load_task
    from pegq.io import atomic_write_json
    from pegq.models import load_model, wrap
    from pegq.pipeline import calibration_batches

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    base, tok = load_model(str(model_path(args.model)), num_labels=2)
    base.eval()
    task = load_task("rotten_tomatoes")
    calib = calibration_batches(task, tok, get_preset("peg-1"))
    x = dict(tok(task.dev.text_a[: args.batch], padding="max_length", truncation=True, max_length=args.seq,
                 return_tensors="pt"))
    x.pop("labels", None)

    models = {}
    for name, _ in CONFIGS:
        qm = wrap(copy.deepcopy(base))
        if name != "fp32":
            quantize(qm, name)
            calibrate(qm, calib, progress=False)
        qm.eval()
        models[name] = qm
    del base

    @torch.no_grad()
    def forward(qm) -> float:
        t = time.perf_counter()
        qm(**x)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {n: [] for n in models}
    with parametrize.cached():  # weights fake-quantized once (warm-up), as in an evaluation loop
        for qm in models.values():
            forward(qm)
        for r in range(args.rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))  # alternate the order too
            for n in order:
                times[n].append(forward(models[n]))
    med = {n: statistics.median(v) for n, v in times.items()}
    ref = med["peg-1"]

    tab = Table(title=f"{args.model}: simulated forward {args.batch}x{args.seq}, {args.threads} threads, "
                      f"median of {args.rounds} interleaved rounds")
    for c in ("preset", "what", "time", "vs W8A8 per-tensor", "target"):
        tab.add_column(c, justify="right" if c in ("time", "vs W8A8 per-tensor") else "left")
    for n, what in CONFIGS:
        tab.add_row(n, what, f"{med[n] * 1e3:.1f} ms", f"{med[n] / ref:.3f}x", "<= 1.10x" if n == "peg-ptq" else "")
    Console().print(tab)
    out = {
        "model": args.model, "batch": args.batch, "seq": args.seq, "threads": args.threads, "rounds": args.rounds,
        "median_s": {n: round(v, 5) for n, v in med.items()},
        "ratio_vs_w8a8": {n: round(v / ref, 4) for n, v in med.items()},
        "all_s": {n: [round(t, 5) for t in v] for n, v in times.items()},
        "peg_ptq_ratio": round(med["peg-ptq"] / ref, 4),
        "target_met": med["peg-ptq"] / ref <= 1.10,
    }
    print(json.dumps({k: out[k] for k in ("model", "peg_ptq_ratio", "target_met", "ratio_vs_w8a8")}))
    if args.json:
        atomic_write_json(args.json, out)


if __name__ == "__main__":
    main()
