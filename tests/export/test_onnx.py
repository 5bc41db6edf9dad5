"""QDQ ONNX export run by ONNX Runtime's int8 kernels: per-tensor parity with the simulated model, 16-bit and
low-bit types, every family, and unsupported inputs refused with the reason."""

from __future__ import annotations

import re

import pytest
import torch
from export_helpers import peg_tiny

import pegq
from pegq.export.onnx import (
    ExportError,
    export_onnx,
    feeds,
    kernel_report,
    metadata,
    per_tensor_parity,
    prepare,
    session,
)


def test_minilm_peg_export_runs_int8_kernels_and_matches_per_tensor(minilm_peg, minilm_peg_onnx):
    qm, _, batch = minilm_peg
    _, info = minilm_peg_onnx
    path = info["path"]
    assert info["peg_layers"] == 6
    assert info["quantizers"] == {"activation:uint8": 173, "weight:uint8": 71}
    assert info["folds"]["split_concat"] == 6 and info["folds"]["sum"] == 6  # group DQ feeds its MatMul
    meta = metadata(path)
    assert meta["pegq.peg_rewrite"]["encoder.layer.0.ffn"] == {"layer": 0, "groups": 6, "sizes": [64] * 6,
                                                                "permuted": True}
    q = meta["pegq.quantizers"]["encoder.layer.4.ffn.residual_sum.g5"]
    assert q["dtype"] == "uint8" and q["scale"] > 0

    rep = kernel_report(path)
    # every encoder matmul runs an int8 kernel: per layer Q, K, V, output, 6 FFN-input groups, FFN output,
    # plus the two attention matmuls; only the 2-D pooler/classifier Gemms stay float
    assert rep["int8_kernels"] == 6 * (4 + 6 + 1 + 2)
    assert rep["ops"].get("MatMul", 0) == 0

    par = per_tensor_parity(prepare(qm), path, batch)
    assert par["missing"] == []
    assert len(par["tensors"]) == 173
    assert par["max_steps"] <= 1, {n: r for n, r in par["tensors"].items() if r["max_steps"] > 1}
    assert par["weight_max_steps"] == 0
    assert par["forced_output_max_abs_diff"] <= 1e-5
    out = session(path).run(None, {k: v.numpy() for k, v in batch.items()})[0]
    assert out.shape == (3, 2) and torch.isfinite(torch.from_numpy(out)).all()


@pytest.mark.slow
def test_minilm_int8_weights(minilm_peg, tmp_path):
    """Default int8 weights: ORT's uint8 x int8 kernel; on x86 CPUs without VNNI it can saturate a pair
    of products (rare elements), so only almost every element is required to be within one step."""
    qm, _, batch = minilm_peg
    info = export_onnx(qm, tmp_path / "peg.onnx")
    assert info["quantizers"] == {"activation:uint8": 173, "weight:int8": 71}
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["weight_max_steps"] == 0
    assert all(r["frac_diff"] <= 0.01 for r in par["tensors"].values()), par["tensors"]


@pytest.mark.parametrize("family", ["bert", "roberta", "mpnet", "distilbert", "mobilebert"])
def test_families_export_parity(family, tmp_path, one_thread):
    qm, batch = peg_tiny(family, head=True)
    info = export_onnx(qm, tmp_path / f"{family}.onnx", weight_dtype="uint8")
    assert info["peg_layers"] == qm.num_layers
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["missing"] == [] and par["weight_max_steps"] == 0
    assert par["max_steps"] <= 1, par["tensors"]
    assert par["forced_output_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("family", ["bert", "mobilebert"])
def test_outlier_group_export_parity(family, tmp_path, one_thread):
    """PEG with an outlier group (peg2po4) exports as a 2-way split of unequal widths, each part on an
    int8 kernel, and matches the simulated model per tensor."""
    qm, batch = peg_tiny(family, head=True, token="peg2po4")
    info = export_onnx(qm, tmp_path / f"{family}.onnx", weight_dtype="uint8")
    blocks = metadata(info["path"])["pegq.peg_rewrite"]
    assert blocks and all(len(v["sizes"]) == 2 and v["sizes"][1] == 4 for v in blocks.values())
    assert info["folds"]["split_concat"] == len(blocks)
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["missing"] == [] and par["weight_max_steps"] == 0
    assert par["max_steps"] <= 1, par["tensors"]
    assert par["forced_output_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("family", ["bert", "distilbert", "mobilebert"])
def test_hidden_outlier_split_export_parity(family, tmp_path, one_thread):
    """PEG with an outlier group on the FFN hidden activation exports as a bulk int8 matmul plus an int8
    matmul on the gathered outlier columns, and matches the simulated model per tensor."""
    qm, batch = peg_tiny(family, head=True, extra=["encoder.layer.*intermediate=peg2po4"])
    info = export_onnx(qm, tmp_path / f"{family}.onnx", weight_dtype="auto")
    meta = metadata(info["path"])
    hidden = {k: v for k, v in meta["pegq.peg_rewrite"].items() if k.endswith("intermediate")}
    assert hidden and all(v["sizes"][1] == 4 and v["outlier_split"] for v in hidden.values())
    # auto: uint8 storage exactly for the split Linears' weights
    wq = {k: v["dtype"] for k, v in meta["pegq.quantizers"].items() if v["kind"] == "weight"}
    assert {k for k, v in wq.items() if v == "uint8"} == {k for k in wq if re.search(r"\.g\d+\.weight$", k)}
    assert any(v == "int8" for v in wq.values())
    # parity on uint8 weights: bit-exact on every x86 CPU (the auto file's int8 x uint8 matmuls saturate
    # rare pairs of products on CPUs without AVX-512 VNNI, e.g. an AVX2-only CI machine)
    exact = export_onnx(qm, tmp_path / f"{family}-u8.onnx", weight_dtype="uint8")
    par = per_tensor_parity(prepare(qm), exact["path"], batch)
    assert par["missing"] == [] and par["weight_max_steps"] == 0
    assert par["max_steps"] <= 1, par["tensors"]
    assert par["forced_output_max_abs_diff"] <= 1e-5


def _tiny(preset: str, overrides=(), head=True):
    from models_helpers import pad_id_of, padded_batch, tiny_model

    m = tiny_model("bert", head)
    qm = pegq.quantize(m, preset, overrides=list(overrides))
    pegq.calibrate(qm, [padded_batch(pad_id_of(m), seed=1)], progress=False)
    return qm, padded_batch(pad_id_of(m), seed=2)


def test_mixed_precision_16_bit_activations(tmp_path, one_thread):
    qm, batch = _tiny("mp-ptq")
    info = export_onnx(qm, tmp_path / "mp.onnx", weight_dtype="uint8")
    # FFN input, output, residual sum of 2 layers + pooler + logits: 16-bit
    assert info["quantizers"]["activation:uint16"] == 8
    meta = metadata(info["path"])["pegq.quantizers"]
    assert meta["encoder.layer.1.ffn.residual_sum"]["dtype"] == "uint16"
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["max_steps"] <= 1 and par["forced_output_max_abs_diff"] <= 1e-5


def test_low_bit_weights_stored_as_int4(tmp_path, one_thread):
    qm, batch = _tiny("w8a8", ["*.weight=w4", "embeddings.word.weight=w2"])
    info = export_onnx(qm, tmp_path / "w4.onnx")
    assert info["quantizers"]["weight:int4"] == sum(q.enabled for q in qm.weight_quantizers().values())
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["weight_max_steps"] == 0 and par["max_steps"] <= 1


def test_per_channel_weights(tmp_path, one_thread):
    qm, batch = _tiny("w8a8", ["encoder.*.weight=channel0"])
    info = export_onnx(qm, tmp_path / "pc.onnx", weight_dtype="uint8")
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["weight_max_steps"] == 0 and par["max_steps"] <= 1


@pytest.mark.parametrize("gran,folded", [("channel1", True), ("channel0", False)])
def test_per_channel_embedding_tables(gran, folded, tmp_path, one_thread):
    """Embedding tables with one scale per embedding dim are looked up as int8 rows and dequantized after
    the Gather (per-axis on the last axis); per-row tables keep Gather(DQ(table)). Both match."""
    import onnx

    qm, batch = _tiny("w8a8", [f"embeddings.*.weight={gran}"])
    info = export_onnx(qm, tmp_path / "emb.onnx", weight_dtype="uint8")
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["weight_max_steps"] == 0 and par["max_steps"] <= 1
    graph = onnx.load(info["path"]).graph
    inits = {i.name for i in graph.initializer}
    gathers_on_int_tables = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                             and any(i.name == n.input[0] and i.data_type == onnx.TensorProto.UINT8
                                     for i in graph.initializer)]
    assert (len(gathers_on_int_tables) >= 2) == folded, [n.name for n in gathers_on_int_tables]


def test_export_leaves_the_simulated_model_alone(tmp_path, one_thread):
    qm, batch = peg_tiny("roberta")
    with torch.no_grad():
        before = qm(**batch).logits
    export_onnx(qm, tmp_path / "r.onnx")
    with torch.no_grad():
        assert torch.equal(qm(**batch).logits, before)
    assert "encoder.layer.0.ffn.residual_sum" in qm.quantizers


# --------------------------------------------------------------------------- refused inputs


def test_peg_outside_the_ffn_says_why(tmp_path, one_thread):
    qm, _ = peg_tiny("bert", extra=["encoder.layer.0.attn.output=peg4"])
    with pytest.raises(ExportError, match=r"encoder\.layer\.0\.attn\.output: PEG is only rewritable.*FFN"):
        export_onnx(qm, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_4_bit_activations_say_why(tmp_path, one_thread):
    qm, _ = _tiny("w8a8", ["encoder.layer.0.attn.query=a4"])
    with pytest.raises(ExportError, match=r"attn\.query: 4-bit activations.*8- and 16-bit"):
        export_onnx(qm, tmp_path / "x.onnx")


def test_per_embedding_activations_say_why(tmp_path, one_thread):
    qm, _ = _tiny("w8a8", ["encoder.layer.1.ffn.layernorm=emb"])
    with pytest.raises(ExportError, match=r"ffn\.layernorm: embedding activations are not per-tensor"):
        export_onnx(qm, tmp_path / "x.onnx")


def test_uncalibrated_model_says_why(tmp_path, one_thread):
    from models_helpers import tiny_model

    qm = pegq.quantize(tiny_model("bert", True), "w8a8")
    with pytest.raises(ExportError, match="calibrate"):
        export_onnx(qm, tmp_path / "x.onnx")


def test_plain_model_says_why(tmp_path, one_thread):
    from models_helpers import tiny_model

    with pytest.raises(ExportError, match="QuantizedModel"):
        export_onnx(tiny_model("bert", True), tmp_path / "x.onnx")


def test_unknown_weight_dtype(tmp_path, one_thread):
    qm, _ = _tiny("w8a8")
    with pytest.raises(ExportError, match="weight_dtype"):
        export_onnx(qm, tmp_path / "x.onnx", weight_dtype="int4")


# --------------------------------------------------------------------------- int8 deployment presets


def test_minilm_peg_gemm_quantizes_only_matmul_inputs_and_matches(minilm, tmp_path):
    """``peg-gemm``: activations quantized only where a matmul consumes them, PEG on the FFN input; the
    export keeps every encoder matmul on int8 kernels and reproduces the simulated model per tensor."""
    import copy

    model, tok = minilm
    calib = ["a gorgeous, witty, seductive movie.", "the story is predictable and the characters are thin.",
             "it's a charming and often affecting journey.", "unfunny and lame."]
    qm = pegq.quantize(copy.deepcopy(model), "peg-gemm")
    acts = {n for n, q in qm.activation_quantizers().items() if q.enabled}
    per_layer = ("attn.query", "attn.key", "attn.value", "attn.probs", "attn.context", "attn.layernorm",
                 "ffn.intermediate", "ffn.layernorm")
    assert acts == {"embeddings.layernorm", "pooler"} | {f"encoder.layer.{i}.{s}" for i in range(6)
                                                          for s in per_layer}
    assert qm.quantizers["encoder.layer.3.attn.layernorm"].granularity.kind == "peg"
    w = qm.quantizers["encoder.layer.3.ffn.output.weight"]
    assert w.granularity.kind == "tensor" and w.estimator.kind == "mse"
    pegq.calibrate(qm, [dict(tok(calib, padding=True, return_tensors="pt"))], progress=False)
    info = export_onnx(qm, tmp_path / "peg-gemm.onnx", weight_dtype="uint8")
    assert info["peg_layers"] == 6
    # per layer: Q, K, V, attention output, 6 FFN-input groups, FFN output, the 2 attention matmuls
    assert kernel_report(info["path"])["int8_kernels"] == 6 * (4 + 6 + 1 + 2)
    batch = dict(tok(["dull", "an utterly charming and hilarious film"], padding=True, return_tensors="pt"))
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["missing"] == [] and par["weight_max_steps"] == 0
    assert par["max_steps"] <= 1, {n: r for n, r in par["tensors"].items() if r["max_steps"] > 1}
    assert par["forced_output_max_abs_diff"] <= 1e-5


def test_minilm_peg_outlier_gemm_export_matches(minilm, tmp_path):
    """``peg-outlier-gemm`` on the real MiniLM: the 16 widest-range dims of the FFN input and of the FFN hidden
    activation get their own range; the export runs every part of both FFN Linears on int8 kernels and
    matches per tensor."""
    import copy

    model, tok = minilm
    calib = ["a gorgeous, witty, seductive movie.", "the story is predictable and the characters are thin.",
             "it's a charming and often affecting journey.", "unfunny and lame."]
    qm = pegq.quantize(copy.deepcopy(model), "peg-outlier-gemm")
    pegq.calibrate(qm, [dict(tok(calib, padding=True, return_tensors="pt"))], progress=False)
    q = qm.quantizers["encoder.layer.2.ffn.intermediate"]
    assert q.granularity.sizes(1536) == [1520, 16]
    assert q.scale[1] > 2 * q.scale[0]  # the outlier group's range is the wider one
    info = export_onnx(qm, tmp_path / "peg-outlier-gemm.onnx", weight_dtype="auto")
    # per layer: Q, K, V, attention output, FFN input and FFN hidden (each bulk + outliers), the 2 attention
    # matmuls
    assert kernel_report(info["path"])["int8_kernels"] == 6 * (4 + 2 + 2 + 2)
    assert qm.quantizers["encoder.layer.2.attn.layernorm"].granularity.sizes(384) == [368, 16]
    batch = dict(tok(["dull", "an utterly charming and hilarious film"], padding=True, return_tensors="pt"))
    # parity on uint8 weights (bit-exact on every x86 CPU; see test_hidden_outlier_split_export_parity)
    exact = export_onnx(qm, tmp_path / "peg-outlier-gemm-u8.onnx", weight_dtype="uint8")
    par = per_tensor_parity(prepare(qm), exact["path"], batch)
    assert par["missing"] == [] and par["weight_max_steps"] == 0
    assert par["tensors"]["encoder.layer.2.ffn.intermediate.g1"]["max_steps"] <= 1
    assert all(r["frac_diff"] <= 0.01 for r in par["tensors"].values()), par["tensors"]
    assert par["forced_output_max_abs_diff"] <= 1e-4
    # the embedding tables (one scale per embedding dim) are looked up as integers, dequantized afterwards
    assert exact["folds"]["gather"] == 3


@pytest.mark.parametrize("family", ["bert", "roberta", "mpnet", "distilbert", "mobilebert"])
@pytest.mark.parametrize("preset", ["peg-gemm", "peg-outlier-gemm"])
def test_deployment_presets_resolve_and_rewrite_on_every_family(family, preset, one_thread):
    from models_helpers import pad_id_of, padded_batch, tiny_model

    from pegq.export.rewrite import OutlierSplitLinear

    m = tiny_model(family, True)
    # d=16: K=4 groups / a 4-dim outlier group on the FFN input (the presets' K=6 / 16 need a wider model)
    extra = ["encoder.layer.*.attn.layernorm=" + ("peg4p" if preset == "peg-gemm" else "peg2po4")]
    qm = pegq.quantize(m, preset, overrides=extra)
    if preset == "peg-outlier-gemm":
        hidden = [n for n, q in qm.activation_quantizers().items() if n.endswith("intermediate")]
        assert hidden and all(qm.quantizers[n].granularity.outliers == 16 for n in hidden)
        assert qm.quantizers["encoder.layer.0.attn.query.weight"].granularity.kind == "channel"
    names = [n for n, q in qm.activation_quantizers().items() if q.enabled]
    assert not any(n.endswith(("residual_sum", ".ffn.output", ".attn.scores")) for n in names), names
    pegq.calibrate(qm, [padded_batch(pad_id_of(m), seed=1)], progress=False)
    batch = padded_batch(pad_id_of(m), seed=2)
    rewritten = prepare(qm)  # refuses anything without a per-tensor form
    assert all(q.granularity.kind in ("tensor", "channel") for q in rewritten.quantizers.values() if q.enabled)
    if preset == "peg-outlier-gemm":
        assert len([x for x in rewritten.modules() if isinstance(x, OutlierSplitLinear)]) == len(hidden)
    with torch.no_grad():
        a, b = qm(**batch).logits, rewritten(**batch).logits
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("family", ["bert", "mpnet", "mobilebert"])
def test_gptq_rounded_weights_export_and_pack(family, tmp_path, one_thread):
    """GPTQ-rounded weights (integers that are not round-to-nearest, some several steps away) survive the
    PEG rewrite (row permutation, column splits, the outlier split's zeroed columns), the ONNX export and
    the packed round trip: the integer weights in the graph are the simulated ones."""
    from models_helpers import pad_id_of, padded_batch

    from pegq.export.packed import load_packed, save_packed
    from pegq.gptq_model import GPTQRun, gptq_model

    qm, batch = peg_tiny(family, head=True, token="peg2po4",
                         extra=["encoder.layer.*intermediate=peg2po4", "encoder.layer.*.weight=channel"])
    pad = pad_id_of(qm.model)
    info = gptq_model(qm, [padded_batch(pad, seed=s) for s in range(10, 16)], GPTQRun(num_samples=18), progress=False)
    assert all(i["proxy_gptq"] <= i["proxy_nearest"] * (1 + 1e-9) for i in info["per_layer"].values())
    assert sum(i["changed_vs_nearest"] > 0 for i in info["per_layer"].values()) > info["layers"] // 2
    out = export_onnx(qm, tmp_path / f"{family}.onnx", weight_dtype="uint8")  # bit-exact on every x86 CPU
    par = per_tensor_parity(prepare(qm), out["path"], batch)
    assert par["missing"] == [] and par["weight_max_steps"] == 0
    assert par["max_steps"] <= 1, par["tensors"]
    assert par["forced_output_max_abs_diff"] <= 1e-5
    save_packed(qm, tmp_path / "p")
    loaded, _ = load_packed(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(qm(**batch).logits, loaded(**batch).logits)


@pytest.mark.parametrize("shift", [False, True], ids=["sq", "sq+shift"])
@pytest.mark.parametrize("family", ["bert", "roberta", "mpnet", "distilbert", "mobilebert"])
def test_smoothed_layernorm_outputs_export_on_every_family(family, shift, tmp_path, one_thread):
    """``sq-gemm``: every smoothed LayerNorm output is ``Mul(1/s)`` + one per-tensor QuantizeLinear whose codes
    feed the matmuls of the Linears reading it through a per-tensor DequantizeLinear (the column scales cancel
    against the weights W diag(s)); the float residual sum reads ``Div(1/s)`` of it. ORT matches per tensor.
    With ``shift`` (each dim centred first), the readers' biases carry ``W z`` instead."""
    import onnx
    from models_helpers import pad_id_of, padded_batch, tiny_model

    m = tiny_model(family, True)
    extra = ["*layernorm=shift,optional"] if shift else []
    qm = pegq.quantize(m, "sq-gemm", overrides=["encoder.layer.*intermediate=peg2po4", *extra])  # d_ff of tiny: 37
    if shift:
        assert [n for n, q in qm.activation_quantizers().items() if q.smooth_shift]
    pegq.calibrate(qm, [padded_batch(pad_id_of(m), seed=1)], progress=False)
    smoothed_w = [n for n, q in qm.weight_quantizers().items() if q.smooth is not None]
    assert smoothed_w, "no Linear weight was smoothed"
    info = export_onnx(qm, tmp_path / f"{family}.onnx", weight_dtype="uint8")
    assert info["folds"]["smooth"] == len(smoothed_w) and info["folds"]["smooth_left"] == 0
    graph = onnx.load(info["path"]).graph
    assert not [n for n in graph.node if n.name.endswith("/SmoothMul")]
    # every int8 matmul input is a per-tensor DequantizeLinear, never the Div that restores the scale
    by_out = {o: n for n in graph.node for o in n.output}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[0] in by_out
                and by_out[n.input[0]].name.endswith("/SmoothOut") and n.input[1] in by_out
                and by_out[n.input[1]].op_type in ("DequantizeLinear", "Transpose")]
    shifted = [n for n, q in qm.activation_quantizers().items() if q.shift is not None]
    assert bool(shifted) == shift
    assert len([n for n in graph.node if n.name.endswith("/ShiftIn")]) == len(shifted)  # (ShiftOut: if read)
    assert len([i for i in graph.initializer if i.name.endswith(".shifted_bias")]) == (len(smoothed_w) if shift else 0)
    batch = padded_batch(pad_id_of(m), seed=2)
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["missing"] == [] and par["weight_max_steps"] == 0
    assert par["max_steps"] <= 1, par["tensors"]
    assert par["forced_output_max_abs_diff"] <= 1e-5


def _minilm_calibrated(minilm, preset: str, overrides: list[str] | None = None):
    """A copy of the real MiniLM with ``preset`` (+ ``overrides``), calibrated on four review sentences;
    ``(qm, tokenizer)``."""
    import copy

    model, tok = minilm
    calib = ["a gorgeous, witty, seductive movie.", "the story is predictable and the characters are thin.",
             "it's a charming and often affecting journey.", "unfunny and lame."]
    qm = pegq.quantize(copy.deepcopy(model), preset, overrides=overrides)
    pegq.calibrate(qm, [dict(tok(calib, padding=True, return_tensors="pt"))], progress=False)
    return qm, tok


def test_minilm_sq_gemm_runs_every_linear_on_int8_kernels(minilm, tmp_path):
    """The real MiniLM with ``sq-gemm``: Q/K/V and the first FFN Linear read smoothed per-tensor codes; per
    layer 9 int8 matmuls (Q, K, V, attention output, FFN input, FFN hidden bulk + outliers, the two attention
    matmuls), one fewer than ``peg-outlier-gemm``; per-tensor parity on uint8 weights."""
    qm, tok = _minilm_calibrated(minilm, "sq-gemm")
    exact = export_onnx(qm, tmp_path / "sq-gemm-u8.onnx", weight_dtype="uint8")
    assert exact["folds"]["smooth"] == 6 * 4 and exact["folds"]["smooth_left"] == 0
    assert kernel_report(exact["path"])["int8_kernels"] == 6 * 9
    batch = dict(tok(["dull", "an utterly charming and hilarious film"], padding=True, return_tensors="pt"))
    par = per_tensor_parity(prepare(qm), exact["path"], batch)
    assert par["missing"] == [] and par["weight_max_steps"] == 0
    assert par["tensors"]["encoder.layer.2.attn.layernorm"]["max_steps"] <= 1
    assert all(r["frac_diff"] <= 0.01 for r in par["tensors"].values()), par["tensors"]
    assert par["forced_output_max_abs_diff"] <= 1e-4
    meta = metadata(exact["path"])["pegq.quantizers"]
    assert meta["encoder.layer.2.attn.layernorm"]["smoothed"] and meta["encoder.layer.3.attn.query.weight"]["smoothed"]


def test_smoothing_inside_a_peg_split_ffn_block_says_why(tmp_path, one_thread):
    """A smoothed FFN input puts column scales on the first FFN Linear; PEG on that block's output would split
    the Linear by rows and columns, which the rewrite cannot do with the scales: refused, nothing written."""
    qm, _ = _tiny("w8a8", ["encoder.layer.0.attn.layernorm=sq0.5", "encoder.layer.0.ffn.output=peg4p"])
    assert qm.quantizers["encoder.layer.0.ffn.intermediate.weight"].smooth is not None
    with pytest.raises(ExportError, match=r"encoder\.layer\.0\.ffn\.intermediate\.weight: smoothed weights.*not both"):
        export_onnx(qm, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_minilm_sq_token_gemm_runs_per_token_codes_on_int8_kernels(minilm, tmp_path):
    """The real MiniLM with ``sq-token-gemm``: every encoder Linear reads uint8 codes quantized per token at run
    time (ReduceMin/ReduceMax per row), through an integer matmul ORT fuses into ``MatMulIntegerToFloat`` with a
    per-row scale, plus the rank-1 zero-point term; per-tensor parity (teacher-forced: ORT's per-row codes against
    what each quantizer makes of its own input) and the free-running logits match the simulation."""
    import onnx

    qm, tok = _minilm_calibrated(minilm, "sq-token-gemm")
    info = export_onnx(qm, tmp_path / "sq-token.onnx", weight_dtype="uint8")
    assert info["folds"]["token_matmul"] == 6 * 6 and info["folds"]["token_matmul_left"] == 0
    assert info["folds"]["smooth"] == 6 * 4 and info["folds"]["smooth_left"] == 0
    graph = onnx.load(info["path"]).graph
    assert not [n for n in graph.node if n.op_type == "MatMul" and "ffn" in n.name and "attention" not in n.name]
    assert len([n for n in graph.node if n.op_type == "ReduceMin"]) == 6 * 4 + 1  # LN outputs x2, context, hidden
    assert kernel_report(info["path"])["int8_kernels"] == 6 * 8
    meta = metadata(info["path"])["pegq.quantizers"]
    assert meta["encoder.layer.1.ffn.intermediate"]["granularity"] == "token"
    assert meta["encoder.layer.1.ffn.intermediate"]["scale"] is None
    batch = dict(tok(["dull", "an utterly charming and hilarious film that reaches for the stars"], padding=True,
                     return_tensors="pt"))
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["missing"] == [] and par["weight_max_steps"] == 0
    token = [n for n, v in meta.items() if v.get("granularity") == "token"]
    assert len(token) == 6 * 4 + 1
    assert max(par["tensors"][n]["max_steps"] for n in token) <= 1, par["tensors"]
    assert all(r["frac_diff"] <= 0.01 for r in par["tensors"].values()), par["tensors"]
    assert par["forced_output_max_abs_diff"] <= 1e-4
    assert par["output_max_abs_diff"] <= 0.05


def test_minilm_constant_zero_point_per_token_rows_need_no_zero_point_term(minilm, tmp_path):
    """The real MiniLM with ``sq-token-zp-gemm``: the LayerNorm outputs (Q/K/V and FFN inputs) are symmetric per
    token, stored as uint8 + 128, and the FFN hidden activation's rows share the zero-point 64 (no per-row min), so
    the integer matmuls reading them subtract that one zero-point and need no rank-1 term (only the context readers
    keep one; the context's codes come from one per-axis ``QuantizeLinear``). Their bias ``Add`` stays out of ORT's
    ``MatMulIntegerToFloat`` (which would scale it by the row scale): the row scale is a ``Mul`` after the fused
    matmul and the FFN's bias fuses with its Gelu instead. Per-tensor parity and the logits match the simulation."""
    import onnx
    from onnx import helper

    qm, tok = _minilm_calibrated(minilm, "sq-token-zp-gemm")
    info = export_onnx(qm, tmp_path / "sym.onnx", weight_dtype="uint8")
    assert info["folds"]["token_matmul"] == 6 * 7 and info["folds"]["token_matmul_left"] == 0
    graph = onnx.load(info["path"]).graph
    zp_terms = [n.name for n in graph.node if n.name.endswith("/ZeroPointTerm")]
    assert len(zp_terms) == 6 and all("/attention/output/" in n for n in zp_terms), zp_terms
    nodes = {n.name: n for n in graph.node}
    assert "encoder.layer.0.ffn.intermediate/ReduceMin" not in nodes
    assert "encoder.layer.0.attn.context/ReduceMin" in nodes
    assert "encoder.layer.0.attn.context/AddZeroPoint" not in nodes
    per_axis = nodes["encoder.layer.0.attn.context/QuantizeLinear"]
    assert [helper.get_attribute_value(a) for a in per_axis.attribute if a.name == "axis"] == [0]
    meta = metadata(info["path"])["pegq.quantizers"]
    assert meta["encoder.layer.0.attn.layernorm"]["symmetric"] and meta["encoder.layer.0.attn.layernorm"]["code_shift"]
    hidden = meta["encoder.layer.0.ffn.intermediate"]
    assert hidden["constant_zero_point"] and hidden["code_shift"] == 0 and not hidden["symmetric"]
    assert not meta["encoder.layer.0.attn.context"]["constant_zero_point"]
    opt = tmp_path / "sym_opt.onnx"
    session(info["path"], optimized_path=opt)
    fused = onnx.load(str(opt)).graph.node
    assert len([n for n in fused if n.op_type == "BiasGelu"]) == 6
    reads_sym = [n for n in fused if n.op_type == "MatMulIntegerToFloat" and n.input[0].endswith("layernorm.q")]
    assert len(reads_sym) == 6 * 4 and all(len(n.input) == 6 for n in reads_sym)  # no fused bias input
    assert kernel_report(info["path"])["int8_kernels"] == 6 * 8
    batch = dict(tok(["dull", "an utterly charming and hilarious film that reaches for the stars"], padding=True,
                     return_tensors="pt"))
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["missing"] == [] and par["weight_max_steps"] == 0
    assert par["max_steps"] <= 1, par["tensors"]
    assert all(r["frac_diff"] <= 0.01 for r in par["tensors"].values()), par["tensors"]
    assert par["forced_output_max_abs_diff"] <= 1e-4
    assert par["output_max_abs_diff"] <= 0.05


def test_minilm_per_token_attention_probs_run_on_int8_kernels(minilm, tmp_path):
    """The real MiniLM with ``sq-token-gemm`` and per-token attention probabilities: each row of the softmax gets its
    own step at run time; the matmul with V (split into heads from its static uint8 codes) becomes an integer matmul
    with a per-row scale, with the zero-point term's column sums of V computed per batch and head. Per-tensor
    parity holds on the probabilities and the logits."""
    import onnx

    qm, tok = _minilm_calibrated(minilm, "sq-token-gemm", ["*.attn.probs=token"])
    info = export_onnx(qm, tmp_path / "probs.onnx", weight_dtype="uint8")
    assert info["folds"]["token_matmul"] == 6 * 7 and info["folds"]["token_matmul_left"] == 0
    graph = onnx.load(info["path"]).graph
    assert not [n for n in graph.node if n.op_type == "MatMul" and "probs" in n.input[0]]  # Q K^T stays QDQ
    producer = {o: n for n in graph.node for o in n.output}
    pv = [n for n in graph.node if n.op_type == "MatMulInteger" and n.input[0].endswith("attn.probs.q")]
    assert len(pv) == 6
    chain, name = [], pv[0].input[1]
    while producer[name].op_type in ("Reshape", "Transpose"):
        chain.append(producer[name].op_type)
        name = producer[name].input[0]
    assert chain == ["Transpose", "Reshape"] and name == "encoder.layer.0.attn.value.q"
    # a softmax output is never negative: lo = 0 and z = 0 in every row, so no ReduceMin, no zero-point term
    assert len([n for n in graph.node if n.op_type == "ReduceMin"]) == 6 * 4 + 1
    assert not [n for n in graph.node if n.op_type == "ReduceSum"]
    assert metadata(info["path"])["pegq.quantizers"]["encoder.layer.0.attn.probs"]["nonneg"]
    assert kernel_report(info["path"])["int8_kernels"] == 6 * 8
    batch = dict(tok(["dull", "an utterly charming and hilarious film that reaches for the stars"], padding=True,
                     return_tensors="pt"))
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["missing"] == [] and par["weight_max_steps"] == 0
    assert max(par["tensors"][f"encoder.layer.{i}.attn.probs"]["max_steps"] for i in range(6)) <= 1
    assert par["forced_output_max_abs_diff"] <= 1e-4
    assert par["output_max_abs_diff"] <= 0.05


@pytest.mark.parametrize("probs", [False, True], ids=["static-probs", "token-probs"])
@pytest.mark.parametrize("family", ["bert", "roberta", "mpnet", "distilbert", "mobilebert"])
def test_per_token_activations_export_on_every_family(family, probs, tmp_path, one_thread):
    """``sq-token-gemm`` on a random-init model of each family, also with per-token attention probabilities: every
    per-token quantizer's readers become integer matmuls (none left in float; the probabilities' reader is the
    matmul with V in heads), and ORT matches the simulation per tensor."""
    from models_helpers import pad_id_of, padded_batch, tiny_model

    m = tiny_model(family, True)
    qm = pegq.quantize(m, "sq-token-gemm", overrides=["*.attn.probs=token"] if probs else None)
    pegq.calibrate(qm, [padded_batch(pad_id_of(m), seed=1)], progress=False)
    info = export_onnx(qm, tmp_path / f"{family}.onnx", weight_dtype="uint8")
    assert info["folds"]["token_matmul"] > 0 and info["folds"]["token_matmul_left"] == 0, info["folds"]
    par = per_tensor_parity(prepare(qm), info["path"], padded_batch(pad_id_of(m), seed=2))
    assert par["missing"] == [] and par["weight_max_steps"] == 0
    assert par["max_steps"] <= 1, par["tensors"]
    assert par["forced_output_max_abs_diff"] <= 1e-5


def test_per_token_activations_above_8_bits_say_why_not_exportable(tmp_path, one_thread):
    qm, _ = _tiny("w8a8", ["encoder.layer.0.ffn.intermediate=token,sym,16"])
    with pytest.raises(ExportError, match=r"encoder\.layer\.0\.ffn\.intermediate: per-token \(dynamic\) activations "
                                          r"export as uint8 codes only .*use 2-8 bits"):
        export_onnx(qm, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("preset", ["sq-token-sym-gemm", "sq-token-zp-gemm"])
@pytest.mark.parametrize("family", ["bert", "roberta", "mpnet", "distilbert", "mobilebert"])
def test_constant_zero_point_per_token_activations_export_on_every_family(family, preset, tmp_path, one_thread):
    """Per-token quantizers whose rows share one zero-point -- symmetric LayerNorm outputs (``sq-token-sym-gemm``:
    uint8 codes + 128) and, with ``sq-token-zp-gemm``, the FFN hidden activation's fixed zero-point 64 -- on a
    random-init model of each family: their readers are integer matmuls with no zero-point term, and ORT matches
    the simulation per tensor."""
    import onnx
    from models_helpers import pad_id_of, padded_batch, tiny_model

    m = tiny_model(family, True)
    qm = pegq.quantize(m, preset)
    pegq.calibrate(qm, [padded_batch(pad_id_of(m), seed=1)], progress=False)
    token = {n: q for n, q in qm.quantizers.items() if q.enabled and q.granularity.kind == "token"}
    sym = [n for n, q in token.items() if q.symmetric]
    fixed = [n for n, q in token.items() if q.granularity.zero_point is not None]
    assert sym and bool(fixed) == (preset == "sq-token-zp-gemm")
    info = export_onnx(qm, tmp_path / f"{family}.onnx", weight_dtype="uint8")
    assert info["folds"]["token_matmul"] > 0 and info["folds"]["token_matmul_left"] == 0, info["folds"]
    meta = metadata(info["path"])["pegq.quantizers"]
    assert all(meta[n]["constant_zero_point"] and meta[n]["code_shift"] == 128 and meta[n]["dtype"] == "uint8"
               for n in sym)
    assert all(meta[n]["constant_zero_point"] and meta[n]["code_shift"] == 0 for n in fixed)
    graph = onnx.load(info["path"]).graph
    assert not [n for n in graph.node if n.name in {f"{f}/ReduceMin" for f in fixed}]
    sym_codes = {meta[n]["tensor"] for n in sym + fixed}
    readers = [n for n in graph.node if n.op_type == "MatMulInteger" and n.input[0] in sym_codes]
    assert readers and not [n for n in graph.node if n.name.endswith("/ZeroPointTerm")
                            and n.name.rsplit("/", 1)[0] in {r.name.rsplit("/", 1)[0] for r in readers}]
    par = per_tensor_parity(prepare(qm), info["path"], padded_batch(pad_id_of(m), seed=2))
    assert par["missing"] == [] and par["weight_max_steps"] == 0
    assert par["max_steps"] <= 1, par["tensors"]
    assert par["forced_output_max_abs_diff"] <= 1e-5


def test_symmetric_per_token_below_8_bits_codes_stay_on_their_grid(tmp_path, one_thread):
    """A 6-bit symmetric per-token quantizer: codes -32..31 stored as 0..63 (+32, a ``Clip`` before the uint8
    ``QuantizeLinear``), every row's largest magnitude on the grid's end, matching the simulation per tensor."""
    qm, batch = _tiny("sq-token-sym-gemm", ["encoder.layer.*.attn.layernorm=6"])
    info = export_onnx(qm, tmp_path / "s6.onnx", weight_dtype="uint8")
    assert metadata(info["path"])["pegq.quantizers"]["encoder.layer.0.attn.layernorm"]["code_shift"] == 32
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["max_steps"] <= 1 and par["forced_output_max_abs_diff"] <= 1e-5, par["tensors"]
    sess = session(info["path"], extra_outputs=["encoder.layer.0.attn.layernorm.q"])
    codes = sess.run(["encoder.layer.0.attn.layernorm.q"], feeds(batch, metadata(info["path"])["pegq.inputs"]))[0]
    assert codes.min() >= 0 and codes.max() <= 63
    # each row's largest magnitude is +-31 steps: stored as 1 (negative) or 63 (positive)
    assert ((codes.min(-1) == 1) | (codes.max(-1) == 63)).all()


def test_fixed_zero_point_below_8_bits_codes_stay_on_their_grid(tmp_path, one_thread):
    """A 4-bit FFN hidden activation with the fixed zero-point 12: codes 0..15 (a ``Clip`` of the steps to -12..3
    before the uint8 ``QuantizeLinear`` adds 12), matching the simulation per tensor."""
    qm, batch = _tiny("sq-token-zp-gemm", ["encoder.layer.*intermediate=4,zp12"])
    info = export_onnx(qm, tmp_path / "z4.onnx", weight_dtype="uint8")
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["max_steps"] <= 1 and par["forced_output_max_abs_diff"] <= 1e-5, par["tensors"]
    sess = session(info["path"], extra_outputs=["encoder.layer.0.ffn.intermediate.q"])
    codes = sess.run(["encoder.layer.0.ffn.intermediate.q"], feeds(batch, metadata(info["path"])["pegq.inputs"]))[0]
    assert codes.min() >= 0 and codes.max() == 15  # the largest rows reach the top step


def test_per_token_below_8_bits_clips_codes_to_its_grid(tmp_path, one_thread):
    """A 7-bit per-token quantizer: codes 0..127 (a ``Clip`` before the uint8 ``QuantizeLinear``, which would
    saturate at 255 only), matching the simulation per tensor."""
    import onnx

    qm, batch = _tiny("sq-token-gemm", ["encoder.layer.*intermediate=7"])
    info = export_onnx(qm, tmp_path / "t7.onnx", weight_dtype="uint8")
    names = {n.name for n in onnx.load(info["path"]).graph.node}
    assert "encoder.layer.0.ffn.intermediate/ClipCodes" in names
    assert "encoder.layer.0.attn.layernorm/ClipCodes" not in names
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["max_steps"] <= 1 and par["forced_output_max_abs_diff"] <= 1e-5, par["tensors"]
    sess = session(info["path"], extra_outputs=["encoder.layer.0.ffn.intermediate.q"])
    codes = sess.run(["encoder.layer.0.ffn.intermediate.q"], feeds(batch, metadata(info["path"])["pegq.inputs"]))[0]
    assert codes.max() <= 127 and codes.max() >= 120


def test_per_token_rows_times_a_static_activation_in_heads_match_the_simulation(one_thread):
    """The general form of a per-token reader whose B operand is a static activation seen through layout ops (as V
    split into heads): rows with negative values, so their zero-points differ from the calibrated one, times uint8
    codes reshaped and transposed; the integer matmul with the run-time column sums of B gives the simulation's
    float matmul of the dequantized operands."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper

    from pegq.export.onnx import (
        IR_VERSION,
        OPSET,
        _Graph,
        _int_tensor,
        _lower_token_matmuls,
        _token_nodes,
        qparams_numpy,
    )
    from pegq.quant import PerTensor, PerToken, Quantizer

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 5, 8, generator=gen) * (torch.rand(2, 3, 5, 1, generator=gen) * 4) + 0.5
    v = torch.randn(2, 8, 12, generator=gen) + 0.3
    qa, qv = Quantizer("a", 8, False, PerToken()), Quantizer("v", 8, False, PerTensor())
    qa(a[:1]), qv(v)
    qa.freeze(), qv.freeze()
    expected = qa(a) @ qv(v).reshape(2, 8, 3, 4).transpose(1, 2)
    _, za = qparams_numpy(qa)
    sv, zv = qparams_numpy(qv)
    _, row_z = qa.token_qparams(a)
    assert len(set(row_z.flatten().tolist()) - {float(za[0])}) > 3  # most rows are off the calibrated zero-point

    nodes, inits = _token_nodes("a", "a", "a.q", "a.dq", qa, centre=int(za[0]))
    inits += [helper.make_tensor("v.s", T.FLOAT, [], [float(sv[0])]),
              _int_tensor(np.array(zv[0], np.uint8), "v.z", T.UINT8),
              helper.make_tensor("v.shape", T.INT64, [4], [2, 8, 3, 4])]
    nodes += [helper.make_node("QuantizeLinear", ["v", "v.s", "v.z"], ["v.q"]),
              helper.make_node("DequantizeLinear", ["v.q", "v.s", "v.z"], ["v.dq"]),
              helper.make_node("Reshape", ["v.dq", "v.shape"], ["v.heads"]),
              helper.make_node("Transpose", ["v.heads"], ["v.t"], perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["a.dq", "v.t"], ["out"], name="pv")]
    graph = helper.make_graph(nodes, "pv", [helper.make_tensor_value_info("a", T.FLOAT, list(a.shape)),
                                            helper.make_tensor_value_info("v", T.FLOAT, list(v.shape))],
                              [helper.make_tensor_value_info("out", T.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    info = {"a": {"granularity": "token", "dequantized": "a.dq", "tensor": "a.q", "scale_tensor": "a.row_scale",
                  "zero_point_tensor": "a.row_zero_point", "centre": "a.centre", "centre_u8": "a.centre_u8"}}
    assert _lower_token_matmuls(_Graph(model.graph), info) == (1, 0)
    ops = [n.op_type for n in model.graph.node]
    assert "MatMul" not in ops and "MatMulInteger" in ops and "ReduceSum" in ops
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"a": a.numpy(), "v": v.numpy()})[0]
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_per_token_query_stays_a_float_matmul_and_is_counted_as_left(tmp_path, one_thread):
    """A per-token Q reaches ``Q K^T`` through ``Reshape``/``Transpose`` with K's codes on the other side; the export
    keeps that matmul in float on the dequantized values (still equal to the simulation) and counts it as left,
    one per layer, instead of passing over it."""
    qm, batch = _tiny("sq-token-gemm", ["*.attn.query=token"])
    layers = len({n.split(".attn.")[0] for n in qm.quantizers if n.endswith(".attn.query")})
    info = export_onnx(qm, tmp_path / "q.onnx", weight_dtype="uint8")
    assert info["folds"]["token_matmul_left"] == layers > 0, info["folds"]
    par = per_tensor_parity(prepare(qm), info["path"], batch)
    assert par["missing"] == [] and par["max_steps"] <= 1
    assert par["forced_output_max_abs_diff"] <= 1e-5


def _has_vnni() -> bool:
    from pathlib import Path

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown CPU: do not assume saturation
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _ort_matmul_integer(a, b):
    """ORT's ``MatMulInteger`` of uint8 ``a`` [M, K] by the constant int8 ``b`` [K, N] (int32 out)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "mm",
                          [helper.make_tensor_value_info("A", TensorProto.UINT8, list(a.shape))],
                          [helper.make_tensor_value_info("Y", TensorProto.INT32, None)],
                          [numpy_helper.from_array(b, "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]


def test_exact_weight_dtype_stores_uint8_only_where_a_pair_can_saturate(tmp_path, one_thread):
    """``weight_dtype="exact"``: a weight with a pair of adjacent inputs ``|q0 + q1| > 128`` (which x86 CPUs
    without VNNI can saturate in int16) is stored uint8, every other one int8; with int8 the summary lists the
    risky weights and how many pairs each has."""
    from models_helpers import pad_id_of, padded_batch, tiny_model

    m = tiny_model("bert", True)
    with torch.no_grad():
        m.bert.encoder.layer[1].intermediate.dense.weight[:, 4:6] = 3.0  # two heavy adjacent inputs: every row
        m.bert.encoder.layer[0].intermediate.dense.weight.mul_(0.01)[:, 0] = 1.0  # one heavy input: no pair
    qm = pegq.quantize(m, "w8a8")
    pegq.calibrate(qm, [padded_batch(pad_id_of(m), seed=1)], progress=False)
    plain = export_onnx(qm, tmp_path / "int8.onnx", weight_dtype="int8")
    risky = plain["int8_pair_overflows"]
    heavy, light = "encoder.layer.1.ffn.intermediate.weight", "encoder.layer.0.ffn.intermediate.weight"
    assert risky[heavy] >= 37 and light not in risky  # the tiny FFN has 37 hidden units: one pair per row
    meta = metadata(plain["path"])["pegq.quantizers"]
    assert risky == {k: v["pair_overflows"] for k, v in meta.items() if v.get("pair_overflows")}
    exact = export_onnx(qm, tmp_path / "exact.onnx", weight_dtype="exact")
    assert exact["int8_pair_overflows"] == {}
    meta = metadata(exact["path"])["pegq.quantizers"]
    assert {k for k, v in meta.items() if v["kind"] == "weight" and v["dtype"] == "uint8"} == set(risky)
    assert meta[light]["dtype"] == "int8" and meta[light]["pair_overflows"] == 0
    par = per_tensor_parity(prepare(qm), exact["path"], padded_batch(pad_id_of(m), seed=2))
    assert par["weight_max_steps"] == 0 and par["max_steps"] <= 1


def test_minilm_pair_limited_gptq_weights_are_exact_int8(minilm, tmp_path):
    """x86 CPUs without VNNI add the products of weight inputs 2j and 2j+1 in a saturating int16, so int8
    weights with |q[2j] + q[2j+1]| > 128 can make ORT differ from the simulation. On the real MiniLM with
    ``sq-token-probs-gemm``: round-to-nearest leaves such pairs (listed by ``int8_pair_overflows``); after GPTQ with
    ``pair_limit=128`` there are none, ``weight_dtype="exact"`` keeps every weight int8, ORT's integer matmul
    reproduces them exactly on the worst input (every code 255) and per-tensor parity holds. (Weights of layer 0,
    the pooler and the head only, to keep GPTQ short.)"""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from pegq.gptq_model import GPTQRun, gptq_model
    from pegq.quant.gptq import GPTQConfig, pair_overflows

    def ffn_weight(path):
        t = metadata(path)["pegq.quantizers"]["encoder.layer.0.ffn.intermediate.weight"]["tensor"]
        return numpy_helper.to_array(next(i for i in onnx.load(path).graph.initializer if i.name == t))

    qm, tok = _minilm_calibrated(minilm, "sq-token-probs-gemm", ["encoder.layer.[1-5].*.weight=off"])
    plain = export_onnx(qm, tmp_path / "rtn-int8.onnx", weight_dtype="int8")
    assert len(plain["int8_pair_overflows"]) >= 6  # every Linear of layer 0 has pairs over 128
    w = ffn_weight(plain["path"])  # [in, out]: the matmul's K runs along axis 0
    a = np.full((4, w.shape[0]), 255, np.uint8)
    a[1] = np.random.default_rng(0).integers(0, 256, w.shape[0])
    if not _has_vnni():  # round-to-nearest weights do saturate on this CPU
        assert pair_overflows(torch.from_numpy(w.T.copy())) > 0
        assert not np.array_equal(_ort_matmul_integer(a, w), a.astype(np.int64) @ w.astype(np.int64))

    seqs = [dict(tok(s, padding=True, return_tensors="pt")) for s in
            (["a gorgeous, witty, seductive movie.", "unfunny and lame."],
             ["the story is predictable and the characters are thin.", "it's a charming and often affecting journey."])]
    info = gptq_model(qm, seqs, GPTQRun(num_samples=4, layer=GPTQConfig(pair_limit=128)), progress=False)
    assert info["layers_pair_limited"] == info["layers"]
    out = export_onnx(qm, tmp_path / "gptq-exact.onnx", weight_dtype="exact")
    assert out["int8_pair_overflows"] == {}
    meta = metadata(out["path"])["pegq.quantizers"]
    assert not [k for k, v in meta.items() if v["kind"] == "weight" and v["dtype"] != "int8"]
    b = ffn_weight(out["path"])
    assert b.dtype == np.int8 and pair_overflows(torch.from_numpy(b.T.copy())) == 0
    assert np.array_equal(_ort_matmul_integer(a, b), a.astype(np.int64) @ b.astype(np.int64))

    batch = dict(tok(["dull", "an utterly charming and hilarious film that reaches for the stars"], padding=True,
                     return_tensors="pt"))
    par = per_tensor_parity(prepare(qm), out["path"], batch)
    assert par["missing"] == [] and par["weight_max_steps"] == 0
    assert par["forced_output_max_abs_diff"] <= 1e-4
    assert par["output_max_abs_diff"] <= 0.05
