"""The `pegq` command line. Every subcommand is a thin layer over pegq's Python API.

Errors a user can fix (a missing path, an unknown preset, a bad override, an existing output...) are
printed as one line on stderr, with a non-zero exit status, and nothing is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="pegq",
    help="Quantize transformer encoders despite their activation outliers "
    "(Bondarenko et al. 2021): PTQ, mixed precision, per-embedding-group, QAT, int8 export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

MODEL_HELP = "Fine-tuned checkpoint folder (HF save_pretrained) or, with internet, a hub id."
TASK_HELP = (
    "Task: rotten_tomatoes, a GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, mnli-mm, qnli, rte) "
    "with --data-dir, or csv with --train-csv/--dev-csv."
)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .io import OutputError

    errs: list[type[BaseException]] = [ConfigError, OutputError, FileNotFoundError]
    try:
        from .data import DataError

        errs.append(DataError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from .models import ModelError

        errs.append(ModelError)
    except ImportError:
        pass
    return tuple(errs)


def _fail(msg: str, code: int = 2):
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _quiet_transformers() -> None:
    """Keep transformers' load reports and progress bars out of pegq's output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _run(fn, *args, **kwargs):
    """Call ``fn``; a user error becomes one line on stderr and exit status 2."""
    _quiet_transformers()
    try:
        return fn(*args, **kwargs)
    except _user_errors() as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except ValueError as e:  # quantizer / adapter validation errors
        _fail(str(e).splitlines()[0])
    except KeyboardInterrupt:
        _fail("interrupted; nothing half-written was left behind (re-run the same command to resume)", 130)


def _numbers(text: str | None, option: str) -> tuple[float, ...] | None:
    """``"1,1.5"`` -> ``(1.0, 1.5)``; None stays None."""
    if text is None:
        return None
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers (e.g. 1,1.25,1.5), got {text!r}") from None


def _task_kwargs(train_csv, dev_csv, text_columns, label_column, num_labels):
    kw = {}
    if train_csv or dev_csv:
        kw.update(train_csv=train_csv, dev_csv=dev_csv)
        if text_columns:
            kw["text_columns"] = [c.strip() for c in text_columns.split(",")]
        if label_column:
            kw["label_column"] = label_column
        if num_labels is not None:
            kw["num_labels"] = num_labels
    return kw


# common options
ModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
TaskOpt = Annotated[str, typer.Option("--task", "-t", help=TASK_HELP)]
DataDirOpt = Annotated[
    str | None, typer.Option("--data-dir", help="GLUE TSV folder or a `datasets` save_to_disk folder.")
]
TrainCsv = Annotated[str | None, typer.Option("--train-csv", help="csv task: training file.")]
DevCsv = Annotated[str | None, typer.Option("--dev-csv", help="csv task: dev file.")]
TextCols = Annotated[str | None, typer.Option("--text-columns", help="csv task: one or two, comma-separated.")]
LabelCol = Annotated[str | None, typer.Option("--label-column", help="csv task: label column.")]
NumLabels = Annotated[int | None, typer.Option("--num-labels", help="csv task: classes (1 = regression).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace results already in --output.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


@app.command()
def finetune(
    model: ModelOpt,
    task: TaskOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for the fine-tuned checkpoint.")],
    data_dir: DataDirOpt = None,
    lr: Annotated[float | None, typer.Option(help="Max learning rate (default: paper Table 8).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: Table 8).")] = None,
    epochs: Annotated[float, typer.Option(help="Epochs (paper: 3).")] = 3.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    max_train_examples: Annotated[int | None, typer.Option(help="Use only the first N training examples.")] = None,
    head_only: Annotated[bool, typer.Option(
        "--head-only", help="Train only the classification head on cached encoder features (fast on a CPU; "
        "not the paper's set-up; default lr 1e-3, batch 32).")] = False,
    train_csv: TrainCsv = None,
    dev_csv: DevCsv = None,
    text_columns: TextCols = None,
    label_column: LabelCol = None,
    num_labels: NumLabels = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """FP32 fine-tuning (appendix B.1): AdamW, linear decay to zero, max length 128; writes an HF checkpoint."""
    from .data import load_task
    from .pipeline import dev_loader
    from .train import FinetuneConfig
    from .train import finetune as _finetune

    def job():
        t = load_task(task, data_dir=data_dir, **_task_kwargs(train_csv, dev_csv, text_columns, label_column,
                                                              num_labels))
        cfg = FinetuneConfig(learning_rate=lr, batch_size=batch_size, epochs=epochs, seed=seed,
                             max_train_examples=max_train_examples, head_only=head_only)
        info = _finetune(model, t, output, cfg, progress=not quiet, overwrite=overwrite)
        if info.get("main_process") is False:  # `accelerate launch`: the main process evaluates and reports
            return
        from .api import evaluate
        from .models import load_model

        m, tok = load_model(output, num_labels=t.spec.num_labels)
        score = evaluate(m, dev_loader(t, tok), t.spec, progress=not quiet, desc="FP32 dev eval")
        info["dev"] = score
        from .io import atomic_write_json

        atomic_write_json(Path(output) / "pegq_finetune.json", info)
        console.print(
            f"fine-tuned {t.spec.name}: dev {score['metric']} = {score['score']:.2f} "
            f"({info['train_seconds']:.0f} s) -> {output}"
        )

    _run(job)


@app.command()
def ptq(
    model: ModelOpt,
    task: TaskOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for results.json.")],
    preset: Annotated[str, typer.Option("--preset", "-p", help="Preset name or a JSON/YAML config file.")] = "w8a8",
    override: Annotated[
        list[str] | None,
        typer.Option("--override", help="PATTERN=TOKENS, e.g. 'encoder.layer.*.ffn.residual_sum=a16'. Repeatable."),
    ] = None,
    weight_estimator: Annotated[str | None, typer.Option(help="minmax | mse")] = None,
    act_estimator: Annotated[str | None, typer.Option(help="minmax | running | mse")] = None,
    calib_batch_size: Annotated[int | None, typer.Option(help="Calibration batch size (B.2: 1, 4, 16).")] = None,
    calib_batches: Annotated[int | None, typer.Option(help="Number of calibration batches.")] = None,
    seed: Annotated[int | None, typer.Option(help="Calibration sampling seed.")] = None,
    data_dir: DataDirOpt = None,
    max_eval_examples: Annotated[int | None, typer.Option(help="Score only the first N dev examples.")] = None,
    train_csv: TrainCsv = None,
    dev_csv: DevCsv = None,
    text_columns: TextCols = None,
    label_column: LabelCol = None,
    num_labels: NumLabels = None,
    adaround: Annotated[bool, typer.Option("--adaround", help="Learn the rounding of every Linear weight "
                                           "(AdaRound, paper Table 7) after calibration.")] = False,
    adaround_iters: Annotated[int, typer.Option(help="AdaRound iterations per layer (paper: 10^4).")] = 10_000,
    adaround_samples: Annotated[int, typer.Option(help="AdaRound calibration sequences (paper: 1024).")] = 1024,
    adaround_batch_rows: Annotated[int, typer.Option(help="AdaRound token rows per iteration.")] = 1024,
    gptq: Annotated[bool, typer.Option("--gptq", help="Round every Linear weight with GPTQ (Frantar et al. "
                                       "2022, not in the paper) after calibration; instead of --adaround.")] = False,
    gptq_samples: Annotated[int, typer.Option(help="GPTQ calibration sequences.")] = 256,
    gptq_damp: Annotated[float, typer.Option(help="GPTQ dampening, a fraction of mean(diag H).")] = 0.01,
    gptq_asymmetric: Annotated[bool, typer.Option(help="GPTQ fits each layer's quantized output to the FP32 "
                                                  "model's output of that layer (its FP32 input), not to the FP32 "
                                                  "weights on the quantized input.")] = False,
    gptq_asym_damp: Annotated[float, typer.Option(help="With --gptq-asymmetric: ridge of the least-squares "
                                                  "target, a fraction of mean(diag H), in (0, 1).")] = 0.01,
    gptq_cls_weight: Annotated[float, typer.Option(help="GPTQ: weight of each sequence's first token (what a "
                                                   "classifier reads) in H, > 0.")] = 1.0,
    gptq_pair_limit: Annotated[int | None, typer.Option(
        help="GPTQ keeps |q[2j] + q[2j+1]| <= N for every pair of adjacent weight inputs of 8-bit symmetric "
             "weights: with 128, ONNX Runtime's uint8 x int8 kernels on x86 CPUs without VNNI (which add such "
             "pairs in int16) compute exactly what the simulation does, so `pegq export onnx --weight-dtype "
             "int8` is fast and exact there.")] = None,
    gptq_pair_tolerance: Annotated[float | None, typer.Option(
        help="With --gptq-pair-limit: keep a layer's limited rounding only where its proxy loss is at most "
             "(1 + T) x GPTQ's without the limit; the other layers need --weight-dtype exact (uint8) to be "
             "exact on those CPUs.")] = None,
    gptq_scales: Annotated[str | None, typer.Option(
        help="GPTQ: comma-separated multipliers of each weight row's scale to round on; every row keeps the one of "
             "least proxy loss. Default: 1.0-2.0 with --gptq-pair-limit (a coarser grid where the limit would "
             "bind), none without; '1' turns the search off.")] = None,
    clipping: Annotated[bool, typer.Option("--clipping", help="Also split each activation quantizer's error on "
                                           "the dev split into clipping (values outside the calibrated range) "
                                           "and rounding; results.json key 'clipping'.")] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Post-training quantization: calibrate, then score FP32 and quantized on the dev split."""
    from .pipeline import config_from_cli, results_table, run_ptq
    from .size import size_text

    def job():
        cfg = config_from_cli(preset, weight_estimator, act_estimator, calib_batch_size, calib_batches, seed)
        ada = None
        if adaround:
            from .adaround_model import AdaRoundRun
            from .quant.adaround import AdaRoundConfig

            ada = AdaRoundRun(num_samples=adaround_samples, seed=cfg.calibration.seed,
                              layer=AdaRoundConfig(iters=adaround_iters, batch_rows=adaround_batch_rows))
        gq = None
        if gptq:
            from .gptq_model import GPTQRun
            from .quant.gptq import GPTQConfig

            gq = GPTQRun(num_samples=gptq_samples, seed=cfg.calibration.seed, asymmetric=gptq_asymmetric,
                         asym_damp=gptq_asym_damp, cls_weight=gptq_cls_weight,
                         pair_tolerance=gptq_pair_tolerance,
                         layer=GPTQConfig(damp=gptq_damp, pair_limit=gptq_pair_limit,
                                          scales=_numbers(gptq_scales, "--gptq-scales")))
        r = run_ptq(model, task, cfg, output, overrides=override, data_dir=data_dir,
                    max_eval_examples=max_eval_examples, overwrite=overwrite, progress=not quiet,
                    task_kwargs=_task_kwargs(train_csv, dev_csv, text_columns, label_column, num_labels),
                    adaround=ada, gptq=gq, clipping=clipping)
        console.print(results_table([r]))
        console.print(size_text(r["size"]))
        if clipping:
            from .analysis.clipping import clipping_table

            console.print(clipping_table(r["clipping"]))
        console.print(f"results -> {Path(output) / 'results.json'}")

    _run(job)


@app.command()
def loo(
    model: ModelOpt,
    task: TaskOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for loo.json and loo.md.")],
    sweep_kind: Annotated[
        str | None, typer.Option("--sweep-kind", help="Also leave this kind in FP32 one layer at a time, "
                                 "e.g. ffn.residual_sum.")
    ] = None,
    kind: Annotated[
        list[str] | None, typer.Option("--kind", help="Only these kinds (repeatable; default: every kind).")
    ] = None,
    last_layers: Annotated[
        int, typer.Option(help="Row for the FFN residual sum of the last N layers only (0: none).")
    ] = 2,
    seed: Annotated[list[int] | None, typer.Option("--seed", help="Calibration seeds (repeatable).")] = None,
    bits: Annotated[int, typer.Option(help="Activation bit-width.")] = 8,
    act_estimator: Annotated[str, typer.Option(help="minmax | running | mse")] = "minmax",
    calib_batch_size: Annotated[int, typer.Option(help="Calibration batch size.")] = 1,
    calib_batches: Annotated[int, typer.Option(help="Number of calibration batches.")] = 1,
    data_dir: DataDirOpt = None,
    max_eval_examples: Annotated[int | None, typer.Option(help="Score only the first N dev examples.")] = None,
    trim_padding: Annotated[
        bool, typer.Option(help="Score length-sorted dev batches cut to their longest sequence (same logits).")
    ] = True,
    train_csv: TrainCsv = None,
    dev_csv: DevCsv = None,
    text_columns: TextCols = None,
    label_column: LabelCol = None,
    num_labels: NumLabels = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Leave-one-out (paper Table 2): weights FP32, all activations 8-bit, then one quantizer kind at a time
    left in FP32. Resumable: re-run the same command after an interruption."""
    from .loo import leave_one_out, loo_table

    def job():
        r = leave_one_out(model, task, output, kinds=list(kind) if kind else None, sweep_kind=sweep_kind,
                          last_layers=last_layers, seeds=list(seed) if seed else [0], bits=bits,
                          estimator=act_estimator, calib_batch_size=calib_batch_size, calib_batches=calib_batches,
                          data_dir=data_dir, max_eval_examples=max_eval_examples, trim_padding=trim_padding,
                          overwrite=overwrite, progress=not quiet,
                          task_kwargs=_task_kwargs(train_csv, dev_csv, text_columns, label_column, num_labels))
        console.print(loo_table(r))
        console.print(f"results -> {Path(output) / 'loo.json'} and {Path(output) / 'loo.md'}")

    _run(job)


@app.command()
def qat(
    model: ModelOpt,
    task: TaskOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for the quantized checkpoint and "
                                        "results.json (`pegq eval -m` loads it).")],
    preset: Annotated[str, typer.Option("--preset", "-p", help="qat-w8a8, qat-w4a8, qat-w4a8-e2, any preset "
                                        "or a JSON/YAML config: the PTQ setup QAT starts from.")] = "qat-w8a8",
    override: Annotated[list[str] | None, typer.Option("--override", help="PATTERN=TOKENS, repeatable.")] = None,
    lr: Annotated[float | None, typer.Option(help="Max learning rate (default: Tables 10/11).")] = None,
    act_range_rel_lr: Annotated[float | None, typer.Option(help="Activation ranges learn at this rate relative "
                                                           "to their PTQ size per step (e.g. 1e-3; default: "
                                                           "at --lr, as the paper).")] = None,
    distill: Annotated[float, typer.Option(help="Weight of distillation from the FP32 model's logits in the loss "
                                            "(0 = the task loss only, as the paper; 1 = distillation only).")] = 0.0,
    weight_estimator: Annotated[str | None, typer.Option(help="PTQ init of the weight ranges: minmax | mse")] = None,
    act_estimator: Annotated[str | None, typer.Option(help="PTQ init of the activation ranges: "
                                                      "minmax | running | mse")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size per process (default: Tables 10/11).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Epochs (default: Tables 10/11, 3 or 6).")] = None,
    attn_dropout: Annotated[float | None, typer.Option(help="Self-attention dropout rate (Table 10's D; "
                                                       "default: the checkpoint's).")] = None,
    warmup_ratio: Annotated[float, typer.Option(help="Linear warm-up share of the steps.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Random seed (data order, dropout).")] = 0,
    max_train_examples: Annotated[int | None, typer.Option(help="Use only the first N training examples.")] = None,
    no_lsq_grad_scale: Annotated[bool, typer.Option("--no-lsq-grad-scale",
                                                    help="Do not scale range gradients by 1/sqrt(N*Qp).")] = False,
    data_dir: DataDirOpt = None,
    max_eval_examples: Annotated[int | None, typer.Option(help="Score only the first N dev examples.")] = None,
    train_csv: TrainCsv = None,
    dev_csv: DevCsv = None,
    text_columns: TextCols = None,
    label_column: LabelCol = None,
    num_labels: NumLabels = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Quantization-aware training: calibrate (PTQ init), then learn weights and every range jointly
    (AdamW, 10% warm-up, linear decay); writes a quantized checkpoint. Resumable; runs under
    `accelerate launch` unchanged."""
    from .pipeline import config_from_cli
    from .qat import QATConfig, qat_table
    from .qat import qat as _qat
    from .size import size_text

    def job():
        hp = QATConfig(learning_rate=lr, batch_size=batch_size, epochs=epochs, attn_dropout=attn_dropout,
                       warmup_ratio=warmup_ratio, seed=seed, max_train_examples=max_train_examples,
                       lsq_grad_scale=not no_lsq_grad_scale, act_range_rel_lr=act_range_rel_lr,
                       distill=distill)
        cfg = config_from_cli(preset, weight_estimator, act_estimator, None, None, None)
        r = _qat(model, task, cfg, output, hparams=hp, overrides=override, data_dir=data_dir,
                 max_eval_examples=max_eval_examples, overwrite=overwrite, progress=not quiet,
                 task_kwargs=_task_kwargs(train_csv, dev_csv, text_columns, label_column, num_labels))
        if r.get("main_process") is False:
            return
        console.print(qat_table([r]))
        console.print(size_text(r["size"]))
        console.print(f"checkpoint + results -> {output}")

    _run(job)


@app.command("eval")
def eval_(
    model: ModelOpt,
    task: TaskOpt,
    data_dir: DataDirOpt = None,
    max_eval_examples: Annotated[int | None, typer.Option(help="Score only the first N dev examples.")] = None,
    train_csv: TrainCsv = None,
    dev_csv: DevCsv = None,
    text_columns: TextCols = None,
    label_column: LabelCol = None,
    num_labels: NumLabels = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a sentence.")] = False,
    quiet: Quiet = False,
):
    """Score a checkpoint on the task's dev split: FP32, or quantized as saved by `pegq qat`."""
    from .api import evaluate
    from .pipeline import dev_loader, load_task_and_model
    from .qat import is_quantized_checkpoint, load_task_and_quantized

    def job():
        load = load_task_and_quantized if is_quantized_checkpoint(model) else load_task_and_model
        t, m, tok = load(model, task, data_dir,
                         **_task_kwargs(train_csv, dev_csv, text_columns, label_column, num_labels))
        s = evaluate(m, dev_loader(t, tok, max_examples=max_eval_examples), t.spec, progress=not quiet)
        if json_out:
            print(json.dumps(s, indent=2))
        else:
            console.print(f"{t.spec.name}: {s['metric']} = {s['score']:.2f}")

    _run(job)


_EST_SHORT = {"current_minmax": "minmax", "running_minmax": "running", "mse": "mse"}


def _short_settings(q) -> str:
    if not q.enabled:
        return "off"
    return f"{q.bits}b {'sym' if q.symmetric else 'asym'} {q.granularity.describe()} {_EST_SHORT[q.estimator.kind]}"


@app.command("list-quantizers")
def list_quantizers(
    model: ModelOpt,
    preset: Annotated[
        str | None, typer.Option("--preset", "-p", help="Show each quantizer's settings under this preset.")
    ] = None,
    override: Annotated[list[str] | None, typer.Option("--override", help="PATTERN=TOKENS, repeatable.")] = None,
    pattern: Annotated[str | None, typer.Option("--filter", help="Glob over names, e.g. '*.ffn.*'.")] = None,
    num_labels: Annotated[int, typer.Option(help="Classes of the classification head (1 = regression).")] = 2,
):
    """Print every quantizer's stable name (Figure 1 of the paper) and its settings."""
    import fnmatch

    from rich.table import Table

    from .api import quantize
    from .config import resolve_config
    from .models import describe_quantizers, load_model, wrap

    def job():
        cfg = resolve_config(preset).with_overrides(list(override or [])) if preset else None
        m, _ = load_model(model, num_labels=num_labels)
        qm = quantize(m, cfg) if cfg else wrap(m)
        rows = describe_quantizers(qm)
        t = Table(title=f"{Path(model).name}: {qm.family}, {qm.num_layers} layers, d={qm.hidden_size}")
        t.add_column("name", no_wrap=True, min_width=max(len(r["name"]) for r in rows))
        for c in ("kind", "shape", "settings"):
            t.add_column(c, overflow="fold")
        shown = 0
        for r in rows:
            if pattern and not fnmatch.fnmatchcase(r["name"], pattern):
                continue
            shown += 1
            t.add_row(r["name"], "act" if r["kind"] == "activation" else r["kind"],
                      "x".join(map(str, r.get("shape") or ())), _short_settings(qm.quantizers[r["name"]]))
        console.print(t)
        n_a = sum(r["kind"] == "activation" for r in rows)
        console.print(f"{len(rows)} quantizers: {n_a} activation, {len(rows) - n_a} weight ({shown} shown)")

    _run(job)


@app.command()
def analyze(
    model: ModelOpt,
    task: TaskOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for stats.json, figures and report.html.")],
    num_sequences: Annotated[int, typer.Option("--num-sequences", "-n", help="First N dev sequences.")] = 64,
    layer: Annotated[int | None, typer.Option(help="Layer of the per-token and attention figures.")] = None,
    head: Annotated[int | None, typer.Option(help="Head of the attention figures.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    data_dir: DataDirOpt = None,
    train_csv: TrainCsv = None,
    dev_csv: DevCsv = None,
    text_columns: TextCols = None,
    label_column: LabelCol = None,
    num_labels: NumLabels = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
):
    """Outlier diagnosis of the FP32 model (paper section 3): statistics, figures and an HTML report."""
    from .analysis import run_analysis
    from .data import load_task

    def job():
        t = load_task(task, data_dir=data_dir,
                      **_task_kwargs(train_csv, dev_csv, text_columns, label_column, num_labels))
        dev = t.dev[:num_sequences]
        sentences = list(dev.text_a) if dev.text_b is None else list(zip(dev.text_a, dev.text_b, strict=True))
        res = run_analysis(model, None, sentences, output, num_sequences=num_sequences, layer=layer,
                           head=head, batch_size=batch_size, overwrite=overwrite, console=not quiet,
                           progress=not quiet)
        console.print(f"report -> {res['files']['report']}")

    _run(job)


@app.command()
def demo(
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for results.json.")] = "runs/demo",
    epochs: Annotated[float, typer.Option(help="Fine-tuning epochs if no cached checkpoint exists.")] = 3.0,
    preset: Annotated[list[str] | None, typer.Option("--preset", "-p", help="Presets to run (repeatable).")] = None,
    quiet: Quiet = False,
):
    """The main job on the embedded default: fine-tune real MiniLM on rotten_tomatoes (cached), then
    score FP32 against each quantization preset."""
    from .demo import DEFAULT_PRESETS, run_demo

    _run(run_demo, output, tuple(preset) if preset else DEFAULT_PRESETS, epochs, not quiet)


@app.command()
def presets():
    """List the named presets."""
    from rich.table import Table

    from .config import PRESETS, get_preset

    t = Table(title="pegq presets")
    t.add_column("name")
    t.add_column("description")
    for n in PRESETS:
        t.add_row(n, get_preset(n).description)
    console.print(t)


# `pegq export onnx|packed` lives in src/pegq/export/cli.py
from .export.cli import export_app  # noqa: E402

app.add_typer(export_app, name="export")


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="pegq")
    except SystemExit as e:
        if e.code not in (0, None):
            sys.exit(e.code)


if __name__ == "__main__":
    main()
