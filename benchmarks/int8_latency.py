"""Real int8 execution (issue 7): latency, size, fidelity and accuracy side by side, in one run.

    .venv/bin/python benchmarks/int8_latency.py --model mpnet      # MPNet-base (all-mpnet-base-v2)
    .venv/bin/python benchmarks/int8_latency.py --model minilm     # MiniLM-L6

Rows, all on the CPU with ``--threads`` intra-op threads (default 2):

* PyTorch FP32 eager; PyTorch bf16 (``model.to(torch.bfloat16)``);
* ONNX Runtime FP32 (``pegq.export.onnx.export_fp32``, TorchScript exporter, ORT's default optimizations);
* ORT dynamic int8 (``quantize_dynamic``, int8 weights, activation ranges computed per batch);
* ORT static int8 (``quant_pre_process`` then ``quantize_static``: QDQ, per-tensor, uint8 activations /
  int8 weights, every supported op type, min-max ranges from the same 16 rotten_tomatoes training
  sentences as pegq's W8A8 calibration; MPNet's encoder-level relative-position-bucket nodes are
  excluded because quantizing them corrupts the bucket indices);
* pegq's exports (``pegq.export.onnx.export_onnx``) of the paper's per-tensor W8A8, MP-PTQ (16-bit FFN
  activations) and PEG-PTQ (K=6, permuted; rewritten into per-tensor ops), each calibrated like
  ``pegq ptq``; PEG also with uint8 weights (bit-exact with the simulation on CPUs without VNNI;
  ``--weight-dtypes`` picks the weight storages of every export, ``auto`` = uint8 only for the PEG
  groups' split matmuls);
  ``--presets`` picks others (e.g. ``peg-12p``, the int8 deployment presets ``w8a8-gemm`` / ``peg-gemm``,
  or a JSON/YAML config file), ``--weight-estimator mse`` their weight ranges;
* ``--onnx LABEL=PATH`` rows: ONNX files made elsewhere, e.g. ``pegq export onnx`` of a ``pegq ptq --gptq``
  output (``benchmarks/deploy_fidelity.py`` keeps its GPTQ export at ``runs/bench/deploy_fidelity-<model>-gptq.onnx``);
* accuracy-only rows: the same pegq models simulated in PyTorch (fake quantization).

Columns: median latency at each batch x sequence shape (round-robin over the variants, ``--repeats``
rounds, after one warm-up), ratio to PyTorch FP32 at that shape, file size (ONNX file; PyTorch: the
parameters' bytes), cosine of the outputs to PyTorch FP32 (classifier: the dev-set logits; bare
encoder: the last hidden states of the valid tokens of the largest batch), rotten_tomatoes dev
accuracy (fine-tuned checkpoints only: ``$PEGQ_CACHE/<model>-rotten_tomatoes-e3``, else
``<model>-rotten_tomatoes-head``; without one the bare encoder is used and accuracy is n/a), and the
number of int8 kernels in ORT's optimized graph. The CPU is shared: timings are under whatever load
the machine has (the load average is printed and stored).

Output: a table, and JSON at ``--json`` (default ``runs/bench/int8_latency-<model>.json``).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cache_dir, model_path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WEIGHT_LABELS = {"int8": "", "uint8": ", uint8 weights", "auto": ", uint8 group weights",
                 "exact": ", uint8 weights where pairs can saturate"}
PEGQ_LABELS = {"w8a8": "pegq W8A8", "mp-ptq": "pegq MP-PTQ", "peg-ptq": "pegq PEG-PTQ",
               "w8a8-gemm": "pegq W8A8-gemm", "peg-gemm": "pegq PEG-gemm", "peg-outlier-gemm": "pegq PEG-outlier-gemm"}


def checkpoint(name: str) -> tuple[Path, bool]:
    for suffix in ("e3", "head"):
        p = cache_dir() / f"{name}-rotten_tomatoes-{suffix}"
        if (p / "config.json").exists():
            return p, True
    return model_path(name), False


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class _Reader:
    """ORT calibration data reader over pegq calibration batches."""

    def __init__(self, batches, names):
        from pegq.export.onnx import feeds

        self.items = [feeds(b, names) for b in batches]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.items):
            return None
        self.i += 1
        return self.items[self.i - 1]

    def rewind(self):
        self.i = 0


def skipped_variants(values: list[str], rows: list[str]) -> set[str]:
    """The rows named by ``--skip-eval``: each value is a row name (names may hold commas, e.g. the
    uint8-weight exports) or else a comma-separated list of them. An unknown name is an error."""
    out: set[str] = set()
    for v in values:
        names = [v] if v in rows else [x.strip() for x in v.split(",") if x.strip()]
        unknown = [n for n in names if n not in rows]
        if unknown:
            raise SystemExit(f"--skip-eval: no variant named {unknown[0]!r}; the rows are: {', '.join(rows)}")
        out.update(names)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["minilm", "mpnet"], default="mpnet")
    ap.add_argument("--shapes", default="1x128,8x128", help="batch x sequence, comma-separated")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-examples", type=int, default=None, help="dev examples for accuracy (default: all)")
    ap.add_argument("--no-eval", action="store_true", help="skip the accuracy pass")
    ap.add_argument("--skip-eval", action="append", default=[], metavar="VARIANT",
                    help="a variant without an accuracy pass, by its exact row name, repeatable, e.g. "
                    "--skip-eval 'PyTorch bf16' (slow on CPUs without native bf16); a value that is not a row "
                    "name is split on commas")
    ap.add_argument("--presets", default="w8a8,mp-ptq,peg-ptq",
                    help="pegq presets to export, comma-separated (PEG ones also get a uint8-weight export)")
    ap.add_argument("--weight-dtypes", default=None, metavar="DTYPES",
                    help="weight storage of every pegq export, comma-separated from int8, uint8, auto (uint8 only for "
                    "the PEG groups' split matmuls); default: int8, plus uint8 for PEG presets")
    ap.add_argument("--weight-estimator", choices=["current_minmax", "mse"], default=None,
                    help="weight range estimator of the pegq presets (default: theirs, min-max; MPNet needs mse)")
    ap.add_argument("--onnx", action="append", default=[], metavar="LABEL=PATH",
                    help="also time this ONNX file (e.g. `pegq export onnx` of a GPTQ checkpoint) as row LABEL")
    ap.add_argument("--workdir", default=None, help="keep the ONNX files here (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    extra_onnx = {}
    for item in args.onnx:
        label, sep, path = item.partition("=")
        if not sep or not label.strip() or not Path(path).is_file():
            raise SystemExit(f"--onnx {item!r}: expected LABEL=PATH with an existing .onnx file")
        extra_onnx[label.strip()] = Path(path)
    dtypes = [d.strip() for d in (args.weight_dtypes or "").split(",") if d.strip()]
    bad = [d for d in dtypes if d not in WEIGHT_LABELS]
    if bad:
        raise SystemExit(f"--weight-dtypes: {bad[0]!r} is not a weight storage; allowed: {', '.join(WEIGHT_LABELS)}")

    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from rich.console import Console
    from rich.table import Table

    from pegq.api import calibrate, model_inputs, predict, quantize
    from pegq.config import resolve_config
    from pegq.data import compute_metrics, encode, load_task, make_loader
    from pegq.export.onnx import export_fp32, export_onnx, feeds, kernel_report, ort_predict, session
    from pegq.io import atomic_write_json
    from pegq.models import load_model
    from pegq.pipeline import calibration_batches, config_from_cli
    from pegq.quant import PerEmbeddingGroup

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    console = Console(width=max(160, Console().width))
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    load0 = os.getloadavg()
    t_start = time.time()

    ckpt, is_classifier = checkpoint(args.model)
    task = load_task("rotten_tomatoes")
    model, tok = load_model(ckpt, num_labels=2) if is_classifier else load_model(ckpt, for_classification=False)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"[bold]{args.model}[/] {ckpt} ({'fine-tuned classifier' if is_classifier else 'bare encoder'}"
                  f", {n_params / 1e6:.1f} M params), {args.threads} threads, CPU {cpu_name()}, "
                  f"load average {load0[0]:.1f}")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pegq-int8-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    dev_enc = encode(task.dev, tok, task.spec)
    inputs = {s: {k: v[: s[0], : s[1]].contiguous() for k, v in dev_enc.tensors.items() if k != "labels"}
              for s in shapes}
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in dev_enc.tensors
                                               and args.model != "mpnet" else [])

    # ------------------------------------------------------------------ build every variant
    variants: dict[str, dict] = {}

    def torch_runner(m):
        def run(batch):
            with torch.inference_mode():
                out = m(**batch)
            o = out.logits if hasattr(out, "logits") else out.last_hidden_state
            return o.float().numpy()

        return run

    variants["PyTorch FP32"] = {"run": torch_runner(model), "bytes": 4 * n_params, "kind": "torch", "model": model}
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    variants["PyTorch bf16"] = {"run": torch_runner(bf16), "bytes": 2 * n_params, "kind": "torch", "model": bf16}

    def ort_variant(path):
        sess = session(path, threads=args.threads)
        input_names = [i.name for i in sess.get_inputs()]
        return {"run": lambda b, s=sess, n=input_names: s.run(None, feeds(b, n))[0], "bytes": path.stat().st_size,
                "kind": "ort", "session": sess, "inputs": input_names, "path": path}

    t0 = time.time()
    fp32_path = workdir / "fp32.onnx"
    export_fp32(model, fp32_path)
    variants["ORT FP32"] = ort_variant(fp32_path)
    dyn_path = workdir / "ort_dynamic_int8.onnx"
    quantize_dynamic(str(fp32_path), str(dyn_path), weight_type=QuantType.QInt8)
    variants["ORT dynamic int8"] = ort_variant(dyn_path)
    w8a8 = resolve_config("w8a8")
    calib = calibration_batches(task, tok, w8a8)  # 16 x 1 training sentences (pegq's W8A8 calibration)
    pre_path, static_path = workdir / "fp32_pre.onnx", workdir / "ort_static_int8.onnx"
    cwd = os.getcwd()
    os.chdir(workdir)  # ORT's pre-processing writes temporary files into the working directory
    try:
        try:
            quant_pre_process(str(fp32_path), str(pre_path), skip_symbolic_shape=False)
        except Exception as e:  # noqa: BLE001 - ORT's symbolic shape inference gives up on some exports
            console.print(f"quant_pre_process: {e}; retrying with ONNX shape inference only")
            quant_pre_process(str(fp32_path), str(pre_path), skip_symbolic_shape=True)
        import onnx

        # MPNet's relative-position buckets are computed in float (log of |i - j|, -inf on the diagonal, then
        # cast to indices): quantizing those Div/Log/Mul nodes corrupts the indices (Gather out of bounds), so
        # the encoder-level position-bias nodes stay FP32; every node inside the layers is quantized
        exclude = [n.name for n in onnx.load(str(pre_path), load_external_data=False).graph.node
                   if "/encoder/" in n.name and "/layer." not in n.name]
        quantize_static(str(pre_path), str(static_path), _Reader(calib, names), quant_format=QuantFormat.QDQ,
                        per_channel=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude)
    finally:
        os.chdir(cwd)
    variants["ORT static int8"] = ort_variant(static_path)
    console.print(f"ORT baselines built in {time.time() - t0:.0f} s")

    simulated = {}
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        t0 = time.time()
        cfg = config_from_cli(preset, args.weight_estimator, None, None, None, None)  # a preset or a YAML file
        label = PEGQ_LABELS.get(cfg.name, f"pegq {cfg.name}")
        qm = quantize(copy.deepcopy(model), cfg)
        calibrate(qm, calibration_batches(task, tok, cfg), progress=False)
        has_peg = any(isinstance(q.granularity, PerEmbeddingGroup) for q in qm.quantizers.values() if q.enabled)
        for dt in dtypes or (["int8", "uint8"] if cfg.name.startswith("peg") else ["int8"]):
            if dt == "auto" and not has_peg:
                continue  # no split matmuls: the same file as int8
            path = workdir / f"pegq_{cfg.name}_{dt}w.onnx"
            export_onnx(qm, path, weight_dtype=dt)
            variants[f"{label} (ORT{WEIGHT_LABELS[dt]})"] = ort_variant(path)
        simulated[f"{label} (simulated)"] = qm
        console.print(f"{label}: calibrated + exported in {time.time() - t0:.0f} s")

    for label, path in extra_onnx.items():
        variants[label] = ort_variant(path)

    for v in variants.values():
        if v["kind"] == "ort":
            v["int8_kernels"] = kernel_report(v["path"], threads=args.threads)["int8_kernels"]

    # ------------------------------------------------------------------ latency (round-robin)
    lat: dict[str, dict[str, float]] = {k: {} for k in variants}
    for s in shapes:
        b = inputs[s]
        for v in variants.values():
            v["run"](b)  # warm-up
        times = {k: [] for k in variants}
        for _ in range(args.repeats):
            for k, v in variants.items():
                t = time.perf_counter()
                v["run"](b)
                times[k].append(time.perf_counter() - t)
        for k in variants:
            lat[k][f"{s[0]}x{s[1]}"] = statistics.median(times[k]) * 1e3
        console.print(f"timed {s[0]}x{s[1]} (load average {os.getloadavg()[0]:.1f})")

    # ------------------------------------------------------------------ fidelity and accuracy
    big = max(shapes)
    ref_out = variants["PyTorch FP32"]["run"](inputs[big])
    mask = inputs[big]["attention_mask"].numpy().astype(bool)

    def cos(a, b):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))

    results = {}
    loader = None
    if is_classifier and not args.no_eval:
        dev = task.dev if not args.eval_examples else task.dev[: args.eval_examples]
        loader = make_loader(encode(dev, tok, task.spec), batch_size=32)
    ref_logits = None
    rows_order = list(variants) + list(simulated)
    skip_eval = skipped_variants(args.skip_eval, rows_order)
    for k in rows_order:
        r = {"latency_ms": lat.get(k, {})}
        v = variants.get(k)
        if v is not None:
            r["bytes"] = v["bytes"]
            r["int8_kernels"] = v.get("int8_kernels")
        acc = logits = None
        if loader is not None and k not in skip_eval:
            t0 = time.time()
            if k in simulated:
                logits, labels = predict(simulated[k], loader, progress=False)
            elif v["kind"] == "torch":
                logits, labels = predict(v["model"], loader, progress=False)
            else:
                logits, labels = ort_predict(v["session"], loader, v["inputs"], progress=False)
            acc = compute_metrics(task.spec, logits, labels)["score"]
            if k == "PyTorch FP32":
                ref_logits = logits
            r["accuracy"] = acc
            r["eval_s"] = time.time() - t0
        if logits is not None and ref_logits is not None:
            r["cosine"] = cos(logits, ref_logits)
        elif v is not None and not is_classifier:
            out = v["run"](inputs[big])
            r["cosine"] = cos(out[mask], ref_out[mask])
        elif k in simulated and not is_classifier:
            with torch.no_grad():
                out = simulated[k](**model_inputs(inputs[big])).last_hidden_state.numpy()
            r["cosine"] = cos(out[mask], ref_out[mask])
        results[k] = r
        console.print(f"  {k}: " + ", ".join(f"{kk}={vv}" for kk, vv in r.items() if kk in ("accuracy", "cosine")))

    # ------------------------------------------------------------------ report
    load1 = os.getloadavg()
    shape_keys = [f"{s[0]}x{s[1]}" for s in shapes]
    t = Table(title=f"int8 execution on {args.model} ({'fine-tuned' if is_classifier else 'bare encoder'}), "
              f"{args.threads} threads, CPU shared (load avg {load0[0]:.1f} -> {load1[0]:.1f})")
    t.add_column("variant")
    for sk in shape_keys:
        t.add_column(f"{sk} ms", justify="right")
        t.add_column("x FP32", justify="right")
    t.add_column(f"x ORT static ({shape_keys[-1]})", justify="right")
    for c in ("size MiB", "cosine", "accuracy", "int8 kernels"):
        t.add_column(c, justify="right")
    for k, r in results.items():
        cells = [k]
        for sk in shape_keys:
            ms = r["latency_ms"].get(sk)
            base = results["PyTorch FP32"]["latency_ms"][sk]
            cells += [f"{ms:.1f}" if ms else "-", f"{ms / base:.2f}" if ms else "-"]
        ms, st = r["latency_ms"].get(shape_keys[-1]), results.get("ORT static int8", {}).get("latency_ms", {})
        cells.append(f"{ms / st[shape_keys[-1]]:.2f}" if ms and st.get(shape_keys[-1]) else "-")
        cells.append(f"{r['bytes'] / 2**20:.1f}" if "bytes" in r else "-")
        cells.append(f"{r['cosine']:.4f}" if "cosine" in r else "-")
        cells.append(f"{r['accuracy']:.2f}" if r.get("accuracy") is not None else "n/a")
        cells.append(str(r["int8_kernels"]) if r.get("int8_kernels") is not None else "-")
        t.add_row(*cells)
    console.print(t)

    checks = {}
    sk = shape_keys[-1]
    static, bf = results.get("ORT static int8"), results.get("PyTorch bf16")
    for row in [k for k in results if k.startswith("pegq ") and " (ORT" in k]:
        peg = results[row]
        if not (static and bf and sk in peg["latency_ms"]):
            continue
        c = {"over_static": peg["latency_ms"][sk] / static["latency_ms"][sk],
             "over_bf16": peg["latency_ms"][sk] / bf["latency_ms"][sk], "cosine": peg.get("cosine")}
        if peg.get("accuracy") is not None:
            c["accuracy_drop"] = results["PyTorch FP32"]["accuracy"] - peg["accuracy"]
            sim = results.get(f"{row.split(' (ORT')[0]} (simulated)", {}).get("accuracy")
            if sim is not None:
                c["ort_minus_simulated"] = peg["accuracy"] - sim
        checks[row] = c
        console.print(
            f"{row} targets at {sk}: /static = {c['over_static']:.2f} (<= 1.10), /bf16 = "
            f"{c['over_bf16']:.2f} (< 1), cosine "
            + (f"{c['cosine']:.4f}" if c["cosine"] is not None else "n/a (--no-eval)") + " (>= 0.999)"
            + (f", accuracy drop {c['accuracy_drop']:.2f} (<= 0.5)" if "accuracy_drop" in c else
               (", accuracy n/a (--no-eval)" if args.no_eval else ", accuracy n/a (no fine-tuned checkpoint)"))
        )
    out = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model,
        "checkpoint": str(ckpt),
        "fine_tuned": is_classifier,
        "threads": args.threads,
        "cpu": cpu_name(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "load_average_start": load0,
        "load_average_end": load1,
        "shapes": shape_keys,
        "repeats": args.repeats,
        "results": results,
        "checks": checks,
        "wall_s": time.time() - t_start,
    }
    json_path = Path(args.json or f"runs/bench/int8_latency-{args.model}.json")
    atomic_write_json(json_path, out)
    console.print(f"JSON -> {json_path}; ONNX files in {workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
