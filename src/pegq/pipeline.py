"""End-to-end jobs behind the CLI: PTQ of a fine-tuned checkpoint, evaluation.

``run_ptq``: load the checkpoint and the task, score FP32 on the dev split, quantize with the config,
calibrate on ``num_batches`` x ``batch_size`` sequences sampled (with the calibration seed) from the
training split, score the quantized model, write ``results.json`` atomically and return it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .api import calibrate, evaluate, quantize, quantizer_summary
from .config import QuantConfig, resolve_config
from .io import atomic_write_json, prepare_output_dir
from .peg import quantizers_off
from .size import model_size


def load_task_and_model(model_dir: str, task_name: str, data_dir: str | None = None, **task_kwargs):
    from .data import load_task
    from .models import load_model

    task = load_task(task_name, data_dir=data_dir, **task_kwargs)
    model, tokenizer = load_model(model_dir, num_labels=task.spec.num_labels)
    return task, model, tokenizer


def dev_loader(task, tokenizer, batch_size: int = 32, max_examples: int | None = None, max_length: int = 128):
    from .data import encode, make_loader

    dev = task.dev if not max_examples else task.dev[:max_examples]
    return make_loader(encode(dev, tokenizer, task.spec, max_length=max_length), batch_size=batch_size)


def calibration_batches(task, tokenizer, cfg: QuantConfig, max_length: int = 128) -> list[dict]:
    """``num_batches`` batches of ``batch_size`` training sequences, sampled with the calibration seed."""
    from .data import encode, make_loader, sample

    c = cfg.calibration
    n = c.batch_size * c.num_batches
    subset = sample(task.train, n, seed=c.seed)
    ds = encode(subset, tokenizer, task.spec, max_length=max_length)
    return list(make_loader(ds, batch_size=c.batch_size))


def run_ptq(
    model_dir: str,
    task_name: str,
    config: str | QuantConfig = "w8a8",
    output_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    data_dir: str | None = None,
    eval_batch_size: int = 32,
    max_eval_examples: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    fp32_score: dict | None = None,
    task_kwargs: dict | None = None,
    adaround=None,
    gptq=None,
    clipping: bool = False,
) -> dict:
    """``clipping``: also split each activation quantizer's error on the dev split into clipping and rounding
    (:func:`pegq.analysis.clipping.clipping_report`, ``result["clipping"]``; ``pegq ptq --clipping``).
    ``adaround``: a :class:`pegq.adaround_model.AdaRoundRun` to learn the weights' rounding after
    calibration (``pegq ptq --adaround``; resumable through ``<output>/.adaround-state``); ``gptq``: a
    :class:`pegq.gptq_model.GPTQRun` to round them with GPTQ instead (``pegq ptq --gptq``; resumable through
    ``<output>/.gptq-state``)."""
    if adaround is not None and gptq is not None:
        raise ValueError("AdaRound and GPTQ both choose the weights' rounding; pick one (--adaround or --gptq)")
    if output_dir is not None:
        out = prepare_output_dir(output_dir, overwrite)
    cfg = resolve_config(config)
    if overrides:
        cfg = cfg.with_overrides(overrides)
    task, model, tokenizer = load_task_and_model(model_dir, task_name, data_dir, **(task_kwargs or {}))
    loader = dev_loader(task, tokenizer, eval_batch_size, max_eval_examples)
    timings = {}
    # wrap + configure first: a bad override fails here, before any long evaluation
    qm = quantize(model, cfg)
    if fp32_score is None:
        t0 = time.perf_counter()
        with quantizers_off(qm):
            fp32_score = evaluate(qm, loader, task.spec, progress=progress, desc="FP32 eval")
        timings["fp32_eval_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = calibration_batches(task, tokenizer, cfg)
    timings.update(calibrate(qm, batches, progress=progress))
    adaround_info = None
    if adaround is not None:  # issue 6: AdaRound on every Linear weight (pegq.adaround_model)
        from .adaround_model import run_adaround

        adaround_info = run_adaround(qm, task, tokenizer, adaround, batches,
                                     out if output_dir is not None else None, progress)
    gptq_info = None
    if gptq is not None:  # GPTQ rounding of every Linear weight (pegq.gptq_model), not in the paper
        from .gptq_model import run_gptq

        gptq_info = run_gptq(qm, task, tokenizer, gptq, batches, out if output_dir is not None else None, progress)
    t1 = time.perf_counter()
    q_score = evaluate(qm, loader, task.spec, progress=progress, desc=f"{cfg.name} eval")
    timings["quant_eval_s"] = time.perf_counter() - t1
    timings["ptq_total_s"] = time.perf_counter() - t0
    clip = None
    if clipping:
        from .analysis.clipping import clipping_report

        t1 = time.perf_counter()
        clip = clipping_report(qm, loader, progress=progress)
        timings["clipping_s"] = time.perf_counter() - t1
    summary = quantizer_summary(qm)
    result = {
        "task": task.spec.name,
        "metric": q_score.get("metric"),
        "model": str(model_dir),
        "config_name": cfg.name,
        "fp32": fp32_score,
        "quantized": q_score,
        "fp32_score": fp32_score["score"],
        "quantized_score": q_score["score"],
        "delta": q_score["score"] - fp32_score["score"],
        "dev_examples": len(loader.dataset),
        "quantizers": summary,
        **a16_share(summary),
        "config": cfg.to_dict(),
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
        "size": model_size(qm),  # issue 6: memory vs FP32 (pegq.size)
    }
    if adaround_info is not None:
        result["config_name"] = f"{cfg.name}+adaround"
        result["adaround"] = adaround_info
    if gptq_info is not None:
        result["config_name"] = f"{cfg.name}+gptq"
        result["gptq"] = gptq_info
    if clip is not None:
        result["clipping"] = clip
    if output_dir is not None:
        atomic_write_json(Path(out) / "results.json", result)
        if adaround_info is not None:
            from .adaround_model import clear_state

            clear_state(out)
        if gptq_info is not None:
            from .adaround_model import clear_state

            clear_state(out, "gptq")
    return result


def a16_share(summary: dict) -> dict:
    """``{"a16_count": n, "a16_share": n / total}``: activation quantizers kept at 16 bits (paper section 5:
    36 of 161 on BERT-base for MP-PTQ), from :func:`pegq.api.quantizer_summary`."""
    total = int(summary["activation_quantizers"])
    n = int(summary["activation_bits"].get("16", 0))
    return {"a16_count": n, "a16_share": n / total if total else 0.0}


def results_table(rows: list[dict], title: str = "pegq results"):
    """A rich table of result dicts (as returned by :func:`run_ptq`)."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("task", "metric", "config", "FP32", "quantized", "delta", "A16"):
        t.add_column(col, justify="right" if col in ("FP32", "quantized", "delta", "A16") else "left")
    for r in rows:
        t.add_row(
            r["task"],
            str(r["metric"]),
            r["config_name"],
            f"{r['fp32_score']:.2f}",
            f"{r['quantized_score']:.2f}",
            f"{r['delta']:+.2f}",
            _a16_text(r),
        )
    return t


def _a16_text(r: dict) -> str:
    """``"36/161 (22%)"``: activation quantizers at 16 bits; ``"-"`` for results without the count."""
    q = r.get("quantizers") or {}
    if "a16_count" not in r or not q.get("activation_quantizers"):
        return "-"
    return f"{r['a16_count']}/{q['activation_quantizers']} ({100 * r['a16_share']:.0f}%)"


def config_from_cli(preset: str, weight_estimator: str | None, act_estimator: str | None,
                    calib_batch_size: int | None, calib_batches: int | None, seed: int | None) -> QuantConfig:
    cfg = resolve_config(preset)
    if weight_estimator:
        cfg.weights = dataclasses.replace(cfg.weights, estimator=weight_estimator)
    if act_estimator:
        cfg.activations = dataclasses.replace(cfg.activations, estimator=act_estimator)
    if calib_batch_size:
        cfg.calibration.batch_size = calib_batch_size
    if calib_batches:
        cfg.calibration.num_batches = calib_batches
    if seed is not None:
        cfg.calibration.seed = seed
    cfg.calibration.__post_init__()
    return cfg
