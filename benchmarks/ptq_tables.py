"""Tables 1, 2, 4, 5 and 6 of the paper, reproduced on a rotten_tomatoes fine-tune (issue 4).

    .venv/bin/python benchmarks/ptq_tables.py --model minilm --seeds 0 1 2 --out runs/ptq_tables/minilm
    .venv/bin/python benchmarks/ptq_tables.py --model mpnet  --seeds 0 1 2 --out runs/ptq_tables/mpnet

The checkpoint is ``$PEGQ_CACHE/<model>-rotten_tomatoes-e<epochs>`` (default ``~/.cache/pegq``, the one
``make demo`` / ``benchmarks/common.finetuned`` make); pass ``--finetune`` to create it when missing
(slow on CPU for MPNet) or ``--checkpoint DIR`` to use another. Each configuration is calibrated once per
seed (the seed picks the calibration sequences, exactly as ``pegq ptq --seed``), scored on the whole dev
split (853 sentences), and the median over seeds is reported with the paper's BERT-base numbers beside
it for context. Dev batches are sorted by length and cut to their longest sequence
(:class:`pegq.loo.TrimmedLoader`): the logits are those of the 128-padded ``pegq ptq`` evaluation (pad
positions never reach a real token), at a fraction of the time.

* Table 1: ``w8a8``, ``w32a8``, ``w8a32`` (running min-max over 16 sequences);
* Table 2: leave-one-out (:func:`pegq.loo.leave_one_out`, weights FP32, current min-max, one sequence)
  over every quantizer kind, plus the per-layer sweep of ``ffn.residual_sum``;
* Table 4: ``peg-1`` (W8A8, current min-max on one sequence), ``mp-ptq-res``, ``mp-ptq-ffn``, ``mp-ptq``;
* Table 5: ``peg-1``, ``peg-d-all``, ``peg-d``, ``peg-6``, ``peg-3``, ``peg-3p``, ``peg-6p``, plus two extra
  rows not in the paper: ``peg-d-all`` calibrated on one batch of 16 sequences (current min-max), and
  ``peg-12p`` (K=12 + permutation);
* Table 6: ``w8a8``, the best MP-PTQ preset of Table 4, ``peg-ptq``.

Resumable: every finished (preset, seed) is stored in ``<out>/runs.json`` (Table 2 in ``<out>/table2``)
as soon as it is done; running the same command again skips them. A configuration identical to one
already run (``peg-ptq`` = ``peg-6p``) reuses its scores, and a weights-only one (``w8a32``: the
calibration sequences change nothing) is run once for all seeds (marked ``reused_from``). Writes
``<out>/tables.json`` and ``<out>/tables.md`` (atomically).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cache_dir, finetuned  # noqa: E402

TASK = "rotten_tomatoes"

# (label, preset) per table; paper numbers: Tables 2/4/5 = STS-B, MNLI, QNLI, RTE; Tables 1/6 = SST-2, GLUE
P4 = ("STS-B", "MNLI", "QNLI", "RTE")
P2 = ("SST-2", "GLUE")
TABLES: dict[str, dict] = {
    "1": {"title": "Table 1: 8-bit PTQ baselines (running min-max, 16 calibration sequences)", "paper_cols": P2,
          "rows": [("W8A8", "w8a8", (92.55, 71.03)), ("W32A8", "w32a8", (92.43, 70.25)),
                   ("W8A32", "w8a32", (92.55, 83.23))],
          "fp32_paper": (93.12, 83.06)},
    "4": {"title": "Table 4: mixed-precision PTQ (current min-max, 1 calibration sequence)", "paper_cols": P4,
          "rows": [("W8A8 PTQ", "peg-1", (79.78, 45.60, 51.73, 64.98)),
                   ("MP-PTQ* (16-bit FFN residual sum)", "mp-ptq-res", (85.41, 82.20, 88.38, 66.43)),
                   ("MP-PTQ*+ (+ FFN input, output)", "mp-ptq-ffn", (85.27, 82.67, 90.41, 68.95)),
                   ("MP-PTQ*+$ (+ final output, MSE)", "mp-ptq", (88.00, 82.67, 90.41, 68.95))],
          "fp32_paper": (89.09, 84.91, 91.58, 70.40)},
    "5": {"title": "Table 5: per-embedding-group PTQ (current min-max, 1 calibration sequence)",
          "paper_cols": P4,
          "rows": [("1 (=per-tensor)", "peg-1", (79.78, 45.60, 51.73, 64.98)),
                   ("d (=per-embd.)", "peg-d-all", (87.87, 80.97, 90.66, 69.31)),
                   ("d (=per-embd.), one batch of 16 sequences [extra]", "peg-d-all@16", None),
                   ("d (only FFN)", "peg-d", (87.92, 81.00, 90.68, 68.59)),
                   ("6 (only FFN)", "peg-6", (87.26, 80.51, 89.82, 68.59)),
                   ("3 (only FFN)", "peg-3", (85.96, 76.43, 80.74, 66.06)),
                   ("3 + P (only FFN)", "peg-3p", (87.92, 80.64, 91.07, 69.31)),
                   ("6 + P (only FFN)", "peg-6p", (87.92, 81.25, 91.07, 69.31)),
                   ("12 + P (only FFN) [extra]", "peg-12p", None)],
          "fp32_paper": (89.09, 84.91, 91.58, 70.40)},
    "6": {"title": "Table 6: 8-bit results side by side", "paper_cols": P2,
          "rows": [("W8A8 PTQ", "w8a8", (92.55, 71.03)), ("W8A{8,16} MP-PTQ (best of Table 4)", "@best-mp",
                                                           (92.66, 82.43)),
                   ("W8A8 PEG-PTQ", "peg-ptq", (92.66, 82.45))],
          "fp32_paper": (93.12, 83.06)},
}
MP_PRESETS = ("mp-ptq-res", "mp-ptq-ffn", "mp-ptq")
# extra rows (not in the paper): a preset with more calibration data, to tell the granularity from the
# single calibration sequence of section 5
VARIANTS = {"peg-d-all@16": ("peg-d-all", 16, 1, "current_minmax")}
PAPER_T2 = {  # Table 2 row id -> STS-B, MNLI, QNLI, RTE
    "fp32": (89.09, 84.91, 91.58, 70.40),
    "all": (62.64, 42.67, 50.74, 48.74),
    "except:attn.scores": (70.92, 42.54, 51.84, 48.74),
    "except:embeddings.sum": (67.57, 46.82, 51.22, 51.26),
    "except:attn.output": (70.47, 46.57, 50.98, 50.90),
    "except:attn.probs": (72.83, 50.35, 50.23, 49.46),
    "except:ffn.residual_sum": (81.57, 82.56, 89.73, 67.15),
    "except:ffn.residual_sum@last2": (79.40, 81.24, 88.03, 63.90),
}


def paper_text(cols, vals) -> str:
    return " / ".join(f"{v:.2f}" for v in vals) if vals else ""


def make_config(name: str, weight_estimator: str | None = None):
    """A preset, or a :data:`VARIANTS` entry (preset + calibration batches + activation estimator);
    ``weight_estimator`` replaces the presets' weight range estimator (appendix B.2 picks it per task)."""
    import dataclasses

    from pegq.config import get_preset

    if name not in VARIANTS:
        cfg = get_preset(name)
    else:
        base, batch_size, batches, estimator = VARIANTS[name]
        cfg = get_preset(base)
        cfg.name = name
        cfg.calibration.batch_size = batch_size
        cfg.calibration.num_batches = batches
        cfg.activations = dataclasses.replace(cfg.activations, estimator=estimator)
    if weight_estimator is not None and cfg.weights.bits is not None:
        cfg.weights = dataclasses.replace(cfg.weights, estimator=weight_estimator)
    return cfg


def config_key(cfg) -> str:
    d = cfg.to_dict()
    d.pop("name"), d.pop("description")
    d["calibration"].pop("seed")
    return json.dumps(d, sort_keys=True)


def seed_independent(cfg) -> bool:
    """No activation quantizer can be on (weights-only): the calibration sequences change nothing, so
    one run stands for every seed."""
    return cfg.activations.bits is None and all(o.bits in ("keep", None) for o in cfg.overrides)


def checkpoint_for(args) -> Path:
    if args.checkpoint:
        ckpt = Path(args.checkpoint).expanduser()
        if not (ckpt / "config.json").exists():
            raise SystemExit(f"error: --checkpoint {ckpt} has no config.json")
        return ckpt
    ckpt = cache_dir() / f"{args.model}-rotten_tomatoes-e{args.epochs:g}"
    if (ckpt / "config.json").exists():
        return ckpt
    if not args.finetune:
        raise SystemExit(
            f"error: no fine-tuned checkpoint at {ckpt}; create it with `make demo` (MiniLM), or pass --finetune "
            f"to fine-tune {args.model} here ({args.epochs:g} epochs; MPNet takes hours on CPU), or --checkpoint DIR"
        )
    return finetuned(args.model, args.epochs)


def md_table(title: str, cols: list[str], rows: list[list[str]], left: int = 2) -> list[str]:
    out = [f"### {title}", "", "| " + " | ".join(cols) + " |",
           "|" + "|".join("---" if i < left else "---:" for i in range(len(cols))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    ap.add_argument("--tables", nargs="+", default=["1", "2", "4", "5", "6"], choices=["1", "2", "4", "5", "6"])
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--checkpoint", default=None, help="use this fine-tuned checkpoint folder")
    ap.add_argument("--finetune", action="store_true", help="fine-tune when the cached checkpoint is missing")
    ap.add_argument("--loo-kinds", choices=["all", "paper"], default="all",
                    help="Table 2: every quantizer kind (all) or only the paper's five (paper)")
    ap.add_argument("--loo-seeds", type=int, nargs="+", default=None, help="Table 2 seeds (default: --seeds)")
    ap.add_argument("--max-eval-examples", type=int, default=None, help="(smoke tests only)")
    ap.add_argument("--weight-estimator", choices=["current_minmax", "mse"], default=None,
                    help="weight range estimator for every preset (default: the presets' min-max); the paper's "
                         "appendix B.2 picks MSE for SST-2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table
    from tqdm.auto import tqdm

    from pegq import calibrate, evaluate, quantize
    from pegq.api import quantizer_summary
    from pegq.io import atomic_write_json, atomic_write_text
    from pegq.loo import PAPER_KINDS, eval_loader, leave_one_out, loo_table
    from pegq.peg import quantizers_off
    from pegq.pipeline import a16_share, calibration_batches, load_task_and_model

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    progress = not args.quiet
    console = Console()
    ckpt = checkpoint_for(args)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/ptq_tables.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    seeds = list(dict.fromkeys(args.seeds))
    t_start = time.perf_counter()

    # ------------------------------------------------------------------ Tables 1, 4, 5, 6
    presets = []
    for t in args.tables:
        if t == "2":
            continue
        for _, p, _ in TABLES[t]["rows"]:
            for q in (MP_PRESETS if p == "@best-mp" else (p,)):
                if q not in presets:
                    presets.append(q)
    runs_path = out / "runs.json"
    signature = {"checkpoint": str(ckpt.resolve()), "task": TASK, "max_eval_examples": args.max_eval_examples,
                 "eval": "trimmed"}
    if args.weight_estimator:
        signature["weight_estimator"] = args.weight_estimator
    state = {"signature": signature, "fp32": None, "done": {}}
    if runs_path.exists():
        prev = json.loads(runs_path.read_text())
        if prev.get("signature") != signature:
            raise SystemExit(f"error: {runs_path} holds runs of another checkpoint/setting; use another --out")
        state = prev
    task = model = tok = qm = loader = None
    if presets:
        task, model, tok = load_task_and_model(str(ckpt), TASK)
        loader = eval_loader(task, tok, max_examples=args.max_eval_examples)
        qm = quantize(model, "fp32")
        if state["fp32"] is None:
            with quantizers_off(qm):
                state["fp32"] = evaluate(qm, loader, task.spec, progress=progress, desc="FP32 eval")
            atomic_write_json(runs_path, state)
    keys = {p: config_key(make_config(p, args.weight_estimator)) for p in presets}
    fixed = {p for p in presets if seed_independent(make_config(p, args.weight_estimator))}
    todo = [(p, s) for p in presets for s in seeds if f"{p}|seed={s}" not in state["done"]]
    calib_cache: dict[tuple, list] = {}
    by_key: dict[tuple, dict] = {}  # identical configs (peg-ptq = peg-6p) are run once

    def run_key(p: str, s: int) -> tuple:
        return (keys[p], None if p in fixed else s)

    for v in state["done"].values():
        if "reused_from" not in v:
            by_key[(v["config_key"], None if v["preset"] in fixed else v["seed"])] = v
    bar = tqdm(todo, desc="PTQ runs", disable=not progress)
    for p, s in bar:
        bar.set_postfix_str(f"{p} seed {s}")
        if run_key(p, s) in by_key:
            src = by_key[run_key(p, s)]
            state["done"][f"{p}|seed={s}"] = dict(src, preset=p, seed=s,
                                                  reused_from=f"{src['preset']}|seed={src['seed']}")
            atomic_write_json(runs_path, state)
            continue
        cfg = make_config(p, args.weight_estimator)
        cfg.calibration.seed = s
        ck = (cfg.calibration.batch_size, cfg.calibration.num_batches, s)
        if ck not in calib_cache:
            calib_cache[ck] = calibration_batches(task, tok, cfg)
        t0 = time.perf_counter()
        quantize(qm, cfg)
        calibrate(qm, calib_cache[ck], progress=False)
        m = evaluate(qm, loader, task.spec, progress=progress, desc=f"{p} seed {s}")
        summ = quantizer_summary(qm)
        rec = {"preset": p, "seed": s, "score": m["score"], "metrics": m, "config_key": keys[p],
               "quantizers": summ, **a16_share(summ), "seconds": time.perf_counter() - t0}
        state["done"][f"{p}|seed={s}"] = rec
        by_key[run_key(p, s)] = rec
        atomic_write_json(runs_path, state)

    def result(p: str) -> dict:
        recs = [state["done"][f"{p}|seed={s}"] for s in seeds]
        scores = [r["score"] for r in recs]
        return {"preset": p, "scores": dict(zip(map(str, seeds), scores, strict=True)),
                "median": statistics.median(scores), "a16_count": recs[0]["a16_count"],
                "activation_quantizers": recs[0]["quantizers"]["activation_quantizers"]}

    fp32 = state["fp32"]
    tables: dict[str, dict] = {}
    md: list[str] = [f"Command: `{command}`", "", f"Checkpoint: `{ckpt}`; dev examples: "
                     f"{fp32['n'] if fp32 else '-'}; seeds {', '.join(map(str, seeds))} (median reported).", ""]
    for t in args.tables:
        if t == "2":
            continue
        spec = TABLES[t]
        rows_out = []
        for label, p, paper in spec["rows"]:
            if p == "@best-mp":
                best = max(MP_PRESETS, key=lambda q: (result(q)["median"], -MP_PRESETS.index(q)))
                label, p = f"{label}: {best}", best
            r = result(p)
            r.update(label=label, delta=r["median"] - fp32["score"], paper=paper)
            rows_out.append(r)
        tables[t] = {"title": spec["title"], "paper_columns": spec["paper_cols"], "rows": rows_out,
                     "fp32_paper": spec["fp32_paper"]}
        cols = ["method", "preset", "A16"] + [f"seed {s}" for s in seeds] + [
            "median", "Δ FP32", f"paper BERT-base ({'/'.join(spec['paper_cols'])})"]
        mrows = [["FP32", "fp32", "-"] + [f"{fp32['score']:.2f}"] * len(seeds)
                 + [f"{fp32['score']:.2f}", "", paper_text(spec["paper_cols"], spec["fp32_paper"])]]
        for r in rows_out:
            a16 = f"{r['a16_count']}/{r['activation_quantizers']}" if r["a16_count"] else "0"
            mrows.append([r["label"], f"`{r['preset']}`", a16] + [f"{r['scores'][str(s)]:.2f}" for s in seeds]
                         + [f"{r['median']:.2f}", f"{r['delta']:+.2f}", paper_text(spec["paper_cols"], r["paper"])])
        md += md_table(spec["title"], cols, mrows)
        tab = Table(title=f"{args.model}: {spec['title']}")
        for c in cols:
            tab.add_column(c, justify="left" if c in ("method", "preset") else "right")
        for row in mrows:
            tab.add_row(*[c.strip("`") for c in row])
        console.print(tab)

    # ------------------------------------------------------------------ Table 2 (leave-one-out)
    loo = None
    if "2" in args.tables:
        del qm, model
        loo_seeds = args.loo_seeds or seeds
        loo_dir = out / "table2"
        done = loo_dir / "loo.json"
        if done.exists():
            loo = json.loads(done.read_text())
            if loo["setup"]["seeds"] != loo_seeds:
                raise SystemExit(f"error: {done} was made with seeds {loo['setup']['seeds']}; use another --out")
        else:
            loo = leave_one_out(str(ckpt), TASK, loo_dir, kinds=list(PAPER_KINDS) if args.loo_kinds == "paper"
                                else None, sweep_kind="ffn.residual_sum", seeds=loo_seeds,
                                max_eval_examples=args.max_eval_examples, progress=progress)
        console.print(loo_table(loo))
        cols = ["quantized activations", "FP32 q."] + [f"seed {s}" for s in loo_seeds] + [
            "median", "agree %", "recovered", "", "paper BERT-base (STS-B/MNLI/QNLI/RTE)"]
        mrows = []
        for x in loo["rows"]:
            med = f"**{x['median']:.2f}**" if x["marked"] else f"{x['median']:.2f}"
            mrows.append([x["label"], str(x["fp32_quantizers"])]
                         + [f"{x['scores'][str(s)]:.2f}" for s in loo_seeds]
                         + [med, "" if x["agreement_median"] is None else f"{x['agreement_median']:.1f}",
                            "" if x["recovered"] is None else f"{100 * x['recovered']:.0f}%",
                            "★" if x["best"] else ("●" if x["marked"] else ""),
                            paper_text(P4, PAPER_T2.get(x["id"]))])
        md += md_table("Table 2: leave-one-out (weights FP32, current min-max, 1 calibration sequence)", cols,
                       mrows)

    summary = {"model": args.model, "checkpoint": str(ckpt), "task": TASK, "seeds": seeds, "command": command,
               "fp32": fp32, "tables": tables, "table2": loo, "seconds_this_run": time.perf_counter() - t_start,
               "torch_threads": torch.get_num_threads()}
    atomic_write_json(out / "tables.json", summary)
    atomic_write_text(out / "tables.md", "\n".join(md) + "\n")
    print(f"tables -> {out / 'tables.md'} and {out / 'tables.json'}")


if __name__ == "__main__":
    main()
