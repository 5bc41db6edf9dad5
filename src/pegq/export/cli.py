"""``pegq export``: the typer sub-app (``onnx``, ``packed``); each command is a thin layer over
:mod:`pegq.export.jobs`. The shared error handling (one line on stderr, exit status 2) is
:func:`pegq.cli._run`, imported when a command runs (this module is imported by ``pegq.cli``)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

export_app = typer.Typer(
    name="export",
    help="Real int8 execution: QDQ ONNX for ONNX Runtime (PEG rewritten into per-tensor ops), packed checkpoints.",
    no_args_is_help=True,
)

_MODEL = Annotated[str, typer.Option("--model", "-m", help="Fine-tuned checkpoint folder, or a pegq packed / "
                                     "quantized checkpoint (already calibrated).")]
_TASK = Annotated[str, typer.Option("--task", "-t", help="Task for calibration data and the checks "
                                    "(rotten_tomatoes, a GLUE task with --data-dir).")]
_PRESET = Annotated[str | None, typer.Option("--preset", "-p", "--config", help="Preset name or JSON/YAML config "
                                             "(default w8a8; e.g. peg-ptq, mp-ptq).")]
_OVERRIDE = Annotated[list[str] | None, typer.Option("--override", help="PATTERN=TOKENS, repeatable.")]
_DATA_DIR = Annotated[str | None, typer.Option("--data-dir", help="GLUE TSV folder or a save_to_disk folder.")]
_OVERWRITE = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
_QUIET = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
_JSON = Annotated[bool, typer.Option("--json", help="Print the JSON report instead of a table.")]


@export_app.command("onnx")
def onnx_cmd(
    model: _MODEL,
    output: Annotated[str, typer.Option("--output", "-o", help="The .onnx file to write (a .json report goes "
                                        "next to it).")],
    task: _TASK = "rotten_tomatoes",
    preset: _PRESET = None,
    override: _OVERRIDE = None,
    weight_dtype: Annotated[str, typer.Option(
        "--weight-dtype", help="int8 (standard, fastest), uint8 (zero-point 128: bit-exact on x86 CPUs "
        "without VNNI, where ORT's int8 x uint8 kernel can saturate), auto (uint8 only for the PEG "
        "groups' split matmuls, which saturate most) or exact (uint8 only for the weights with a pair of "
        "adjacent inputs that can saturate, |q0 + q1| > 128; all int8 after pegq ptq --gptq-pair-limit 128)."
        )] = "int8",
    eval_: Annotated[bool, typer.Option("--eval", help="Score ORT and the simulated model on the dev split.")] = False,
    max_eval_examples: Annotated[int | None, typer.Option(help="Score only the first N dev examples.")] = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads for the checks.")] = 2,
    data_dir: _DATA_DIR = None,
    overwrite: _OVERWRITE = False,
    quiet: _QUIET = False,
    json_out: _JSON = False,
):
    """QDQ ONNX model of the quantized checkpoint for ONNX Runtime's int8 kernels (PEG rewritten into
    per-tensor ops, 16-bit activations as int16 QDQ); checks kernels and per-tensor parity."""
    from ..cli import _run, console
    from .jobs import onnx_table, run_export_onnx

    def job():
        info = run_export_onnx(model, output, task, preset, override, weight_dtype, eval_, max_eval_examples,
                               data_dir, overwrite, not quiet, threads)
        if json_out:
            print(json.dumps(info, indent=2, default=str))
        else:
            console.print(onnx_table(info))

    _run(job)


@export_app.command("packed")
def packed_cmd(
    model: _MODEL,
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for the packed checkpoint.")],
    task: _TASK = "rotten_tomatoes",
    preset: _PRESET = None,
    override: _OVERRIDE = None,
    data_dir: _DATA_DIR = None,
    overwrite: _OVERWRITE = False,
    quiet: _QUIET = False,
    json_out: _JSON = False,
):
    """Packed checkpoint: weights at their bit-width (int8, int4 two per byte, int2 four per byte) with
    scales/zero-points in safetensors; reloads into outputs identical to the simulated model."""
    from ..cli import _run, console
    from .jobs import packed_table, run_export_packed

    def job():
        info = run_export_packed(model, output, task, preset, override, data_dir, overwrite, not quiet)
        if json_out:
            print(json.dumps(info, indent=2, default=str))
        else:
            console.print(packed_table(info))

    _run(job)
