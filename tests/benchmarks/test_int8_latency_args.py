"""benchmarks/int8_latency.py: --skip-eval names rows exactly, including names that hold commas; --onnx
rows need LABEL=PATH with an existing file."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("int8_latency", ROOT / "benchmarks" / "int8_latency.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod


ROWS = ["PyTorch FP32", "PyTorch bf16", "ORT static int8", "pegq peg-gemm (ORT)", "pegq peg-gemm (ORT, uint8 weights)"]


def test_exact_name_with_comma(bench):
    got = bench.skipped_variants(["PyTorch bf16", "pegq peg-gemm (ORT, uint8 weights)"], ROWS)
    assert got == {"PyTorch bf16", "pegq peg-gemm (ORT, uint8 weights)"}


def test_comma_list_still_accepted(bench):
    assert bench.skipped_variants(["PyTorch bf16,ORT static int8"], ROWS) == {"PyTorch bf16", "ORT static int8"}
    assert bench.skipped_variants([], ROWS) == set()


def test_unknown_name_is_one_line_error(bench):
    with pytest.raises(SystemExit, match="no variant named 'PyTorch bf17'"):
        bench.skipped_variants(["PyTorch bf17"], ROWS)


def test_bad_extra_onnx_is_one_line_error(bench, tmp_path):
    for item in ("no-equals-sign", f"row={tmp_path / 'missing.onnx'}", f" ={tmp_path}"):
        with pytest.raises(SystemExit, match="expected LABEL=PATH with an existing .onnx file"):
            bench.main(["--onnx", item])
