"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) nodes, run by ONNX Runtime's int8 kernels.

How a calibrated :class:`~pegq.models.QuantizedModel` becomes a QDQ ONNX model:

1. PEG quantizers are first rewritten into per-tensor ones (:mod:`pegq.export.rewrite`, paper
   section 4); every other enabled activation quantizer must already be per-tensor, weights per-tensor
   or per-channel, everything calibrated and frozen (else :class:`ExportError` says which and why).
2. The model is traced with ``torch.onnx.export`` (TorchScript exporter) while every enabled quantizer's
   ``forward`` is swapped for a ``torch.library`` op (``pegq_export::q`` / ``::w``) that computes the
   simulated values and exports as a marker node (``pegq::Q`` / ``pegq::W``) carrying the quantizer's
   name. Activation quantizers are forward hooks and weight quantizers parametrizations; both call the
   quantizer module, so the markers sit exactly where pegq quantizes.
3. Graph surgery lowers the markers with the calibrated parameters:

   * activation -> ``QuantizeLinear -> DequantizeLinear`` (scalar scale and zero-point): 8-bit as
     ``uint8`` (asymmetric) / ``int8`` (symmetric), 16-bit as ``uint16`` / ``int16`` (ONNX opset 21,
     executed by ORT's QuantizeLinear/DequantizeLinear; the ops consuming them run in float because
     ORT has no 16-bit matmul kernels);
   * weight -> integer initializer + ``DequantizeLinear`` (per-tensor or per-channel ``axis``): stored
     as int4/uint4 for <= 4 bits, int8/uint8 for 5-8 bits, int16/uint16 above; the integers are the
     quantizer's own (AdaRound rounding included). The FP32 weight is dropped. ``weight_dtype="uint8"``
     stores symmetric 8-bit weights +128 with zero-point 128 (same values): ORT then uses its exact
     uint8 x uint8 kernel instead of uint8 x int8, which saturates rare pairs of products on x86 CPUs
     without VNNI. ``weight_dtype="auto"`` does that only for the weights of the PEG rewrite's split
     Linears: a PEG group without outliers has a near-symmetric range, so its uint8 zero-point is ~128
     and pairs of large codes with large weights saturate often (measured: MPNet peg-gemm collapses
     to chance), while per-tensor inputs with an outlier range rarely do; the other matmuls keep the
     faster uint8 x int8 kernel. ``weight_dtype="exact"`` stores uint8 only the weights that can saturate
     at all: those with a pair of adjacent inputs ``|q[2j] + q[2j+1]| > 128`` (ORT's x86 kernels add the
     products of inputs ``2j`` and ``2j+1`` in int16; :func:`pegq.quant.gptq.pair_limited_nearest`);
     after GPTQ with ``pair_limit=128`` none can, and every weight stays int8. The export summary
     (``int8_pair_overflows``) lists the int8 weights that can.
   * a smoothed activation (:mod:`pegq.smooth`) -> ``Mul(1/s) -> QuantizeLinear -> DequantizeLinear ->
     Div(1/s)``, a smoothed weight -> the integers of ``W diag(s)`` + ``DequantizeLinear`` + ``Mul(1/s)``;
     ``_fold_smooth`` then lets each matmul read the ``DequantizeLinear`` outputs on both sides (the
     scales cancel), so only the float consumers (the residual sum) see the ``Div``; a shifted one
     (``shift``) adds ``Sub(z)`` before the ``Mul`` and ``Add(z)`` after the ``Div``, and the fold adds
     ``W z`` to each reader's bias;
   * a per-token (dynamic) activation -> per-row ``ReduceMin``/``ReduceMax``, scale and zero-point as ONNX ops,
     uint8 codes (:func:`_token_nodes`); every Linear reading it -> ``MatMulInteger`` on the codes with a per-row
     scale and a rank-1 zero-point term (:func:`_lower_token_matmuls`; ORT fuses it into
     ``MatMulIntegerToFloat``);
   * a weight ``Transpose`` is folded into the integers; an embedding lookup ``Gather(DQ(table))``
     becomes ``DQ(Gather(int table))`` (only the looked-up rows are dequantized; per-tensor tables and
     tables with one scale per embedding dim, ``channel1``); the split/concat
     pairs the PEG rewrite leaves between a group's quantizer and its matmul are removed, so that every
     group's ``DequantizeLinear`` feeds its ``MatMul`` directly; the residual sum is added per group; the
     K group products of the split Linear are summed by one ``Sum``.

ONNX Runtime then fuses ``DQ -> MatMul (-> Q)`` into its int8 kernels (``MatMulIntegerToFloat`` /
``QLinearMatMul``): :func:`kernel_report` lists the optimized graph's operators. Model metadata
(``pegq.quantizers``) maps every quantizer name to its ``QuantizeLinear`` output, scale and zero-point,
which :func:`per_tensor_parity` uses to compare ORT's integer codes with the simulated model's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io import atomic_write_bytes
from ..models.base import QuantizedModel
from ..quant import PerChannel, PerTensor, Quantizer, QuantState
from ..quant.gptq import PAIR_LIMIT, pair_overflows
from .rewrite import RewriteError, rewrite_peg

OPSET = 21
IR_VERSION = 10
TRACE_OPSET = 20  # the TorchScript exporter's newest opset; ops used here are unchanged in 21
ACTIVATION_BITS = (8, 16)
WEIGHT_DTYPES = ("int8", "uint8", "auto", "exact")
# weights of the split Linear layers of the PEG rewrite (pegq.export.rewrite): their inputs are PEG groups
_GROUP_WEIGHT = re.compile(r"\.g\d+\.weight$")
INT8_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul",
                "QAttention", "QLinearConv", "ConvInteger")


class ExportError(ValueError):
    """A model or setting that cannot be exported (the message says what and why)."""


# --------------------------------------------------------------------------- checks


def check_exportable(qm: QuantizedModel) -> None:
    """Raise :class:`ExportError` unless every enabled quantizer has an ONNX QDQ form ORT executes."""
    for n, q in qm.quantizers.items():
        if not q.enabled:
            continue
        if q.state != QuantState.FROZEN or (q.x_min is None and q.scale_param is None):
            raise ExportError(
                f"{n}: not calibrated and frozen ({q.state.value}); calibrate the model (pegq.calibrate or "
                f"`pegq ptq`) before exporting"
            )
        g = q.granularity
        if qm.kind(n) == "weight":
            if not isinstance(g, PerTensor | PerChannel):
                raise ExportError(f"{n}: {g.describe()} weights have no ONNX form; use per-tensor or per-channel")
            continue
        if g.dynamic:
            if q.bits > 8:
                raise ExportError(
                    f"{n}: per-token (dynamic) activations export as uint8 codes only (ONNX Runtime's "
                    f"MatMulInteger reads uint8 rows with a per-row scale); use 2-8 bits for this quantizer"
                )
            continue
        if not isinstance(g, PerTensor):
            raise ExportError(
                f"{n}: {g.describe()} activations are not per-tensor; ONNX QuantizeLinear takes one scale "
                f"per tensor (PEG on the FFN tensors is rewritten automatically; other granularities are not)"
            )
        if q.bits not in ACTIVATION_BITS:
            raise ExportError(
                f"{n}: {q.bits}-bit activations are not supported: ONNX Runtime runs QuantizeLinear with "
                f"8- and 16-bit integer types only; use a8 or a16 for this quantizer (or off)"
            )


def prepare(qm: QuantizedModel) -> QuantizedModel:
    """The model to export: ``qm`` itself, or a per-tensor rewritten copy when it has PEG quantizers."""
    if not isinstance(qm, QuantizedModel):
        raise ExportError(
            f"expected a calibrated pegq QuantizedModel, got {type(qm).__name__}; use pegq.quantize + "
            f"pegq.calibrate first (an FP32 model can be exported with torch.onnx.export directly)"
        )
    try:
        out = rewrite_peg(qm) if any(
            q.enabled and q.granularity.kind == "peg" for q in qm.activation_quantizers().values()
        ) else qm
    except RewriteError as e:
        raise ExportError(str(e)) from None
    check_exportable(out)
    return out


# --------------------------------------------------------------------------- integer views of quantizers


def _dtype_for(bits: int, symmetric: bool, weight: bool):
    from onnx import TensorProto as T

    if bits <= 4 and weight:
        return (T.INT4, np.int8) if symmetric else (T.UINT4, np.uint8)
    if bits <= 8:
        return (T.INT8, np.int8) if symmetric else (T.UINT8, np.uint8)
    return (T.INT16, np.int16) if symmetric else (T.UINT16, np.uint16)


def qparams_numpy(q: Quantizer) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and integer zero-point (int64) as numpy arrays, one entry per parameter pair."""
    with torch.no_grad():
        s, z = q.qparams()
        if q.scale_param is not None:
            s = s.clamp_min(1e-8)
        z = torch.zeros_like(s) if q.symmetric else z.round().clamp(q.qmin, q.qmax)
    return s.detach().float().cpu().numpy().reshape(-1), z.detach().cpu().numpy().reshape(-1).astype(np.int64)


def weight_codes(q: Quantizer, w: torch.Tensor) -> np.ndarray:
    """The integer weights (int64, shaped like ``w``) the quantizer's fake-quantized output stands for:
    ``round(q(w) / s) + z`` -- round-to-nearest, or AdaRound's decisions where the quantizer has them."""
    with torch.no_grad():
        wq = q(w.detach()).float()
        if q.smooth is not None:  # q(w) = Q(w * m) / m: the integers are those of Q(w * m)
            wq = wq * q.smooth.to(wq.device)
        s, z = q.qparams()
        s = s.detach().float()
        z = torch.zeros_like(s) if q.symmetric else z.detach().float().round()
        g = q.granularity
        s_b = g.broadcast(s, wq, q.group_index)
        z_b = g.broadcast(z, wq, q.group_index)
        codes = torch.round(wq / s_b) + z_b
        return codes.clamp(q.qmin, q.qmax).to(torch.int64).cpu().numpy()


# --------------------------------------------------------------------------- tracing with markers


_ACTIVE: dict[str, Quantizer] = {}
_OPS_READY = False


def _register_marker_ops() -> None:
    """``torch.ops.pegq_export.q(x, name)`` / ``.w(w, name)``: apply quantizer ``name`` (so the trace
    computes the simulated values) and export as ``pegq::Q`` / ``pegq::W`` nodes carrying the name."""
    global _OPS_READY
    if _OPS_READY:
        return
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx import symbolic_helper as sh

    lib = torch.library.Library("pegq_export", "DEF")
    for op in ("q", "w"):
        lib.define(f"{op}(Tensor x, str name) -> Tensor")
        lib.impl(op, lambda x, name: Quantizer.forward(_ACTIVE[name], x), "CompositeExplicitAutograd")

    def symbolic(kind):
        @sh.parse_args("v", "s")
        def fn(g, x, name):
            out = g.op(f"pegq::{kind}", x, name_s=name)
            out.setType(x.type())
            return out

        return fn

    register_custom_op_symbolic("pegq_export::q", symbolic("Q"), 1)
    register_custom_op_symbolic("pegq_export::w", symbolic("W"), 1)
    globals()["_LIB"] = lib  # keep the library (and its definitions) alive
    _OPS_READY = True


class _Marked:
    def __init__(self, op, name):
        self.op, self.name = op, name

    def __call__(self, x):
        return self.op(x, self.name)


@contextlib.contextmanager
def _markers(qm: QuantizedModel):
    _register_marker_ops()
    patched = []
    try:
        for n, q in qm.quantizers.items():
            q._qcache = None  # cached qparams of a deep copy trip the tracer; recompute them
            if not q.enabled:
                continue
            _ACTIVE[n] = q
            op = torch.ops.pegq_export.w if qm.kind(n) == "weight" else torch.ops.pegq_export.q
            object.__setattr__(q, "forward", _Marked(op, n))
            patched.append((n, q))
        yield
    finally:
        for n, q in patched:
            q.__dict__.pop("forward", None)
            _ACTIVE.pop(n, None)


class _Wrapper(nn.Module):
    def __init__(self, qm: QuantizedModel, input_names: list[str], output: str):
        super().__init__()
        self.qm, self.input_names, self.output = qm, input_names, output

    def forward(self, *args):
        out = self.qm(**dict(zip(self.input_names, args, strict=True)))
        return getattr(out, self.output) if hasattr(out, self.output) else out[0]


def model_io(qm_or_model) -> tuple[list[str], str]:
    """ONNX input names (``input_ids``, ``attention_mask`` and, where the model takes them,
    ``token_type_ids``) and the output (``logits`` for a classifier, else ``last_hidden_state``)."""
    import inspect

    model = qm_or_model.model if isinstance(qm_or_model, QuantizedModel) else qm_or_model
    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and model.config.model_type not in ("mpnet", "distilbert"):
        names.append("token_type_ids")
    output = "logits" if type(model).__name__.endswith("ForSequenceClassification") else "last_hidden_state"
    return names, output


def dummy_inputs(model, input_names: list[str], batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, ...]:
    """A padded batch (the second row is padded) so the trace builds the attention mask."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    lo = min(5, cfg.vocab_size - 1)
    ids = torch.randint(lo, cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    mask[1:, seq // 2 :] = 0
    ids[1:, seq // 2 :] = pad
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(out[n] for n in input_names)


def trace_to_onnx(qm: QuantizedModel, opset: int = TRACE_OPSET):
    """``torch.onnx.export`` of ``qm`` with marker nodes (``pegq::Q``/``pegq::W``); returns a ModelProto."""
    import warnings

    import onnx

    input_names, output = model_io(qm)
    was_training = qm.training
    wrapper = _Wrapper(qm, input_names, output).eval()
    args = dummy_inputs(qm.model, input_names)
    axes = {n: {0: "batch", 1: "sequence"} for n in input_names}
    axes[output] = {0: "batch"} if output == "logits" else {0: "batch", 1: "sequence"}
    buf = io.BytesIO()
    try:
        with _markers(qm), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, args, buf, dynamo=False, opset_version=opset, input_names=input_names,
                output_names=[output], dynamic_axes=axes, custom_opsets={"pegq": 1}, do_constant_folding=True,
            )
    finally:
        qm.train(was_training)  # the exporter restores the wrapper's (training) mode recursively
    return onnx.load_model_from_string(buf.getvalue())


def export_fp32(model, path: str | os.PathLike, opset: int = 17) -> dict:
    """Plain FP32 ONNX export of a Hugging Face encoder (or an unwrapped one) with the same inputs,
    output and dynamic axes as :func:`export_onnx` -- the baseline for ORT FP32 and ORT's own
    ``quantize_dynamic`` / ``quantize_static``."""
    import warnings

    if isinstance(model, QuantizedModel):
        raise ExportError("export_fp32 takes a plain Hugging Face model; use export_onnx for a QuantizedModel")
    input_names, output = model_io(model)
    was_training = model.training
    wrapper = _HFWrapper(model, input_names, output).eval()
    axes = {n: {0: "batch", 1: "sequence"} for n in input_names}
    axes[output] = {0: "batch"} if output == "logits" else {0: "batch", 1: "sequence"}
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, dummy_inputs(model, input_names), buf, dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=[output], dynamic_axes=axes,
                              do_constant_folding=True)
    finally:
        model.train(was_training)
    data = buf.getvalue()
    atomic_write_bytes(Path(path), data)
    return {"path": str(path), "bytes": len(data), "inputs": input_names, "output": output}


class _HFWrapper(nn.Module):
    def __init__(self, model, input_names: list[str], output: str):
        super().__init__()
        self.model, self.input_names, self.output = model, input_names, output

    def forward(self, *args):
        out = self.model(**dict(zip(self.input_names, args, strict=True)))
        return getattr(out, self.output)


# --------------------------------------------------------------------------- graph surgery


class _Graph:
    """Index over an onnx GraphProto: producers, consumers, initializers."""

    def __init__(self, graph):
        self.g = graph
        self.refresh()

    def refresh(self):
        from onnx import numpy_helper

        self.inits = {i.name: i for i in self.g.initializer}
        self.producer, self.consumers = {}, {}
        for n in self.g.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.g.output}
        self._np = numpy_helper

    def array(self, name) -> np.ndarray | None:
        if name in self.inits:
            return self._np.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return self._np.to_array(a.t)
        return None


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_input(g: _Graph, old: str, new: str) -> None:
    for n in g.g.node:
        for k, i in enumerate(n.input):
            if i == old:
                n.input[k] = new
    for o in g.g.output:
        if o.name == old:
            raise ExportError(f"internal: cannot rename graph output {old}")


def _lower_markers(model, qm: QuantizedModel, names_map: dict, weight_dtype: str = "int8") -> dict:
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    g = _Graph(model.graph)
    new_nodes, new_inits = [], []
    uses: Counter = Counter()
    info: dict[str, dict] = {}
    fp32_dropped = set()
    for node in model.graph.node:
        if node.domain != "pegq":
            new_nodes.append(node)
            continue
        name = _attr(node, "name").decode() if isinstance(_attr(node, "name"), bytes) else _attr(node, "name")
        q = qm.quantizers[name]
        uses[name] += 1
        tag = name if uses[name] == 1 else f"{name}#{uses[name]}"
        is_weight = node.op_type == "W"
        dtype, np_dtype = _dtype_for(q.bits, q.symmetric, is_weight)
        s, z = qparams_numpy(q)
        shift = 0
        if is_weight:
            src = node.input[0]
            if src not in g.inits:
                raise ExportError(f"{name}: the traced weight is not a constant ({src}); cannot store it as integers")
            w = torch.from_numpy(numpy_helper.to_array(g.inits[src]).copy())
            codes = weight_codes(q, w)
            signed8 = 4 < q.bits <= 8 and q.symmetric
            # a Linear's [out, in] codes: the pairs along `in` that ORT's int16 pair sums could saturate
            over = pair_overflows(torch.from_numpy(codes), PAIR_LIMIT) if (
                signed8 and codes.ndim == 2 and isinstance(qm._weight_owner.get(name), nn.Linear)) else 0
            u8 = (weight_dtype == "uint8" or (weight_dtype == "auto" and _GROUP_WEIGHT.search(name) is not None)
                  or (weight_dtype == "exact" and over > 0))
            if u8 and signed8:
                dtype, np_dtype, shift = T.UINT8, np.uint8, 128
            codes = (codes + shift).astype(np_dtype)
            z = z + shift
            axis = None
            if isinstance(q.granularity, PerChannel):
                axis = q.granularity.axis % codes.ndim
            else:
                s, z = s[:1], z[:1]
            scale_shape = [s.size] if axis is not None else []
            w_name, s_name, z_name = f"{tag}.int", f"{tag}.scale", f"{tag}.zero_point"
            new_inits += [
                _int_tensor(codes, w_name, dtype),
                helper.make_tensor(s_name, 1, scale_shape, s.astype(np.float32).tolist()),
                _int_tensor(z.reshape(scale_shape).astype(np_dtype), z_name, dtype),
            ]
            kw = {"axis": axis} if axis is not None else {}
            dq_out = node.output[0] if q.smooth is None else f"{tag}.dq"
            new_nodes.append(helper.make_node("DequantizeLinear", [w_name, s_name, z_name], [dq_out],
                                              name=f"{tag}/DequantizeLinear", **kw))
            if q.smooth is not None:  # W = DQ(int W') / s along the input columns; _fold_smooth removes it
                inv_name = f"{tag}.smooth_inv"
                new_inits.append(helper.make_tensor(inv_name, 1, [q.smooth.numel()],
                                                    (1.0 / q.smooth.double()).float().tolist()))
                new_nodes.append(helper.make_node("Mul", [dq_out, inv_name], [node.output[0]],
                                                  name=f"{tag}/SmoothMul"))
            fp32_dropped.add(src)
            info[tag] = {"kind": "weight", "bits": q.bits, "dtype": _dtype_name(dtype), "tensor": w_name,
                         "shape": list(codes.shape), "axis": axis, "smoothed": q.smooth is not None,
                         "pair_overflows": over}
        else:
            s_name, z_name, q_out = f"{tag}.scale", f"{tag}.zero_point", f"{tag}.q"
            if not q.granularity.dynamic:
                new_inits += [
                    helper.make_tensor(s_name, 1, [], [float(s[0])]),
                    _int_tensor(np.array(z[0], dtype=np_dtype), z_name, dtype),
                ]
            x_in, dq_out = node.input[0], node.output[0]
            if q.smooth is not None:
                # q(x * m) / m with m = 1/s: Mul(m) -> per-tensor QuantizeLinear -> DequantizeLinear -> Div(m).
                # The matmuls whose weights carry diag(s) read the DequantizeLinear directly (_fold_smooth);
                # float consumers (the residual sum) read s * q(x / s) after the Div. (A per-axis
                # QuantizeLinear would need no Mul, but ORT runs it ~24x slower than Mul + per-tensor.)
                # With a shift z: Sub(z) first and Add(z) last; _fold_smooth moves W z into the readers' biases.
                m_name = f"{tag}.smooth"
                new_inits.append(helper.make_tensor(m_name, 1, [q.smooth.numel()], q.smooth.float().tolist()))
                x_in, dq_out = f"{tag}.smoothed", f"{tag}.dq"
                src_in = node.input[0]
                if q.shift is not None:
                    shift_name = f"{tag}.shift"
                    new_inits.append(helper.make_tensor(shift_name, 1, [q.shift.numel()], q.shift.float().tolist()))
                    src_in = f"{tag}.centred"
                    new_nodes.append(helper.make_node("Sub", [node.input[0], shift_name], [src_in],
                                                      name=f"{tag}/ShiftIn"))
                new_nodes.append(helper.make_node("Mul", [src_in, m_name], [x_in], name=f"{tag}/SmoothIn"))
            if q.granularity.dynamic:
                src = g.producer.get(x_in)
                nonneg = not q.symmetric and src is not None and src.op_type in _NONNEG_OPS and int(z[0]) == 0
                # symmetric codes are stored as uint8 + 2^(bits-1): every row's zero-point is that one constant
                shift = -q.qmin if q.symmetric else 0
                fixed = q.granularity.zero_point  # every row's zero-point fixed (PerToken.zero_point)
                dtype = T.UINT8 if q.symmetric else dtype
                centre = shift or (fixed if fixed is not None else int(z[0]))
                nodes, inits = _token_nodes(tag, x_in, q_out, dq_out, q, centre=centre, nonneg=nonneg)
                new_nodes += nodes
                new_inits += inits
            else:
                new_nodes.append(helper.make_node("QuantizeLinear", [x_in, s_name, z_name], [q_out],
                                                  name=f"{tag}/QuantizeLinear"))
                new_nodes.append(helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                                                  name=f"{tag}/DequantizeLinear"))
            if q.smooth is not None:
                div_out = node.output[0] if q.shift is None else f"{tag}.unsmoothed"
                new_nodes.append(helper.make_node("Div", [dq_out, m_name], [div_out], name=f"{tag}/SmoothOut"))
                if q.shift is not None:
                    new_nodes.append(helper.make_node("Add", [div_out, f"{tag}.shift"], [node.output[0]],
                                                      name=f"{tag}/ShiftOut"))
            info[tag] = {"kind": "activation", "bits": q.bits, "dtype": _dtype_name(dtype), "tensor": q_out,
                         "scale": float(s[0]), "zero_point": int(z[0]), "symmetric": q.symmetric,
                         "smoothed": q.smooth is not None, "shifted": q.shift is not None}
            if q.granularity.dynamic:  # no constant scale: per-row tensors computed at run time
                zp_tensor = f"{tag}.zero" if nonneg else f"{tag}.centre" if q.symmetric or fixed is not None else \
                    f"{tag}.row_zero_point"
                info[tag].update(granularity="token", scale=None, zero_point=None, scale_tensor=f"{tag}.row_scale",
                                 zero_point_tensor=zp_tensor, dequantized=dq_out, code_shift=shift,
                                 centre=f"{tag}.centre", centre_u8=f"{tag}.centre_u8", nonneg=nonneg,
                                 constant_zero_point=nonneg or q.symmetric or fixed is not None)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(new_inits)
    keep = [i for i in model.graph.initializer if i.name not in fp32_dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    names_map.update(info)
    return info


_NONNEG_OPS = ("Softmax", "Relu")  # producers whose output is never negative


def _token_nodes(tag: str, x_in: str, q_out: str, dq_out: str, q: Quantizer, centre: int,
                 nonneg: bool = False) -> tuple[list, list]:
    """Dynamic per-token asymmetric quantization (2-8 bits, grid ``[0, qmax]``) as ONNX ops, the same arithmetic as
    the simulation (:meth:`~pegq.quant.Quantizer.token_qparams` and :func:`~pegq.quant.fake_quant`): per row of the
    last axis ``lo = min(min x, 0)``, ``hi = max(max x, 0)``, ``s = max((hi - lo) / qmax, eps)``, ``z =
    clip(round(-lo / s), 0, qmax)``; codes ``q = round(clip(x * (1 / s) + z, 0, qmax))`` as uint8 (``{tag}.q``; below
    8 bits an explicit ``Clip``, at 8 bits ``QuantizeLinear``'s saturation); the dequantized ``(q - z) * s`` for
    float readers (``dq_out``). ``centre``: the calibrated per-tensor zero-point, which the integer matmuls subtract
    (:func:`_lower_token_matmuls` feeds them the codes). ``nonneg``: ``x`` is never negative (a softmax output), so
    ``lo = 0`` and ``z = 0`` for every row, the same values with no ``ReduceMin`` and no zero-point ops.

    A symmetric quantizer (grid ``[-2^(b-1), 2^(b-1) - 1]``): ``s = max(max(-lo, hi) / qmax, eps)``, codes
    ``clip(round(x / s), qmin, qmax)`` stored as uint8 ``+ centre`` (``centre = 2^(b-1)``, added by
    ``QuantizeLinear``'s zero-point, exact in integers): every row has the same zero-point, so the integer matmuls
    need no per-row zero-point term.

    A fixed zero-point ``z`` (:attr:`~pegq.quant.PerToken.zero_point`, asymmetric): ``s = max(hi / (qmax - z), -m / z,
    eps)`` with ``m`` the calibrated per-tensor min (a constant: no ``ReduceMin``), codes ``clip(round(x / s) + z, 0,
    qmax)`` (``QuantizeLinear``'s zero-point adds ``z = centre``): one zero-point for every row again."""
    from onnx import TensorProto as T
    from onnx import helper

    from ..quant.functional import EPS_SCALE

    lo_q, hi_q = q.qmin, q.qmax
    sym = q.symmetric
    fixed = q.granularity.zero_point
    # the steps a row's range spans: qmax - qmin (asymmetric), qmax from 0 to max |x| (symmetric), or the steps
    # above a fixed zero-point, whose floor keeps the calibrated min on the grid; the clip bounds of the unshifted
    # codes x / s, where QuantizeLinear adds a fixed zero-point
    if fixed is not None:
        steps, floor, off = hi_q - fixed, float(q.token_scale_floor()), fixed
    else:
        steps, floor, off = (hi_q if sym else hi_q - lo_q), float(EPS_SCALE), 0
    c = {k: f"{tag}.{k}" for k in ("axes", "zero", "range", "eps", "qmin", "qmax", "one", "zero_u8")}
    inits = [
        helper.make_tensor(c["axes"], T.INT64, [1], [-1]),
        helper.make_tensor(c["zero"], T.FLOAT, [], [0.0]),
        helper.make_tensor(c["range"], T.FLOAT, [], [float(steps)]),
        helper.make_tensor(c["eps"], T.FLOAT, [], [floor]),
        helper.make_tensor(c["qmin"], T.FLOAT, [], [float(lo_q - off)]),
        helper.make_tensor(c["qmax"], T.FLOAT, [], [float(hi_q - off)]),
        helper.make_tensor(c["one"], T.FLOAT, [], [1.0]),
        _int_tensor(np.array(0, dtype=np.uint8), c["zero_u8"], T.UINT8),
        # the integer matmuls subtract this one zero-point (the calibrated per-tensor one) and the rank-1 term
        # the rest; accumulating (q - centre) keeps the int32 sums, and what cancels in float32, small
        _int_tensor(np.array(centre, dtype=np.uint8), f"{tag}.centre_u8", T.UINT8),
        helper.make_tensor(f"{tag}.centre", T.FLOAT, [], [float(centre)]),
    ]
    v = {k: f"{tag}.{k}" for k in ("min", "max", "lo", "hi", "width", "step", "row_scale", "lo_steps", "neg",
                                   "zr", "row_zero_point", "inv", "scaled", "codes_f", "centred")}
    nonneg = nonneg and lo_q == 0  # lo = 0: s = max(max x / qmax, eps), z = 0, q = round(clip(x / s, 0, qmax))
    mk = helper.make_node
    nodes = [mk("ReduceMax", [x_in, c["axes"]], [v["max"]], keepdims=1, name=f"{tag}/ReduceMax"),
             mk("Max", [v["max"], c["zero"]], [v["hi"]], name=f"{tag}/Hi")]
    if fixed is not None or nonneg:  # the row's max alone sets the scale (with the floor, for a fixed zero-point)
        v["width"] = v["hi"]
    else:
        nodes += [mk("ReduceMin", [x_in, c["axes"]], [v["min"]], keepdims=1, name=f"{tag}/ReduceMin"),
                  mk("Min", [v["min"], c["zero"]], [v["lo"]], name=f"{tag}/Lo")]
        if sym:  # width = max |x| = max(-lo, hi)
            nodes += [mk("Neg", [v["lo"]], [v["neg"]], name=f"{tag}/NegLo"),
                      mk("Max", [v["hi"], v["neg"]], [v["width"]], name=f"{tag}/AbsMax")]
        else:
            nodes.append(mk("Sub", [v["hi"], v["lo"]], [v["width"]], name=f"{tag}/Width"))
    nodes += [mk("Div", [v["width"], c["range"]], [v["step"]], name=f"{tag}/Step"),
              mk("Max", [v["step"], c["eps"]], [v["row_scale"]], name=f"{tag}/RowScale")]
    if nonneg or sym or fixed is not None:  # one zero-point for all rows: QuantizeLinear adds it
        nodes += [mk("Reciprocal", [v["row_scale"]], [v["inv"]], name=f"{tag}/InvScale"),
                  mk("Mul", [x_in, v["inv"]], [v["scaled"]], name=f"{tag}/Scale")]
        if hi_q - lo_q < 255:  # fewer than 8 bits: the grid ends inside uint8's saturation
            nodes.append(mk("Clip", [v["scaled"], c["qmin"], c["qmax"]], [f"{tag}.clipped"], name=f"{tag}/ClipCodes"))
            v["scaled"] = f"{tag}.clipped"
        zero_u8 = f"{tag}.centre_u8" if sym or fixed is not None else c["zero_u8"]
        nodes.append(mk("QuantizeLinear", [v["scaled"], c["one"], zero_u8], [q_out], name=f"{tag}/QuantizeLinear"))
    else:
        nodes += [mk("Div", [v["lo"], v["row_scale"]], [v["lo_steps"]], name=f"{tag}/LoSteps"),
                  mk("Sub", [c["qmin"], v["lo_steps"]], [v["neg"]], name=f"{tag}/ZeroPoint"),
                  mk("Round", [v["neg"]], [v["zr"]], name=f"{tag}/RoundZeroPoint"),
                  mk("Clip", [v["zr"], c["qmin"], c["qmax"]], [v["row_zero_point"]], name=f"{tag}/ClipZeroPoint")]
        # a zero-point per row: one per-axis QuantizeLinear over the rows as a 2-D tensor, round(x / s) + z
        # saturated in one pass, instead of Mul(1 / s), Add(z) and a per-tensor QuantizeLinear (three passes over
        # x; measured on MPNet's FFN hidden activation, [1024, 3072] per layer: 21 ms against 40 ms for the 12
        # layers). Rows of one zero-point keep the Mul (above): per-axis is slower for short rows (attention
        # probabilities, 128 per row)
        r = {k: f"{tag}.{k}" for k in ("rows", "scale_1d", "row_zero_u8", "zero_1d", "codes_2d", "shape", "flat",
                                       "code_lo", "code_hi")}
        inits += [helper.make_tensor(r["flat"], T.INT64, [1], [-1])]
        nodes += [mk("Flatten", [x_in], [r["rows"]], axis=-1, name=f"{tag}/Rows"),
                  mk("Reshape", [v["row_scale"], r["flat"]], [r["scale_1d"]], name=f"{tag}/RowScale1D"),
                  mk("Cast", [v["row_zero_point"]], [r["row_zero_u8"]], to=T.UINT8, name=f"{tag}/ZeroPointU8"),
                  mk("Reshape", [r["row_zero_u8"], r["flat"]], [r["zero_1d"]], name=f"{tag}/ZeroPoint1D"),
                  mk("QuantizeLinear", [r["rows"], r["scale_1d"], r["zero_1d"]], [r["codes_2d"]], axis=0,
                     name=f"{tag}/QuantizeLinear")]
        if hi_q - lo_q < 255:  # fewer than 8 bits: clip the codes to the grid
            inits += [_int_tensor(np.array(lo_q, dtype=np.uint8), r["code_lo"], T.UINT8),
                      _int_tensor(np.array(hi_q, dtype=np.uint8), r["code_hi"], T.UINT8)]
            nodes.append(mk("Clip", [r["codes_2d"], r["code_lo"], r["code_hi"]], [f"{tag}.clipped"],
                            name=f"{tag}/ClipCodes"))
            r["codes_2d"] = f"{tag}.clipped"
        nodes += [mk("Shape", [x_in], [r["shape"]], name=f"{tag}/Shape"),
                  mk("Reshape", [r["codes_2d"], r["shape"]], [q_out], name=f"{tag}/Codes")]
    nodes.append(mk("Cast", [q_out], [v["codes_f"]], to=T.FLOAT, name=f"{tag}/Cast"))
    if nonneg:
        v["centred"] = v["codes_f"]
    else:
        zp = f"{tag}.centre" if sym or fixed is not None else v["row_zero_point"]
        nodes.append(mk("Sub", [v["codes_f"], zp], [v["centred"]], name=f"{tag}/SubZeroPoint"))
    nodes.append(mk("Mul", [v["centred"], v["row_scale"]], [dq_out], name=f"{tag}/DequantizeLinear"))
    return nodes, inits


_LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze")


def _static_codes_through_layout(g: _Graph, name: str):
    """``name`` = layout ops (Reshape/Transpose/Squeeze/Unsqueeze) of a per-tensor ``DequantizeLinear`` of run-time
    integer codes (a static activation quantizer's output, e.g. V split into heads): ``(dq, chain)`` with ``chain``
    the layout nodes from the DequantizeLinear outwards, or ``None``."""
    chain = []
    n = g.producer.get(name)
    while n is not None and n.op_type in _LAYOUT_OPS and len(chain) < 8:
        chain.append(n)
        n = g.producer.get(n.input[0])
    if n is None or n.op_type != "DequantizeLinear" or n.input[0] in g.inits or len(n.input) < 3:
        return None
    s, z = g.array(n.input[1]), g.array(n.input[2])
    if s is None or z is None or s.size != 1 or z.size != 1 or z.dtype not in (np.int8, np.uint8):
        return None
    return n, chain[::-1]


def _lower_token_matmuls(g: _Graph, info: dict) -> tuple[int, int]:
    """``MatMul(dequantized per-token codes, B)`` -> ``MatMulInteger(codes, int B, c0) -> Cast -> Mul(row scale x B
    scale) - (row scale x (row zero-point - c0)) x c`` with ``c0`` the quantizer's calibrated per-tensor zero-point
    (MatMulInteger's A zero-point is one per tensor, so the integer matmul subtracts ``c0`` and the rank-1 term the
    rest of each row's) and ``c_n = B_scale_n * sum_k (B_kn - B_zero_n)``. ``B`` is either

    * a constant weight ``DequantizeLinear`` (2-D, per-tensor or per output column): ``c`` is an initializer, and
      ONNX Runtime fuses the first part into ``MatMulIntegerToFloat`` with a per-row scale; the bias ``Add`` that
      follows stays separate (ORT 1.32 scales a fused bias by a per-row A scale); or
    * a static per-tensor activation quantizer's ``DequantizeLinear`` seen through layout ops (V split into heads,
      read by per-token attention probabilities): the same layout ops are applied to its integer codes, and ``c``
      (per batch and head) is a ``ReduceSum`` at run time.

    Where every row has the same zero-point c0 (a softmax output: 0; symmetric codes stored as uint8: 2^(bits-1))
    there is no rank-1 term; if a constant bias ``Add`` follows, the kernel gets a run-time scalar A scale of 1 and
    the row scale is a ``Mul`` after it (see the comment in the code).

    Returns ``(lowered, left)``; any other matmul reading the codes, directly or through layout ops (a per-token Q
    or K), stays a float matmul on the dequantized values (correct, slower) and counts as left."""
    from onnx import TensorProto as T
    from onnx import helper

    tokens = {v["dequantized"]: v for v in info.values() if v.get("granularity") == "token"}
    done, left = 0, 0
    row_zs: dict[str, str] = {}
    ones: dict[str, str] = {}
    replace: dict[int, list] = {}
    for mm in [n for n in g.g.node if n.op_type == "MatMul" and n.input[0] in tokens]:
        v = tokens[mm.input[0]]
        tag = mm.name or mm.output[0]
        # every row's zero-point is c0 (0 for a softmax output, 2^(bits-1) for symmetric codes stored as uint8):
        # no zero-point term, no column sums
        const_zp = bool(v.get("constant_zero_point"))  # absent: a per-row zero-point
        b = _token_matmul_b(g, mm, tag, sums_needed=not const_zp)
        if b is None:
            left += 1
            continue
        b_int, b_scale, b_zero, sums, new, inits = b
        g.g.initializer.extend(inits)
        if not const_zp and v["dequantized"] not in row_zs:
            rz = row_zs[v["dequantized"]] = f"{v['tensor']}.row_scaled_zero_point"
            new += [
                helper.make_node("Sub", [v["zero_point_tensor"], v["centre"]], [f"{rz}.off_centre"],
                                 name=f"{v['tensor']}/OffCentre"),
                helper.make_node("Mul", [v["scale_tensor"], f"{rz}.off_centre"], [rz],
                                 name=f"{v['tensor']}/ScaledZeroPoint"),
            ]
        scaled = mm.output[0] if const_zp else f"{tag}.scaled"
        a_scale = v["scale_tensor"]
        if const_zp and _bias_slot(g, mm) is not None:
            # ORT fuses a constant bias Add that directly follows into MatMulIntegerToFloat and then multiplies the
            # bias by a per-row A scale too (ORT 1.32). So here the integer matmul takes the scalar A scale 1 -- a
            # run-time one (max / max of the row scales), which ORT cannot fold away, so it still fuses -- and the
            # row scale is a Mul after it: the bias Add stays apart (and before a Gelu, fuses into BiasGelu). With
            # a zero-point term the Sub in between keeps the Add apart.
            if a_scale not in ones:
                ones[a_scale] = f"{v['tensor']}.one"
                new += [helper.make_node("ReduceMax", [a_scale], [f"{v['tensor']}.max_scale"], keepdims=0,
                                         name=f"{v['tensor']}/MaxRowScale"),
                        helper.make_node("Div", [f"{v['tensor']}.max_scale", f"{v['tensor']}.max_scale"],
                                         [ones[a_scale]], name=f"{v['tensor']}/One")]
            a_scale, scaled = ones[a_scale], f"{tag}.unscaled"
        new += [
            helper.make_node("MatMulInteger", [v["tensor"], b_int, v["centre_u8"], b_zero], [f"{tag}.int32"],
                             name=f"{tag}/MatMulInteger"),
            helper.make_node("Cast", [f"{tag}.int32"], [f"{tag}.acc"], to=T.FLOAT, name=f"{tag}/CastAcc"),
            helper.make_node("Mul", [a_scale, b_scale], [f"{tag}.scales"], name=f"{tag}/Scales"),
            helper.make_node("Mul", [f"{tag}.acc", f"{tag}.scales"], [scaled], name=f"{tag}/ScaleAcc"),
        ]
        if a_scale != v["scale_tensor"]:  # the row scale after the fused matmul
            new.append(helper.make_node("Mul", [scaled, v["scale_tensor"]], [mm.output[0]], name=f"{tag}/RowScale"))
        if not const_zp:
            new += [
                helper.make_node("Mul", [row_zs[v["dequantized"]], sums], [f"{tag}.zero_point_term"],
                                 name=f"{tag}/ZeroPointTerm"),
                helper.make_node("Sub", [scaled, f"{tag}.zero_point_term"], [mm.output[0]],
                                 name=f"{tag}/SubZeroPointTerm"),
            ]
        replace[id(mm)] = new
        done += 1
    left += _token_readers_through_layout(g, tokens)
    if replace:
        nodes = [m for n in g.g.node for m in replace.get(id(n), [n])]
        del g.g.node[:]
        g.g.node.extend(nodes)
        g.refresh()
    return done, left


def _token_readers_through_layout(g: _Graph, tokens: dict) -> int:
    """Matmuls that read dequantized per-token codes through layout ops (a per-token Q or K split into heads):
    they stay float matmuls on the dequantized values (correct, slower), counted as left."""
    n = 0
    for name in tokens:
        todo = [c for c in g.consumers.get(name, []) if c.op_type in _LAYOUT_OPS]
        while todo:
            node = todo.pop()
            for c in g.consumers.get(node.output[0], []):
                if c.op_type == "MatMul":
                    n += 1
                elif c.op_type in _LAYOUT_OPS:
                    todo.append(c)
    return n


def _token_matmul_b(g: _Graph, mm, tag: str, sums_needed: bool = True):
    """The integer form of a per-token matmul's B operand (see :func:`_lower_token_matmuls`): ``(codes, scale,
    zero-point, scaled column sums, nodes, initializers)``, or ``None`` when B is neither form. Without
    ``sums_needed`` (A's row zero-points are all 0) the column sums are not built and their name is ``None``."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    dq = g.producer.get(mm.input[1])
    w = g.array(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if w is not None:  # a constant weight
        ws = g.array(dq.input[1])
        wz = g.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if ws is None or w.ndim != 2 or w.dtype not in (np.int8, np.uint8):
            return None
        if ws.size > 1 and (ws.ndim != 1 or _attr(dq, "axis", 1) % 2 != 1 or ws.size != w.shape[1]):
            return None  # per-input-row weight scales cannot move after the integer matmul
        wz = np.zeros((), w.dtype) if wz is None else wz
        if wz.size > 1 and not (wz == wz.reshape(-1)[0]).all():
            return None
        zp, sums = f"{tag}.w_zero_point", f"{tag}.zero_point_sums" if sums_needed else None
        inits = [_int_tensor(np.array(wz.reshape(-1)[0], dtype=w.dtype), zp,
                             T.INT8 if w.dtype == np.int8 else T.UINT8)]
        if sums_needed:
            c = ws.astype(np.float64) * (w.astype(np.int64) - np.int64(wz.reshape(-1)[0])).sum(0)
            inits.append(numpy_helper.from_array(np.broadcast_to(c, (w.shape[1],)).astype(np.float32), sums))
        return dq.input[0], dq.input[1], zp, sums, [], inits
    found = _static_codes_through_layout(g, mm.input[1])
    if found is None:
        return None
    dq, chain = found
    codes, new = dq.input[0], []
    for k, n in enumerate(chain):  # the same layout ops on the integer codes
        out = f"{tag}.b_codes{k}"
        node = helper.make_node(n.op_type, [codes, *n.input[1:]], [out], name=f"{tag}/B{n.op_type}{k}")
        node.attribute.extend(n.attribute)
        new.append(node)
        codes = out
    if not sums_needed:
        return codes, dq.input[1], dq.input[2], None, new, []
    axes, sums = f"{tag}.b_reduce_axes", f"{tag}.b_sums"
    new += [
        helper.make_node("Cast", [codes], [f"{tag}.b_float"], to=T.FLOAT, name=f"{tag}/CastB"),
        helper.make_node("Cast", [dq.input[2]], [f"{tag}.b_zero_float"], to=T.FLOAT, name=f"{tag}/CastBZero"),
        helper.make_node("Sub", [f"{tag}.b_float", f"{tag}.b_zero_float"], [f"{tag}.b_centred"],
                         name=f"{tag}/CentreB"),
        helper.make_node("ReduceSum", [f"{tag}.b_centred", axes], [f"{tag}.b_colsum"], keepdims=1,
                         name=f"{tag}/ColumnSums"),
        helper.make_node("Mul", [f"{tag}.b_colsum", dq.input[1]], [sums], name=f"{tag}/ScaleColumnSums"),
    ]
    return codes, dq.input[1], dq.input[2], sums, new, [helper.make_tensor(axes, T.INT64, [1], [-2])]


def _dtype_name(dtype: int) -> str:
    from onnx import TensorProto as T

    return {T.INT4: "int4", T.UINT4: "uint4", T.INT8: "int8", T.UINT8: "uint8", T.INT16: "int16",
            T.UINT16: "uint16"}[dtype]


def _int_tensor(a: np.ndarray, name: str, dtype: int):
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    if dtype in (T.INT4, T.UINT4):
        return helper.make_tensor(name, dtype, list(a.shape), a.reshape(-1).astype(np.int32).tolist())
    return numpy_helper.from_array(np.ascontiguousarray(a), name)


def _fold_weight_transpose(g: _Graph, transposed: set[str]) -> int:
    """``DQ(int W) -> Transpose`` (the weight's only use) becomes ``DQ(int W^T)``."""
    from onnx import numpy_helper

    n_done = 0
    for dq in list(g.g.node):
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in g.inits:
            continue
        cons = g.consumers.get(dq.output[0], [])
        if len(cons) != 1 or cons[0].op_type != "Transpose" or dq.output[0] in g.outputs:
            continue
        tr = cons[0]
        init = g.inits[dq.input[0]]
        if len(g.consumers.get(init.name, [])) != 1:
            continue
        a = numpy_helper.to_array(init)
        perm = list(_attr(tr, "perm") or reversed(range(a.ndim)))
        new = _int_tensor(np.transpose(a, perm), init.name, init.data_type)
        init.CopyFrom(new)
        transposed.add(init.name)
        axis = _attr(dq, "axis")
        if axis is not None and g.inits[dq.input[1]].dims:
            for a_ in dq.attribute:
                if a_.name == "axis":
                    a_.i = perm.index(axis % len(perm))
        _set_input(g, tr.output[0], dq.output[0])
        g.g.node.remove(tr)
        g.refresh()
        n_done += 1
    return n_done


def _fold_smooth(g: _Graph) -> tuple[int, int]:
    """Smoothed pairs (:mod:`pegq.smooth`): ``MatMul(Div(DQ(codes of x m), m), Transpose?(Mul(DQ(int W'), 1/s)))``
    with ``m = 1/s`` becomes ``MatMul(DQ(codes), Transpose?(DQ(int W')))``: the per-dim scales cancel, so both
    matmul inputs are per-tensor / per-channel integers ORT fuses into its int8 kernels. Returns
    ``(folded, left)``; a smoothed weight whose matmul does not read a matching smoothed activation is left
    as is (correct, but a float matmul)."""
    folded, left = 0, 0
    for mul in [n for n in g.g.node if n.op_type == "Mul" and n.name.endswith("/SmoothMul")]:
        inv = g.array(mul.input[1])
        cur = mul
        cons = g.consumers.get(cur.output[0], [])
        if len(cons) == 1 and cons[0].op_type == "Transpose":
            cur = cons[0]
            cons = g.consumers.get(cur.output[0], [])
        ok = bool(cons) and inv is not None and all(c.op_type == "MatMul" and c.input[1] == cur.output[0]
                                                    for c in cons)
        rewire = []
        for mm in cons if ok else []:
            div = g.producer.get(mm.input[0])
            zshift = None
            if div is not None and div.name.endswith("/ShiftOut"):  # Add(Div(DQ, m), z)
                zshift = g.array(div.input[1])
                div = g.producer.get(div.input[0])
            m = g.array(div.input[1]) if div is not None and div.name.endswith("/SmoothOut") else None
            if m is None or m.shape != inv.shape or not np.allclose(m, inv, rtol=1e-5, atol=0):
                ok = False
                break
            delta = slot = None
            if zshift is not None:  # (D/m + z) diag(m) B' = D B' + (z m) B': W z moves into the bias
                delta = _shift_bias(g, mul, cur, zshift * m)
                slot = _bias_slot(g, mm)
                if delta is None or slot is None or slot[2].shape[-1:] != delta.shape:
                    ok = False
                    break
            rewire.append((mm, div.input[0], delta, slot))
        if not ok:
            left += 1
            continue
        for mm, dq_out, delta, slot in rewire:
            mm.input[0] = dq_out
            if delta is not None:
                _add_to_bias(g, mm, delta, slot)
        _set_input(g, mul.output[0], mul.input[0])
        g.g.node.remove(mul)
        g.refresh()
        folded += 1
    return folded, left


def _shift_bias(g: _Graph, mul, cur, zm: np.ndarray) -> np.ndarray | None:
    """``(z m) B'`` for the weight ``B' = Transpose(DQ(int W'))`` a smoothed matmul reads after the fold (None
    where the weight is not a 2-D ``Transpose`` of a constant ``DequantizeLinear``, which is then left unfolded)."""
    dq = g.producer.get(mul.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or cur is mul or cur.op_type != "Transpose":
        return None
    w, sc = g.array(dq.input[0]), g.array(dq.input[1])
    zp = g.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if w is None or sc is None or w.ndim != 2 or list(_attr(cur, "perm", [1, 0])) != [1, 0]:
        return None
    shape = [1, 1]
    if sc.ndim:
        shape[_attr(dq, "axis", 1) % 2] = -1
    wf = (w.astype(np.float64) - (0 if zp is None else zp.astype(np.float64).reshape(shape))) \
        * sc.astype(np.float64).reshape(shape)
    return (wf @ zm.astype(np.float64)).astype(np.float32)  # W' [out, in] @ (z m) [in] = (z m) B'


def _bias_slot(g: _Graph, mm) -> tuple | None:
    """``(Add node, input index, bias value)`` of the constant bias a matmul's output gets, or None."""
    cons = g.consumers.get(mm.output[0], [])
    if len(cons) != 1 or cons[0].op_type != "Add":
        return None
    k = next((i for i, n in enumerate(cons[0].input) if n != mm.output[0]), None)
    b = _constant(g, cons[0].input[k]) if k is not None else None
    return (cons[0], k, b) if b is not None else None


def _constant(g: _Graph, name: str) -> np.ndarray | None:
    """An initializer or Constant's value, through ``Identity`` nodes (the exporter ties equal initializers)."""
    n = g.producer.get(name)
    while n is not None and n.op_type == "Identity":
        name = n.input[0]
        n = g.producer.get(name)
    return g.array(name)


def _add_to_bias(g: _Graph, mm, delta: np.ndarray, slot: tuple) -> None:
    """Add ``delta`` to the constant bias of the matmul's output ``Add`` (``slot``, from :func:`_bias_slot`) as a
    new initializer."""
    from onnx import numpy_helper

    add, k, b = slot
    name = f"{mm.name or mm.output[0]}.shifted_bias"
    g.g.initializer.append(numpy_helper.from_array(
        (b.astype(np.float64) + np.broadcast_to(delta, b.shape)).astype(np.float32), name))
    add.input[k] = name


_MOVES = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Expand", "Tile", "Gather")


def _fold_gather(g: _Graph) -> int:
    """``Gather(DQ(int table), ids)`` becomes ``DQ(Gather(int table, ids))`` for per-tensor tables and for
    tables quantized per embedding dim (per-axis along the table's last axis, which stays the last axis of
    the gathered rows: the new DQ has ``axis=-1``). Per-row tables stay ``Gather(DQ(table))``.

    Not for int4/uint4 tables (ONNX Gather has no 4-bit types): those stay ``Gather(DQ(table))``."""
    from onnx import TensorProto as T
    from onnx import helper

    n_done = 0
    for dq in list(g.g.node):
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in g.inits:
            continue
        table = g.inits[dq.input[0]]
        per_dim = False
        if g.inits[dq.input[1]].dims:  # per-axis: only along the table's last axis
            rank = len(table.dims)
            if rank < 2 or _attr(dq, "axis", 1) % rank != rank - 1 or any(
                    _attr(c, "axis", 0) != 0 for c in g.consumers.get(dq.output[0], [])):
                continue
            per_dim = True
        if table.data_type in (T.INT4, T.UINT4):
            continue
        cons = g.consumers.get(dq.output[0], [])
        if not cons or any(c.op_type != "Gather" or c.input[0] != dq.output[0] for c in cons):
            continue
        if dq.output[0] in g.outputs:
            continue
        # ORT's QDQ propagation moves a DequantizeLinear past data-movement ops and, for an int8 one,
        # builds a QuantizeLinear it then rejects (output_dtype INT8 vs a uint8 zero-point): keep
        # lookups whose result is transposed/reshaped (MPNet's tiny relative-position table) as they are
        if any(c2.op_type in _MOVES for ga in cons for c2 in g.consumers.get(ga.output[0], [])):
            continue
        for k, ga in enumerate(cons):
            gathered = f"{dq.name}/gathered{k}"
            idx = list(g.g.node).index(ga)
            g.g.node.insert(idx + 1, helper.make_node(
                "DequantizeLinear", [gathered, *dq.input[1:]], [ga.output[0]], name=f"{dq.name}{k}",
                **({"axis": -1} if per_dim else {})))
            ga.input[0] = dq.input[0]
            ga.output[0] = gathered
        g.g.node.remove(dq)
        g.refresh()
        n_done += 1
    return n_done


def _piece_sizes(g: _Graph, cat, rank: int | None, shapes: dict) -> list[int] | None:
    """Sizes along the concat axis of a Concat's inputs: from shape inference, else (PEG groups) from the
    Split they come from through their QuantizeLinear/DequantizeLinear pair."""
    ax = _attr(cat, "axis")
    if rank:
        pieces = [shapes.get(i) for i in cat.input]
        if all(p is not None and len(p) == rank and isinstance(p[ax % rank], int) for p in pieces):
            return [p[ax % rank] for p in pieces]
    origin = []
    for i in cat.input:
        p = g.producer.get(i)
        while p is not None and p.op_type in ("DequantizeLinear", "QuantizeLinear"):
            p = g.producer.get(p.input[0])
        if p is None or p.op_type != "Split":
            return None
        src = i
        while g.producer[src].op_type in ("DequantizeLinear", "QuantizeLinear"):
            src = g.producer[src].input[0]
        origin.append((p, list(p.output).index(src)))
    split = origin[0][0]
    if any(o[0] is not split for o in origin) or [o[1] for o in origin] != list(range(len(origin))):
        return None
    if _attr(split, "axis", 0) != ax or len(split.output) != len(cat.input):
        return None
    sizes = g.array(split.input[1]) if len(split.input) > 1 and split.input[1] else None
    return None if sizes is None else [int(v) for v in sizes]


def _fold_split_concat(g: _Graph, shapes: dict[str, list]) -> int:
    """``Split(Concat(x_0..x_k))`` with the same pieces becomes ``x_0..x_k`` (PEG group tensors)."""
    n_done = 0
    for sp in list(g.g.node):
        if sp.op_type != "Split":
            continue
        cat = g.producer.get(sp.input[0])
        if cat is None or cat.op_type != "Concat" or len(cat.input) != len(sp.output):
            continue
        rank = len(shapes.get(cat.output[0]) or []) or None
        same_axis = _attr(cat, "axis") == _attr(sp, "axis", 0) or (
            rank is not None and _attr(cat, "axis") % rank == _attr(sp, "axis", 0) % rank)
        if not same_axis:
            continue
        sizes = g.array(sp.input[1]) if len(sp.input) > 1 and sp.input[1] else None
        pieces = _piece_sizes(g, cat, rank, shapes)
        if sizes is None or pieces is None or [int(v) for v in sizes] != pieces:
            continue
        for out, src in zip(sp.output, cat.input, strict=True):
            _set_input(g, out, src)
        g.g.node.remove(sp)
        g.refresh()
        n_done += 1
    return n_done


def _fold_split_add_concat(g: _Graph, shapes: dict[str, list]) -> int:
    """``Split(Add(Concat(a_i), Concat(b_i)))`` with matching pieces becomes ``Add(a_i, b_i)`` per piece
    (the PEG residual sum: per-group adds instead of concat, add, split)."""
    from onnx import helper

    n_done = 0
    for sp in list(g.g.node):
        if sp.op_type != "Split":
            continue
        add = g.producer.get(sp.input[0])
        if add is None or add.op_type != "Add" or len(g.consumers.get(add.output[0], [])) != 1:
            continue
        cats = [g.producer.get(i) for i in add.input]
        if any(c is None or c.op_type != "Concat" or len(c.input) != len(sp.output) for c in cats):
            continue
        if any(_attr(c, "axis") != _attr(sp, "axis", 0) for c in cats):
            continue
        sizes = g.array(sp.input[1]) if len(sp.input) > 1 and sp.input[1] else None
        if sizes is None:
            continue
        sizes = [int(v) for v in sizes]
        if any(_piece_sizes(g, c, len(shapes.get(c.output[0]) or []) or None, shapes) != sizes for c in cats):
            continue
        idx = list(g.g.node).index(add)
        for k, out in enumerate(sp.output):
            g.g.node.insert(idx + k, helper.make_node("Add", [cats[0].input[k], cats[1].input[k]], [out],
                                                      name=f"{add.name}/group{k}"))
        g.g.node.remove(sp)
        g.g.node.remove(add)
        g.refresh()
        n_done += 1
    return n_done


def _fold_add_chains(g: _Graph) -> int:
    """A chain of ``Add`` nodes summing >= 3 ``MatMul`` outputs (the K group products of a PEG input-split
    Linear) becomes one ``Sum``: one pass over the partial products instead of K-1."""
    from onnx import helper

    def leaves(node, out):
        for i in node.input:
            p = g.producer.get(i)
            if p is not None and p.op_type == "Add" and len(g.consumers.get(i, [])) == 1 and i not in g.outputs:
                leaves(p, out)
            else:
                out.append(i)
        return out

    def all_matmul(ins):
        return all(g.producer.get(i) is not None and g.producer[i].op_type == "MatMul" for i in ins)

    n_done = 0
    for node in list(g.g.node):
        if node.op_type != "Add":
            continue
        ins = leaves(node, [])
        if len(ins) < 3 or not all_matmul(ins):
            continue
        cons = g.consumers.get(node.output[0], [])
        if (len(cons) == 1 and cons[0].op_type == "Add" and node.output[0] not in g.outputs
                and all_matmul(leaves(cons[0], []))):
            continue  # a longer chain ends further down
        idx = list(g.g.node).index(node)
        g.g.node.insert(idx, helper.make_node("Sum", ins, [node.output[0]], name=f"{node.name}/Sum"))
        g.g.node.remove(node)
        g.refresh()
        n_done += 1
    return n_done


def _prune(model) -> None:
    """Drop nodes whose outputs nobody uses and initializers no node reads."""
    g = model.graph
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _value_shapes(model) -> dict[str, list]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return out


def lower(model, qm: QuantizedModel, weight_dtype: str = "int8") -> tuple[Any, dict]:
    """Markers -> QDQ, folds, opset 21; returns ``(model, quantizer info)``."""
    from onnx import helper

    if weight_dtype not in WEIGHT_DTYPES:
        raise ExportError(f"weight_dtype {weight_dtype!r} is unknown; allowed: {', '.join(WEIGHT_DTYPES)}")
    info: dict = {}
    _lower_markers(model, qm, info, weight_dtype)
    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    if "GroupNormalization" in ops:  # its semantics changed in opset 21
        raise ExportError("internal: GroupNormalization in the traced graph; cannot move it to opset 21")
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    g = _Graph(model.graph)
    transposed: set[str] = set()
    folds = {}
    folds["smooth"], folds["smooth_left"] = _fold_smooth(g)  # refreshes g after each change
    folds.update(transpose=_fold_weight_transpose(g, transposed), gather=_fold_gather(g))
    folds["token_matmul"], folds["token_matmul_left"] = _lower_token_matmuls(g, info)
    for v in info.values():
        if v["kind"] == "weight":
            v["transposed"] = v["tensor"] in transposed
            if v["transposed"]:
                v["shape"] = v["shape"][::-1]
    _prune(model)
    g = _Graph(model.graph)
    shapes = _value_shapes(model)
    folds["split_concat"] = _fold_split_concat(g, shapes)
    folds["split_add_concat"] = _fold_split_add_concat(g, shapes)
    _prune(model)
    g = _Graph(model.graph)
    folds["sum"] = _fold_add_chains(g)
    _prune(model)
    del model.graph.value_info[:]
    return model, {"quantizers": info, "folds": folds}


# --------------------------------------------------------------------------- the public entry point


def export_onnx(
    qm: QuantizedModel,
    path: str | os.PathLike,
    *,
    weight_dtype: str = "int8",
    check: bool = True,
    metadata: dict | None = None,
) -> dict:
    """Export the calibrated quantized model ``qm`` to a QDQ ONNX file at ``path`` (written atomically).

    PEG quantizers are rewritten into per-tensor ones first (on a copy; ``qm`` is left as is). Returns a
    summary: bytes on disk, number of activation/weight quantizers by integer type, folds applied,
    seconds taken. Raises :class:`ExportError` for models that cannot be exported.
    """
    import onnx

    t0 = time.perf_counter()
    em = prepare(qm)
    model = trace_to_onnx(em)
    model, low = lower(model, em, weight_dtype)
    input_names, output = model_io(em)
    meta = {
        "pegq.format": "qdq-v1",
        "pegq.family": em.family,
        "pegq.inputs": json.dumps(input_names),
        "pegq.output": output,
        "pegq.quantizers": json.dumps(low["quantizers"]),
        "pegq.peg_rewrite": json.dumps({b: {"layer": v["layer"], "groups": v["groups"], "sizes": v["sizes"],
                                            "permuted": v["permuted"],
                                            **({"outlier_split": True} if v.get("outlier_split") else {})}
                                        for b, v in (getattr(em, "peg_rewrite", None) or {}).items()}),
    }
    cfg = getattr(qm, "config", None)
    if cfg is not None and hasattr(cfg, "to_json"):
        meta["pegq.config"] = cfg.to_json()
    meta.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()})
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "pegq"
    if check:
        onnx.checker.check_model(model)
    data = model.SerializeToString()
    path = Path(path)
    atomic_write_bytes(path, data)
    kinds = Counter(f"{v['kind']}:{v['dtype']}" for v in low["quantizers"].values())
    risky = {k: v["pair_overflows"] for k, v in low["quantizers"].items()
             if v["kind"] == "weight" and v["dtype"] == "int8" and v.get("pair_overflows")}
    return {
        "path": str(path),
        "bytes": len(data),
        "quantizers": dict(sorted(kinds.items())),
        "peg_layers": len({v["layer"] for v in (getattr(em, "peg_rewrite", None) or {}).values()}),
        "peg_blocks": len(getattr(em, "peg_rewrite", None) or {}),
        "folds": low["folds"],
        # int8 weights with pairs of adjacent inputs that x86 CPUs without VNNI can saturate (ORT's result then
        # differs from the simulation there): weight -> number of such pairs
        "int8_pair_overflows": risky,
        "inputs": input_names,
        "output": output,
        "export_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- running it


def session(path, threads: int = 2, optimized_path: str | None = None, extra_outputs: Iterable[str] = ()):
    """An ONNX Runtime CPU session (``threads`` intra-op threads, all graph optimizations).

    ``extra_outputs`` adds intermediate tensors (e.g. ``QuantizeLinear`` outputs) as graph outputs.
    """
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    extra = list(extra_outputs)
    if extra:
        m = onnx.load(str(path))
        have = {o.name for o in m.graph.output}
        for name in extra:
            if name not in have:
                m.graph.output.add().name = name
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def metadata(path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for p in m.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


def kernel_report(path, threads: int = 2) -> dict:
    """Operator counts of the graph ONNX Runtime actually runs (after its QDQ fusions), and how many of
    them are int8 kernels (``MatMulIntegerToFloat``, ``QLinearMatMul``, ``MatMulInteger``, ``QGemm``...)."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "optimized.onnx"
        session(path, threads=threads, optimized_path=str(opt))
        m = onnx.load(str(opt))
    ops = Counter(n.op_type for n in m.graph.node)
    matmuls = sum(v for k, v in ops.items() if k in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm"))
    int8 = sum(v for k, v in ops.items() if k in INT8_KERNELS)
    return {"ops": dict(ops.most_common()), "int8_kernels": int8, "float_matmuls": matmuls}


def feeds(batch: dict, input_names: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for n in input_names:
        v = batch.get(n)
        if v is None and n == "token_type_ids":
            v = torch.zeros_like(batch["input_ids"])
        out[n] = (v.numpy() if torch.is_tensor(v) else np.asarray(v)).astype(np.int64)
    return out


def ort_predict(sess, loader, input_names: list[str], progress: bool = True, desc: str = "ORT eval"):
    """Logits and labels of an ORT session over a pegq data loader."""
    from tqdm.auto import tqdm

    logits, labels = [], []
    for b in tqdm(loader, desc=desc, disable=not progress, leave=False):
        logits.append(sess.run(None, feeds(b, input_names))[0])
        labels.append(b["labels"].numpy())
    return np.concatenate(logits), np.concatenate(labels)


class _Forced:
    """Activation quantizer replacement: record how far ORT's integer codes are from what the quantizer
    makes of *its* input, then continue with ORT's values (teacher forcing)."""

    def __init__(self, q: Quantizer, codes: np.ndarray, rows: dict):
        self.q, self.codes, self.rows = q, codes, rows

    def __call__(self, x):
        from ..quant import dequantize, quantize_to_int

        q = self.q
        xs = q.smooth_in(x)  # smoothed: the grid sees (x - z) * m
        if q.granularity.dynamic:  # per-row parameters of this very input, as ORT computes them
            s, z = q.token_qparams(xs)
        else:
            s, z = q.qparams()
            s, z = s.reshape(()), z.reshape(())
        z = torch.zeros_like(s) if q.symmetric else z
        want = quantize_to_int(xs, s, z, q.qmin, q.qmax)
        have = torch.from_numpy(self.codes.astype(np.int64))
        if tuple(have.shape) != tuple(want.shape):
            raise ExportError(f"{q.name}: ORT tensor {tuple(have.shape)} vs model {tuple(want.shape)}")
        diff = (have - want).abs()
        self.rows[q.name] = {
            "max_steps": int(diff.max()) if diff.numel() else 0,
            "frac_diff": float((diff > 0).float().mean()) if diff.numel() else 0.0,
            "elements": int(diff.numel()),
        }
        return q.unsmooth(dequantize(have, s, z).to(x.dtype))


@torch.no_grad()
def per_tensor_parity(qm: QuantizedModel, path, batch: dict, threads: int = 2) -> dict:
    """Compare ONNX Runtime with the simulated model at every quantizer of the exported file.

    ``qm`` is the model that was exported (for a PEG model, :func:`prepare` (qm): the rewritten copy,
    whose per-group quantizer names the file uses). Activations are compared **per tensor**: the simulated
    model runs with every activation quantizer fed ORT's own integer codes of the tensors before it
    (teacher forcing), and each quantizer reports how many quantization steps ORT's codes are from what
    it makes of its input -- differences do not accumulate from layer to layer, so a correct int8
    execution is within one step (float summation order) everywhere. Weights: the integers in the file
    against the quantizer's. Also returned: the free-running output difference (ORT vs simulated).
    """
    import onnx
    from onnx import numpy_helper

    from ..api import model_inputs

    meta = metadata(path)
    quant = meta["pegq.quantizers"]
    acts = {n: v for n, v in quant.items() if v["kind"] == "activation" and "#" not in n}
    input_names = meta["pegq.inputs"]
    sess = session(path, threads=threads, extra_outputs=[v["tensor"] for v in acts.values()])
    out_names = [o.name for o in sess.get_outputs()]
    got = dict(zip(out_names, sess.run(None, feeds(batch, input_names)), strict=True))
    qm.eval()
    free = qm(**model_inputs(batch))
    free = (free.logits if hasattr(free, "logits") else free[0]).float().numpy()
    rows: dict[str, dict] = {}
    patched = []
    try:
        for n, v in acts.items():
            q = qm.quantizers[n]
            codes = got[v["tensor"]].astype(np.int64) - v.get("code_shift", 0)  # symmetric per-token: uint8 + 128
            object.__setattr__(q, "forward", _Forced(q, codes, rows))
            patched.append(q)
        forced = qm(**model_inputs(batch))
    finally:
        for q in patched:
            q.__dict__.pop("forward", None)
    forced = (forced.logits if hasattr(forced, "logits") else forced[0]).float().numpy()
    missing = sorted(set(acts) - set(rows))
    weights = {}
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    for n, v in quant.items():
        if v["kind"] != "weight":
            continue
        q = qm.quantizers[n.split("#")[0]]
        owner = qm._weight_owner[n.split("#")[0]]
        want = weight_codes(q, owner.parametrizations.weight.original)
        have = numpy_helper.to_array(inits[v["tensor"]]).astype(np.int64)
        if v.get("transposed"):
            have = have.T
        shift = 128 if v["dtype"] == "uint8" and q.symmetric else 0  # uint8 storage of int8 weights
        weights[n] = {"max_steps": int(np.abs(have - want - shift).max()) if have.shape == want.shape else -1}
    final = got[out_names[0]]
    return {
        "tensors": rows,
        "weights": weights,
        "missing": missing,
        "max_steps": max((r["max_steps"] for r in rows.values()), default=0),
        "weight_max_steps": max((r["max_steps"] for r in weights.values()), default=0),
        "output_max_abs_diff": float(np.abs(final - free).max()),
        "forced_output_max_abs_diff": float(np.abs(final - forced).max()),
    }
