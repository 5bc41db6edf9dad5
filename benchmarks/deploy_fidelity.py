"""Where an int8 deployment preset loses fidelity: dev-logit cosine to FP32 and accuracy, with one group of
quantizers switched off at a time (simulated), and optionally after AdaRound or GPTQ of the 8-bit weights or
after empirical bias correction (each simulated and on ONNX Runtime's int8 kernels).

    .venv/bin/python benchmarks/deploy_fidelity.py --model minilm                  # ablation, ~3 min
    .venv/bin/python benchmarks/deploy_fidelity.py --model minilm --adaround 128   # + AdaRound, ~4 min more
    .venv/bin/python benchmarks/deploy_fidelity.py --model minilm --no-ablation --bias-correction 256  # ~2 min
    .venv/bin/python benchmarks/deploy_fidelity.py --model minilm --no-ablation --weight-ablation      # ~5 min
    .venv/bin/python benchmarks/deploy_fidelity.py --model minilm --no-ablation --ort-preset --gptq 512  # ~5 min

Uses the fine-tuned checkpoints of ``benchmarks/int8_latency.py`` (``$PEGQ_CACHE/<model>-rotten_tomatoes-e3``
or ``-head``). Output: a table, and JSON at ``--json`` (default ``runs/bench/deploy_fidelity-<model>.json``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cache_dir  # noqa: E402

ABLATIONS = {
    "nothing (the preset)": [],
    "FFN input": ["encoder.layer.*.attn.layernorm=off"],
    "Q/K/V input": ["encoder.layer.*.ffn.layernorm=off", "embeddings.layernorm=off"],
    "FFN input and Q/K/V input (every LayerNorm output)": [
        "encoder.layer.*.attn.layernorm=off", "encoder.layer.*.ffn.layernorm=off", "embeddings.layernorm=off"],
    "attention probabilities + context": ["*.attn.probs=off", "*.attn.context=off"],
    "Q/K/V outputs": ["*.attn.query=off", "*.attn.key=off", "*.attn.value=off"],
    "weights, at 16 bits instead": ["*.weight=w16"],
    "embedding tables (weights)": ["embeddings.*.weight=off"],
}
LINEAR_TYPES = ("attn.query", "attn.key", "attn.value", "attn.output", "ffn.intermediate", "ffn.output")


def weight_ablations(num_layers: int) -> dict[str, list[str]]:
    """Rows for ``--weight-ablation``: the weights of one encoder layer, of the head, or of one Linear type
    in every layer at FP32, the rest as the preset."""
    rows = {f"FP32 weights: layer {i}": [f"encoder.layer.{i}.*.weight=off"] for i in range(num_layers)}
    rows["FP32 weights: head"] = ["pooler.weight=off", "classifier.weight=off", "classifier.*.weight=off"]
    rows["FP32 weights: embedding tables"] = ["embeddings.*.weight=off"]
    rows.update({f"FP32 weights: every {t}": [f"encoder.layer.*.{t}.weight=off"] for t in LINEAR_TYPES})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    ap.add_argument("--preset", default="peg-outlier-gemm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--override", action="append", default=[], metavar="PATTERN=TOKENS",
                    help="added to the preset for every row (repeatable), e.g. "
                         "'encoder.layer.*.ffn.layernorm=peg2po16'")
    ap.add_argument("--no-ablation", action="store_true", help="only the AdaRound / GPTQ / bias-correction rows")
    ap.add_argument("--weight-ablation", action="store_true",
                    help="also rows with one layer's (or one Linear type's) weights at FP32")
    ap.add_argument("--adaround", type=int, default=0, metavar="SEQUENCES",
                    help="also AdaRound the weights on this many training sequences (0: no)")
    ap.add_argument("--adaround-iters", type=int, default=500)
    ap.add_argument("--adaround-batch-rows", type=int, default=512)
    ap.add_argument("--ort-preset", action="store_true", help="also score the preset itself on ONNX Runtime")
    ap.add_argument("--gptq", type=int, default=0, metavar="SEQUENCES",
                    help="also GPTQ the weights on this many training sequences (0: no)")
    ap.add_argument("--gptq-damp", type=float, default=0.01)
    ap.add_argument("--gptq-asymmetric", action="store_true",
                    help="GPTQ fits each layer to the FP32 model's output of it (pegq.gptq_model, asymmetric)")
    ap.add_argument("--gptq-asym-damp", type=float, default=0.01)
    ap.add_argument("--gptq-pair-limit", type=int, default=None, metavar="N",
                    help="GPTQ keeps |q[2j] + q[2j+1]| <= N for adjacent weight inputs (128: x86 int8 kernels "
                         "without VNNI compute exactly; pegq.quant.gptq.pair_limited_nearest)")
    ap.add_argument("--gptq-pair-tolerance", type=float, default=None, metavar="T",
                    help="with --gptq-pair-limit: keep a layer's limited rounding only where its proxy loss is "
                         "<= (1 + T) x GPTQ's without the limit (use --weight-dtype exact)")
    ap.add_argument("--gptq-scales", default=None, metavar="M1,M2,...",
                    help="GPTQ: multipliers of each weight row's scale to search (default: 1.0-2.0 with "
                         "--gptq-pair-limit, none without; '1' turns the search off)")
    ap.add_argument("--gptq-cls-weight", type=float, default=1.0,
                    help="weight of each sequence's first token in GPTQ's Hessian")
    ap.add_argument("--bias-correction", type=int, default=0, metavar="SEQUENCES",
                    help="also run empirical bias correction on this many training sequences (0: no)")
    ap.add_argument("--weight-dtype", default="int8", choices=["int8", "uint8", "auto", "exact"],
                    help="weight storage of the ORT rows (uint8: bit-exact with the simulation on CPUs without "
                         "AVX-512 VNNI, where ORT's u8 x s8 kernel saturates pairs of products; exact: uint8 only "
                         "for weights with a pair that can saturate)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--save-dir", default=None, metavar="DIR",
                    help="also save every AdaRound / GPTQ / bias-corrected model under DIR (pegq.qat.save_quantized: "
                         "`pegq export onnx` and `pegq eval` read it), so a later export needs no rerun")
    args = ap.parse_args(argv)
    if args.gptq_scales is not None:
        try:
            args.gptq_scales = tuple(float(m) for m in args.gptq_scales.split(","))
        except ValueError:
            ap.error(f"--gptq-scales takes comma-separated numbers, got {args.gptq_scales!r}")

    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from pegq.adaround_model import AdaRoundRun, calibration_sequences, run_adaround
    from pegq.api import calibrate, predict, quantize
    from pegq.bias_correction import correct_bias
    from pegq.config import parse_override
    from pegq.data import compute_metrics, encode, load_task, make_loader
    from pegq.export.onnx import export_onnx, ort_predict, session
    from pegq.gptq_model import GPTQRun, run_gptq
    from pegq.io import atomic_write_json
    from pegq.models import load_model
    from pegq.pipeline import calibration_batches, config_from_cli
    from pegq.qat import save_quantized
    from pegq.quant.adaround import AdaRoundConfig
    from pegq.quant.gptq import GPTQConfig

    torch.set_num_threads(args.threads)
    console = Console()
    ckpt = next((p for p in (cache_dir() / f"{args.model}-rotten_tomatoes-{s}" for s in ("e3", "head"))
                 if (p / "config.json").exists()), None)
    if ckpt is None:
        raise SystemExit(f"no fine-tuned {args.model} checkpoint in {cache_dir()}; run benchmarks/int8_latency.py "
                         f"or benchmarks/qat_tables.py --rows fp32 first")
    model, tok = load_model(ckpt, num_labels=2)
    model.eval()
    task = load_task("rotten_tomatoes")
    loader = make_loader(encode(task.dev, tok, task.spec), batch_size=32)
    ref, ref_labels = predict(model, loader, progress=False)
    fp32_accuracy = compute_metrics(task.spec, ref, ref_labels)["score"]
    ref = np.asarray(ref, np.float64).ravel()

    def cosine(logits) -> float:
        a = np.asarray(logits, np.float64).ravel()
        return float(a @ ref / (np.linalg.norm(a) * np.linalg.norm(ref)))

    def calibrated(extra: list[str]):
        cfg = config_from_cli(args.preset, None, None, None, None, None)
        cfg.overrides += [parse_override(o) for o in args.override]
        cfg.overrides += [parse_override(o + ",optional") for o in extra]
        qm = quantize(copy.deepcopy(model), cfg)
        batches = calibration_batches(task, tok, cfg)
        calibrate(qm, batches, progress=False)
        return qm, batches

    rows: dict[str, dict] = {"FP32 (the reference)": {"cosine": 1.0, "accuracy": fp32_accuracy}}
    console.print(f"FP32: accuracy {fp32_accuracy:.2f}")

    def score(name: str, logits, labels, **extra) -> None:
        rows[name] = {"cosine": cosine(logits), "accuracy": compute_metrics(task.spec, logits, labels)["score"],
                      **extra}
        console.print(f"{name}: cosine {rows[name]['cosine']:.4f}, accuracy {rows[name]['accuracy']:.2f}")

    def on_ort(qm, name: str) -> None:
        slug = name.split()[0].lower()
        if args.save_dir and slug != "preset":
            out = save_quantized(qm, tok, Path(args.save_dir) / f"{args.model}-{args.preset}-{slug}", qm.config,
                                 info={"benchmark": "deploy_fidelity", "row": name, "command": " ".join(sys.argv)})
            console.print(f"{name}: saved -> {out}")
        path = Path(f"runs/bench/deploy_fidelity-{args.model}-{slug}.onnx")
        try:
            export_onnx(qm, path, weight_dtype=args.weight_dtype)
        except ValueError as e:  # ExportError / RewriteError: a layout the int8 export cannot run
            console.print(f"{name}: no ORT row ({str(e).splitlines()[0]})")
            return
        sess = session(path, threads=args.threads)
        logits, labels = ort_predict(sess, loader, [i.name for i in sess.get_inputs()], progress=False)
        score(f"{name}, ORT {args.weight_dtype} weights", logits, labels)

    if not args.no_ablation:
        for name, extra in ABLATIONS.items():
            qm, _ = calibrated(extra)
            score(f"off: {name}", *predict(qm, loader, progress=False))
    if args.weight_ablation:
        for name, extra in weight_ablations(model.config.num_hidden_layers).items():
            qm, _ = calibrated(extra)
            score(name, *predict(qm, loader, progress=False))
    if args.adaround:
        qm, batches = calibrated([])
        t0 = time.time()
        run = AdaRoundRun(num_samples=args.adaround, layer=AdaRoundConfig(iters=args.adaround_iters,
                                                                          batch_rows=args.adaround_batch_rows))
        run_adaround(qm, task, tok, run, batches, progress=True)
        secs = time.time() - t0
        name = f"AdaRound ({args.adaround} seq, {args.adaround_iters} it)"
        score(f"{name}, simulated", *predict(qm, loader, progress=False), adaround_s=secs)
        on_ort(qm, name)

    if args.ort_preset:
        qm, _ = calibrated([])
        score("Preset, simulated", *predict(qm, loader, progress=False))
        on_ort(qm, "Preset")

    if args.gptq:
        qm, batches = calibrated([])
        t0 = time.time()
        run = GPTQRun(num_samples=args.gptq, cls_weight=args.gptq_cls_weight, asymmetric=args.gptq_asymmetric,
                      asym_damp=args.gptq_asym_damp, pair_tolerance=args.gptq_pair_tolerance,
                      layer=GPTQConfig(damp=args.gptq_damp, pair_limit=args.gptq_pair_limit,
                                       scales=args.gptq_scales))
        rep = run_gptq(qm, task, tok, run, batches, progress=True)
        secs = time.time() - t0
        console.print(f"GPTQ: proxy loss sum {rep['proxy_nearest_sum']:.4g} (nearest) -> {rep['proxy_gptq_sum']:.4g}, "
                      f"{rep['layers_improved']}/{rep['layers']} layers lower, {secs:.0f} s")
        name = f"GPTQ{' asymmetric' if args.gptq_asymmetric else ''} ({args.gptq} seq)"
        layers = {n: {k: i[k] for k in ("proxy_nearest", "proxy_gptq", "proxy_unlimited", "pair_limited", "kept",
                                                   "scale_multiplier_mean", "rows_rescaled", "rows_nearest")
                      if k in i} for n, i in rep["per_layer"].items()}
        score(f"{name}, simulated", *predict(qm, loader, progress=False), gptq_s=secs,
              gptq_proxy_sum=rep["proxy_gptq_sum"], gptq_pair_limited=rep["layers_pair_limited"], gptq_layers=layers)
        on_ort(qm, name)

    if args.bias_correction:
        qm, _ = calibrated([])
        seqs = calibration_sequences(task, tok, args.bias_correction, seed=1)
        rep = correct_bias(qm, seqs, progress=True)
        name = f"Bias correction ({args.bias_correction} seq)"
        score(f"{name}, simulated", *predict(qm, loader, progress=False), bias_correction_s=rep["seconds"])
        on_ort(qm, name)

    t = Table(title=f"{args.preset} on {args.model} ({ckpt.name}): dev-logit cosine to FP32")
    for c in ("variant", "cosine", "accuracy"):
        t.add_column(c, justify="left" if c == "variant" else "right")
    for name, r in rows.items():
        t.add_row(name, f"{r['cosine']:.4f}", f"{r['accuracy']:.2f}")
    console.print(t)
    json_path = Path(args.json or f"runs/bench/deploy_fidelity-{args.model}.json")
    atomic_write_json(json_path, {"model": args.model, "checkpoint": str(ckpt), "preset": args.preset,
                                  "command": " ".join(sys.argv), "rows": rows})
    console.print(f"JSON -> {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
