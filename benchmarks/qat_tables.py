"""Tables 6 and 7 of the paper (QAT, low-bit weights and embeddings, AdaRound), with a size column, on a
rotten_tomatoes fine-tune (issue 6).

    .venv/bin/python benchmarks/qat_tables.py --model minilm --out runs/qat_tables/minilm
    .venv/bin/python benchmarks/qat_tables.py --model minilm --qat-epochs 1 --qat-train-examples 2000 \\
        --adaround-iters 500 --adaround-samples 256 --out runs/qat_tables/minilm-cpu

Rows (all scored on the whole dev split, 853 sentences; the size is ``pegq.size``: "paper" = quantized
weight tensors only, as Table 7 counts; "total" = every stored tensor incl. FP32 biases/LayerNorm and
quantization parameters):

* FP32; W8A8 PTQ (``w8a8``); W8A8 QAT (``qat-w8a8``) -- Table 6;
* W6A32 PTQ (``w6a32``), W4A32 PTQ (``w4a32``, round-to-nearest, MSE ranges), W4A32 AdaRound
  (``w4a32`` + AdaRound), W4A8 QAT (``qat-w4a8``), W4A8 2-bit embeddings QAT (``qat-w4a8-e2``),
  W8A32 2-bit embeddings PTQ (``w8a32-e2``) -- Table 7 / 12.

The checkpoint is ``$PEGQ_CACHE/<model>-rotten_tomatoes-e3`` (``make demo`` / ``benchmarks/common.finetuned``
create it; ``--checkpoint DIR`` for another). QAT hyper-parameters default to ``pegq qat``'s (Tables 10 / 11,
SST-2 rows); on a CPU reduce ``--qat-epochs`` / ``--qat-train-examples`` and the AdaRound iterations / samples
(paper: 1024 sequences, 10^4 iterations per layer). Resumable: every finished row keeps its
``<out>/<row>/results.json`` and is skipped by the next run; ``<out>/table.json`` and ``<out>/table.md`` are
written (atomically) at the end. ``--rows`` picks rows by key.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import finetuned  # noqa: E402

TASK = "rotten_tomatoes"
# key: (label, kind, preset, paper GLUE score, paper size) -- Tables 6/7 (BERT-base, GLUE average)
ROWS = [
    ("fp32", "FP32", "fp32", "fp32", 83.06, "x1.00"),
    ("w8a8-ptq", "W8A8 PTQ", "ptq", "w8a8", 71.03, "x4.00"),
    ("w8a8-qat", "W8A8 QAT", "qat", "qat-w8a8", 83.26, "x4.00"),
    ("w6a32-ptq", "W6A32 PTQ", "ptq", "w6a32", 81.41, "x5.33"),
    ("w4a32-ptq", "W4A32 PTQ (round-to-nearest)", "ptq", "w4a32", 72.31, "x8.00"),
    ("w4a32-adaround", "W4A32 AdaRound (PTQ)", "adaround", "w4a32", 81.46, "x8.00"),
    ("w4a8-qat", "W4A8 QAT", "qat", "qat-w4a8", 82.64, "x8.00"),
    ("w4a8-e2-qat", "W4A8, 2-bit embd. QAT", "qat", "qat-w4a8-e2", 82.29, "x8.85"),
    ("w8a32-e2-ptq", "W8A32, 2-bit embd. PTQ", "ptq", "w8a32-e2", 82.40, "-"),
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    ap.add_argument("--checkpoint", help="fine-tuned checkpoint (default: the cached rotten_tomatoes one)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", nargs="*", default=None, help=f"row keys (default all): {[r[0] for r in ROWS]}")
    ap.add_argument("--qat-epochs", type=float, default=None, help="default: Tables 10/11 (3)")
    ap.add_argument("--qat-train-examples", type=int, default=None, help="first N training sentences")
    ap.add_argument("--qat-lr", type=float, default=None)
    ap.add_argument("--qat-batch-size", type=int, default=None)
    ap.add_argument("--qat-act-range-rel-lr", type=float, default=None,
                    help="activation ranges learn at this rate relative to their size (default: at the model's lr)")
    ap.add_argument("--qat-distill", type=float, default=0.0, help="weight of FP32-logit distillation (0: paper)")
    ap.add_argument("--qat-act-estimator", default=None, help="PTQ init of the QAT activation ranges")
    ap.add_argument("--qat-weight-estimator", default=None, choices=["current_minmax", "mse"],
                    help="PTQ init of the QAT weight ranges (MPNet's outlier weights want mse)")
    ap.add_argument("--adaround-iters", type=int, default=10_000)
    ap.add_argument("--adaround-samples", type=int, default=1024)
    ap.add_argument("--adaround-batch-rows", type=int, default=1024)
    ap.add_argument("--adaround-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    from rich.console import Console
    from rich.table import Table

    from pegq.adaround_model import AdaRoundRun
    from pegq.io import atomic_write_json, atomic_write_text
    from pegq.pipeline import config_from_cli, run_ptq
    from pegq.qat import QATConfig, qat
    from pegq.quant.adaround import AdaRoundConfig

    ckpt = Path(args.checkpoint) if args.checkpoint else finetuned(args.model, 3)
    out = Path(args.out or f"runs/qat_tables/{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    hp = QATConfig(learning_rate=args.qat_lr, batch_size=args.qat_batch_size, epochs=args.qat_epochs,
                   max_train_examples=args.qat_train_examples, act_range_rel_lr=args.qat_act_range_rel_lr,
                   distill=args.qat_distill)
    ada = AdaRoundRun(num_samples=args.adaround_samples,
                      layer=AdaRoundConfig(iters=args.adaround_iters, batch_rows=args.adaround_batch_rows,
                                           lr=args.adaround_lr))
    wanted = set(args.rows) if args.rows else {r[0] for r in ROWS}
    unknown = wanted - {r[0] for r in ROWS}
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; allowed: {[r[0] for r in ROWS]}")

    def load(key):
        p = out / key / "results.json"
        return json.loads(p.read_text()) if p.exists() else None

    fp32 = (load("fp32") or {}).get("fp32")  # reuse the FP32 dev score if this folder has it
    rows = []
    for key, label, kind, preset, paper, paper_size in ROWS:
        if key not in wanted:
            continue
        r = load(key)
        if r is None:
            t0 = time.perf_counter()
            print(f"== {label} ({preset}) ==", flush=True)
            if kind == "qat":
                cfg = config_from_cli(preset, args.qat_weight_estimator, args.qat_act_estimator, None, None, None)
                r = qat(str(ckpt), TASK, cfg, out / key, hparams=hp, progress=progress, fp32_score=fp32,
                        overwrite=True)
            else:
                r = run_ptq(str(ckpt), TASK, preset, out / key, progress=progress, fp32_score=fp32, overwrite=True,
                            adaround=ada if kind == "adaround" else None)
            r["wall_s"] = time.perf_counter() - t0
            atomic_write_json(out / key / "results.json", r)
        fp32 = fp32 or r["fp32"]
        rows.append({"key": key, "label": label, "preset": preset, "score": r["quantized_score"],
                     "fp32": r["fp32_score"], "delta": r["quantized_score"] - r["fp32_score"],
                     "ptq_init": r.get("ptq_init_score"), "size_paper": r["size"]["weights"]["reduction"],
                     "size_total": r["size"]["reduction"], "paper_glue": paper, "paper_size": paper_size,
                     "wall_s": r.get("wall_s"), "hparams": r.get("hparams"),
                     "adaround": {k: v for k, v in (r.get("adaround") or {}).items() if k != "per_layer"} or None})

    t = Table(title=f"{args.model} on rotten_tomatoes (dev, {ckpt.name}): Tables 6/7")
    for c in ("method", "acc.", "delta", "PTQ init", "size (paper)", "size (total)", "paper GLUE", "paper size"):
        t.add_column(c, justify="left" if c == "method" else "right")
    lines = ["| method | accuracy | delta vs FP32 | QAT from PTQ init | size (paper) | size (total) | "
             "paper GLUE (BERT-base) | paper size |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in rows:
        init = "-" if x["ptq_init"] is None else f"{x['ptq_init']:.2f}"
        cells = [x["label"], f"{x['score']:.2f}", f"{x['delta']:+.2f}", init, f"x{x['size_paper']:.2f}",
                 f"x{x['size_total']:.2f}", f"{x['paper_glue']:.2f}", x["paper_size"]]
        t.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    Console().print(t)
    cmd = "python benchmarks/qat_tables.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    atomic_write_json(out / "table.json", {"checkpoint": str(ckpt), "command": cmd, "rows": rows,
                                           "torch_threads": args.threads})
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    print(f"-> {out / 'table.md'}")


if __name__ == "__main__":
    main()
