"""Micro-benchmarks of the quantizer math (pegq.quant), on the CPU with 2 torch threads.

1. Fake-quantizing one ``[8, 128, 768]`` activation (BERT-base, batch 8, seq 128), 8-bit
   asymmetric, per-tensor / per-embedding / PEG K=6 / PEG K=6 permuted, in the FROZEN state (fixed
   range) and the ESTIMATING state (current min-max range update + quantize), against a plain copy
   of the tensor (``x.clone()``); ratio = time / copy time.
2. MSE range estimation (the ``mse`` estimator, 8-bit symmetric, 100 candidates) over the 72
   weight matrices of a BERT-base-sized model (per layer: 4 x [768, 768], [3072, 768],
   [768, 3072]; random normal), per-tensor and per-channel, total seconds vs the 10 s target.

Times are medians over several repeats (wall clock). Usage::

    .venv/bin/python benchmarks/quant_ops.py [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from pegq.quant import (
    PerChannel,
    PerEmbedding,
    PerEmbeddingGroup,
    PerTensor,
    Quantizer,
    range_permutation,
)

THREADS = 2
MSE_TARGET_S = 10.0


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def activation_rows(repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 128, 768, generator=g)
    x[..., 308] *= 40.0  # an outlier dim, as in BERT's residual stream
    copy_s = median_time(lambda: x.clone(), repeats)
    perm = range_permutation(*PerEmbedding().minmax(x))
    rows = [{"op": "plain copy", "state": "-", "ms": copy_s * 1e3, "ratio": 1.0}]
    cases = [
        ("per-tensor", PerTensor(), None),
        ("per-embedding", PerEmbedding(), None),
        ("PEG K=6", PerEmbeddingGroup(6), None),
        ("PEG K=6 permuted", PerEmbeddingGroup(6, permute=True), perm),
    ]
    for label, gran, p in cases:
        q = Quantizer(f"bench.{label}", bits=8, symmetric=False, granularity=gran)
        if p is not None:
            q.set_permutation(p)
        with torch.no_grad():
            est_s = median_time(lambda q=q: q(x), repeats)  # ESTIMATING: update range + quantize
            q.freeze()
            frz_s = median_time(lambda q=q: q(x), repeats)
        rows.append({"op": label, "state": "frozen", "ms": frz_s * 1e3, "ratio": frz_s / copy_s})
        rows.append({"op": label, "state": "estimating", "ms": est_s * 1e3, "ratio": est_s / copy_s})
    return rows


def bert_base_weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ws = []
    for _ in range(12):
        ws += [torch.randn(768, 768, generator=g) * 0.02 for _ in range(4)]
        ws.append(torch.randn(3072, 768, generator=g) * 0.02)
        ws.append(torch.randn(768, 3072, generator=g) * 0.02)
    return ws


def mse_rows(repeats: int) -> list[dict]:
    ws = bert_base_weights()
    rows = []
    for label, gran in (("per-tensor", PerTensor()), ("per-channel", PerChannel(0))):
        quantizers = [
            Quantizer(f"w{i}", bits=8, symmetric=True, granularity=gran, estimator="mse")
            for i in range(len(ws))
        ]

        def run(quantizers=quantizers):
            for q, w in zip(quantizers, ws, strict=True):
                q.reset()
                q.observe(w)

        total = median_time(run, repeats, warmup=1)
        rows.append(
            {
                "op": f"MSE range, 72 BERT-base weights, {label}",
                "matrices": len(ws),
                "elements": sum(w.numel() for w in ws),
                "total_s": total,
                "target_s": MSE_TARGET_S,
                "ok": total < MSE_TARGET_S,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21, help="repeats per activation timing (median)")
    ap.add_argument("--mse-repeats", type=int, default=3, help="repeats of the 72-matrix MSE run")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)

    act = activation_rows(args.repeats)
    mse = mse_rows(args.mse_repeats)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}")
    print()
    print("fake-quant of a [8, 128, 768] activation, 8-bit asymmetric (median of "
          f"{args.repeats})")
    print(f"{'granularity':<20} {'state':<11} {'ms':>8} {'x copy':>7}")
    for r in act:
        print(f"{r['op']:<20} {r['state']:<11} {r['ms']:>8.3f} {r['ratio']:>7.1f}")
    print()
    print(f"MSE range estimation, 8-bit symmetric, 100 candidates (median of {args.mse_repeats})")
    print(f"{'granularity':<14} {'matrices':>8} {'elements':>11} {'total s':>8} {'target s':>9}  ok")
    for r in mse:
        label = r["op"].rsplit(", ", 1)[1]
        print(
            f"{label:<14} {r['matrices']:>8} {r['elements']:>11,} {r['total_s']:>8.2f} "
            f"{r['target_s']:>9.1f}  {'yes' if r['ok'] else 'NO'}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "activation_fake_quant": act,
                    "mse_range": mse,
                },
                f,
                indent=2,
            )
        print(f"\nwrote {args.json}")
    return 0 if all(r["ok"] for r in mse) else 1


if __name__ == "__main__":
    sys.exit(main())
