"""The jobs behind ``pegq export onnx`` and ``pegq export packed``.

The model given with ``--model`` is one of:

* a fine-tuned Hugging Face checkpoint: wrapped, configured with ``--preset``/``--override`` and calibrated
  on the task's training split exactly like ``pegq ptq`` (the config's calibration settings);
* a pegq packed checkpoint (``pegq export packed``) or a quantized checkpoint (``pegq qat``): already
  calibrated, loaded as is (``--preset``/``--override`` are refused: they would not be used).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, resolve_config
from ..io import OutputError, atomic_write_json


def load_calibrated(model_dir: str, task_name: str, config=None, overrides=None, data_dir=None,
                    progress: bool = True, task_kwargs: dict | None = None):
    """``(qm, tokenizer, task, source)`` -- a calibrated, frozen QuantizedModel (see module docstring)."""
    from ..data import load_task
    from .packed import META as PACKED_META
    from .packed import load_packed

    task = load_task(task_name, data_dir=data_dir, **(task_kwargs or {}))
    p = Path(model_dir)
    prepared = (p / PACKED_META).is_file() or (p / "pegq_quant.json").is_file()
    if prepared and (config is not None or overrides):
        raise ConfigError(
            f"'{model_dir}' is already quantized and calibrated; drop --preset/--override (they would be ignored)"
        )
    if (p / PACKED_META).is_file():
        qm, tok = load_packed(p)
        return qm, tok, task, "packed checkpoint"
    if (p / "pegq_quant.json").is_file():
        from ..qat import load_quantized

        qm, tok, _ = load_quantized(p, num_labels=task.spec.num_labels)
        return qm, tok, task, "quantized checkpoint"
    from ..api import calibrate, quantize
    from ..models import load_model
    from ..pipeline import calibration_batches

    cfg = resolve_config(config or "w8a8")
    if overrides:
        cfg = cfg.with_overrides(list(overrides))
    model, tok = load_model(model_dir, num_labels=task.spec.num_labels)
    qm = quantize(model, cfg)
    calibrate(qm, calibration_batches(task, tok, cfg), progress=progress)
    return qm, tok, task, f"calibrated with {cfg.name}"


def _check_output(path: Path, overwrite: bool, is_dir: bool) -> None:
    if path.exists() and not overwrite:
        what = "folder" if is_dir else "file"
        raise OutputError(f"{str(path)!r} already exists; pass --overwrite to replace it or choose another {what}")
    if path.exists() and is_dir and not path.is_dir():
        raise OutputError(f"{str(path)!r} exists and is not a folder; choose another --output")
    if path.exists() and not is_dir and path.is_dir():
        raise OutputError(f"{str(path)!r} is a folder; --output takes an .onnx file name")


def run_export_onnx(
    model_dir: str,
    output: str | Path,
    task_name: str = "rotten_tomatoes",
    config=None,
    overrides=None,
    weight_dtype: str = "int8",
    evaluate: bool = False,
    max_eval_examples: int | None = None,
    data_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    threads: int = 2,
    task_kwargs: dict | None = None,
) -> dict:
    """Calibrate (or load), export to QDQ ONNX, check ORT's kernels and per-tensor parity on 8 dev
    sentences; with ``evaluate`` also score ORT against the simulated model on the dev split."""
    from ..api import evaluate as sim_evaluate
    from ..data import compute_metrics
    from ..pipeline import dev_loader
    from .onnx import (
        WEIGHT_DTYPES,
        ExportError,
        export_onnx,
        kernel_report,
        ort_predict,
        per_tensor_parity,
        prepare,
        session,
    )

    output = Path(output)
    if output.suffix != ".onnx":
        raise OutputError(f"--output {str(output)!r} must be a file name ending in .onnx")
    if weight_dtype not in WEIGHT_DTYPES:
        raise ExportError(f"--weight-dtype {weight_dtype!r} is unknown; allowed: {', '.join(WEIGHT_DTYPES)}")
    _check_output(output, overwrite, is_dir=False)
    qm, tok, task, source = load_calibrated(model_dir, task_name, config, overrides, data_dir, progress, task_kwargs)
    info = export_onnx(qm, output, weight_dtype=weight_dtype)
    info["source"] = source
    info["kernels"] = kernel_report(output, threads=threads)
    sample = next(iter(dev_loader(task, tok, batch_size=8, max_examples=8)))
    par = per_tensor_parity(prepare(qm), output, sample, threads=threads)
    info["parity"] = {k: v for k, v in par.items() if k not in ("tensors", "weights")}
    info["parity"]["tensors_over_1_step"] = {n: r for n, r in par["tensors"].items() if r["max_steps"] > 1}
    if evaluate:
        loader = dev_loader(task, tok, batch_size=32, max_examples=max_eval_examples)
        t0 = time.perf_counter()
        sim = sim_evaluate(qm, loader, task.spec, progress=progress, desc="simulated eval")
        sess = session(output, threads=threads)
        logits, labels = ort_predict(sess, loader, info["inputs"], progress=progress)
        ort_score = compute_metrics(task.spec, logits, labels)
        info["eval"] = {"task": task.spec.name, "metric": sim.get("metric"), "simulated": sim["score"],
                        "onnxruntime": ort_score["score"], "delta": ort_score["score"] - sim["score"],
                        "examples": len(loader.dataset), "eval_s": time.perf_counter() - t0}
    atomic_write_json(output.with_suffix(".json"), info)
    return info


def run_export_packed(
    model_dir: str,
    output: str | Path,
    task_name: str = "rotten_tomatoes",
    config=None,
    overrides=None,
    data_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    check: bool = True,
    task_kwargs: dict | None = None,
) -> dict:
    """Calibrate (or load) and write a packed checkpoint; with ``check`` reload it and compare outputs
    with the simulated model on 8 dev sentences."""
    from ..pipeline import dev_loader
    from .packed import load_packed, save_packed

    output = Path(output)
    _check_output(output, overwrite, is_dir=True)
    qm, tok, task, source = load_calibrated(model_dir, task_name, config, overrides, data_dir, progress, task_kwargs)
    info = save_packed(qm, output, tokenizer=tok, overwrite=overwrite)
    info["source"] = source
    if check:
        sample = next(iter(dev_loader(task, tok, batch_size=8, max_examples=8)))
        from ..api import model_inputs

        loaded, _ = load_packed(output, with_tokenizer=False)
        with torch.no_grad():
            a = qm(**model_inputs(sample))
            b = loaded(**model_inputs(sample))
        a = a.logits if hasattr(a, "logits") else a[0]
        b = b.logits if hasattr(b, "logits") else b[0]
        info["reload_identical"] = bool(torch.equal(a, b))
        info["reload_max_abs_diff"] = float((a - b).abs().max())
    atomic_write_json(output / "pegq_packed_report.json", info)
    return info


def onnx_table(info: dict):
    from rich.table import Table

    mib = 2**20
    t = Table(title=f"pegq export onnx -> {info['path']}", show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("model", info.get("source", ""))
    t.add_row("file", f"{info['bytes'] / mib:.1f} MiB")
    t.add_row("quantizers", ", ".join(f"{k} x{v}" for k, v in info["quantizers"].items()))
    if info.get("peg_layers"):
        t.add_row("PEG rewrite", f"{info['peg_layers']} layers split into per-tensor groups")
    k = info.get("kernels")
    if k:
        t.add_row("ORT int8 kernels", f"{k['int8_kernels']} ("
                  + ", ".join(f"{op} x{n}" for op, n in k["ops"].items() if op in _INT8) + f"); "
                  f"float MatMul/Gemm left: {k['float_matmuls']}")
    risky = info.get("int8_pair_overflows")
    if risky:
        t.add_row("int8 pair sums", f"{sum(risky.values())} pairs of adjacent inputs in {len(risky)} int8 weights "
                  "have |q0 + q1| > 128: x86 CPUs without VNNI can saturate them, and ORT then differs from the "
                  "simulation (--weight-dtype exact, or pegq ptq --gptq --gptq-pair-limit 128, avoids it)")
    p = info.get("parity")
    if p:
        t.add_row("per-tensor parity", f"max {p['max_steps']} step(s) from the simulated model "
                  f"({len(p['tensors_over_1_step'])} tensors over 1 step); weights: {p['weight_max_steps']} steps; "
                  f"output max |diff| {p['output_max_abs_diff']:.2e}")
    e = info.get("eval")
    if e:
        t.add_row(f"{e['task']} {e['metric']}", f"simulated {e['simulated']:.2f}, ONNX Runtime {e['onnxruntime']:.2f} "
                  f"({e['delta']:+.2f}) on {e['examples']} dev examples")
    t.add_row("export time", f"{info['export_s']:.1f} s")
    return t


_INT8 = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul")


def packed_table(info: dict):
    from rich.table import Table

    from .packed import size_text

    t = Table(title=f"pegq export packed -> {info['path']}", show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("model", info.get("source", ""))
    t.add_row("size", size_text(info))
    if "reload_identical" in info:
        t.add_row("reload check", "outputs identical to the simulated model" if info["reload_identical"]
                  else f"outputs differ by up to {info['reload_max_abs_diff']:.2e}")
    return t


def _jsonable(info: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in info.items()}
