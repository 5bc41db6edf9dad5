"""PEG rewritten into per-tensor operations (paper section 4, "can still be simulated on hardware that only
supports per-tensor operations").

Per-embedding-group (PEG) quantization gives each of K groups of embedding dims its own scale and
zero-point. Hardware (and ONNX Runtime's int8 kernels) only do per-tensor activations, so a calibrated
PEG model is rewritten, functionally equivalently, into a model where every activation quantizer is
per-tensor. In every encoder layer whose FFN input, output or residual sum is PEG-quantized:

1. **Permute** the FFN input: the output of the LayerNorm before the FFN is gathered with the layer's
   range-based permutation (``perm``), so that group ``g`` is the contiguous slice
   ``[g*d/K, (g+1)*d/K)``. The group slices are quantized each by a per-tensor quantizer that carries
   that group's calibrated scale/zero-point (``<input>.g{g}``), then concatenated again.
2. **First FFN Linear, input split**: its columns are permuted and split into K Linear layers
   (:class:`SplitInputLinear`, weights ``ffn.intermediate.g{g}.weight``) whose outputs are summed.
3. **Second FFN Linear, output split**: its rows are permuted; its output is split into K groups, each
   quantized per-tensor (``ffn.output.g{g}``), and concatenated before the residual sum. The K Linear
   layers of rows share their input and their per-tensor weight scale, so they are stored as one
   row-permuted Linear whose output is split (the same numbers as K separate layers, one matmul).
4. **Residual sum** (computed in the permuted order by the unchanged model code), quantized per group
   (``ffn.residual_sum.g{g}``), then **inverse-permuted** before the next LayerNorm, whose input is
   thus in the original order again: everything after it is untouched.

The other quantizers of the model (already per-tensor) stay as they are. Weight quantizers of the split
Linears copy the original ranges (per-tensor, or per-channel ranges sliced/permuted along), so the
integer weights are exactly the original ones.

Unquantized, the rewritten model computes the original function (up to FP32 summation order); quantized,
it computes the simulated PEG model (each group's values go through the same grid).

**FFN hidden activation with one outlier group** (``peg2po<M>`` on ``ffn.intermediate``, the second FFN
Linear's input; not in the paper): the second Linear becomes an :class:`OutlierSplitLinear`, a bulk
matmul on the whole, unmoved input, quantized per-tensor with the bulk group's range (``.g0``) and with
the outlier columns of its weight zeroed, plus a matmul on the M gathered outlier columns with their own
range (``.g1``). No permutation, no concat: the cost over per-tensor is one M-wide matmul and one add.
(The zeroed columns make the bulk matmul's clipped values at the outlier dims irrelevant, so this is
exactly the simulated PEG.) Other PEG layouts of that tensor are refused.

Applies to every adapter family, MobileBERT included: each of its FFN blocks (the one ``ffn_names(i)``
names and the stacked ``ffn.{j}`` before it) has the same shape at the bottleneck width, a normalisation
(LayerNorm or the elementwise ``NoNorm``, both permutation-equivariant) before and after it, and an input
consumed only by the FFN and its residual sum. PEG anywhere else cannot be rewritten this way and is
refused with a :class:`RewriteError` naming the quantizer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.base import QuantizedModel, _escape
from ..quant import PerChannel, PerEmbeddingGroup, PerTensor, Quantizer, QuantState


class RewriteError(ValueError):
    """A model that cannot be rewritten into per-tensor operations (the message says why)."""


# --------------------------------------------------------------------------- modules and hooks


class SplitInputLinear(nn.Module):
    """``y = sum_g linears[g](x_g) + bias`` with ``x_g`` the g-th slice of ``x``'s last dim (each slice as
    wide as ``linears[g].in_features``): a Linear whose input columns are split into K bias-free Linear
    layers (paper section 4); the bias is added once, after the sum."""

    def __init__(self, linears: list[nn.Linear], bias: torch.Tensor | None = None):
        super().__init__()
        self.linears = nn.ModuleList(linears)
        self.sizes = [int(lin.in_features) for lin in linears]
        self.in_features = sum(self.sizes)
        self.out_features = linears[0].out_features
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def groups(self) -> int:
        return len(self.linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(self.sizes, dim=-1)
        y = self.linears[0](parts[0])
        for lin, p in zip(self.linears[1:], parts[1:], strict=True):
            y = y + lin(p)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}"


class OutlierSplitLinear(nn.Module):
    """``y = bulk(Q_0(x)) + outliers(Q_1(x[..., index])) + bias``: a Linear whose input is quantized
    per-embedding-group with one small outlier group (PEG ``peg2po<M>``, not in the paper), written as two
    per-tensor quantized matmuls without moving the input. ``bulk`` takes the whole input, quantized with
    the bulk group's range, and has the outlier columns of its weight set to zero, so whatever ``Q_0``
    clips there is multiplied by 0; ``outliers`` takes only the gathered outlier columns (``index``), with
    their own range. The quantizers are applied here (``qm.act``), not by hooks."""

    def __init__(self, qm: QuantizedModel, names: list[str], bulk: nn.Linear, outliers: nn.Linear,
                 index: torch.Tensor):
        super().__init__()
        self.bulk, self.outliers = bulk, outliers
        self.register_buffer("index", index.to(torch.long).clone())
        object.__setattr__(self, "qm", qm)  # not a submodule: the QuantizedModel owns this module
        self.names = list(names)
        self.in_features, self.out_features = bulk.in_features, bulk.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bulk(self.qm.act(self.names[0], x))
        return y + self.outliers(self.qm.act(self.names[1], x.index_select(-1, self.index)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, outliers={self.index.numel()}"


def permute_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[..., index]``, written as transpose -> row gather -> transpose: the same values, but exported
    to ONNX as ``Transpose, Gather(axis=0), Transpose``, which ONNX Runtime runs ~10x faster than a
    ``Gather`` along the last axis (measured on [1024, 768] float32)."""
    d = int(index.numel())  # a constant in a trace, so ONNX shape inference keeps the last dim
    lead = x.shape[:-1]
    rows = x.reshape(-1, d).t()
    return rows.index_select(0, index.to(x.device)).t().reshape(*lead, d)


def _group_quant(qm: QuantizedModel, names: list[str], sizes: list[int], x: torch.Tensor) -> torch.Tensor:
    if not names:
        return x
    if len(names) == 1:
        return qm.act(names[0], x)
    parts = x.split(sizes, dim=-1)
    return torch.cat([qm.act(n, p) for n, p in zip(names, parts, strict=True)], dim=-1)


class _PermuteGroupsHook:
    """Forward hook (LayerNorm before the FFN): permute the output, quantize each group per-tensor."""

    def __init__(self, qm: QuantizedModel, names: list[str], sizes: list[int], perm: torch.Tensor | None):
        self.qm, self.names, self.sizes, self.perm = qm, list(names), list(sizes), perm
        self.name = names[0] if names else None

    def __call__(self, module, args, output):
        if self.perm is not None:
            output = permute_last(output, self.perm)
        return _group_quant(self.qm, self.names, self.sizes, output)


class _GroupsHook:
    """Forward hook (second FFN Linear): quantize each group of the (permuted) output per-tensor."""

    def __init__(self, qm: QuantizedModel, names: list[str], sizes: list[int]):
        self.qm, self.names, self.sizes = qm, list(names), list(sizes)
        self.name = names[0] if names else None

    def __call__(self, module, args, output):
        return _group_quant(self.qm, self.names, self.sizes, output)


class _GroupsInversePermuteHook:
    """Forward pre-hook (LayerNorm after the FFN): quantize each group of the permuted residual sum
    per-tensor, then restore the original order of the embedding dims."""

    def __init__(self, qm: QuantizedModel, names: list[str], sizes: list[int], inv_perm: torch.Tensor | None):
        self.qm, self.names, self.sizes, self.inv_perm = qm, list(names), list(sizes), inv_perm
        self.name = names[0] if names else None

    def __call__(self, module, args):
        x = _group_quant(self.qm, self.names, self.sizes, args[0])
        if self.inv_perm is not None:
            x = permute_last(x, self.inv_perm)
        return (x, *args[1:])


# --------------------------------------------------------------------------- inspection helpers


def _hooks_named(qm: QuantizedModel, name: str) -> list[tuple[nn.Module, dict, int]]:
    """``(module, hooks dict, hook id)`` of every forward (pre-)hook that applies quantizer ``name``."""
    found = []
    for m in qm.model.modules():
        for d in (m._forward_hooks, m._forward_pre_hooks):
            for hid, h in d.items():
                if getattr(h, "qm", None) is qm and getattr(h, "name", None) == name:
                    found.append((m, d, hid))
    return found


def _one_hook(qm: QuantizedModel, name: str, what: str) -> tuple[nn.Module, dict, int]:
    hooks = _hooks_named(qm, name)
    if len(hooks) != 1:
        raise RewriteError(
            f"{name}: expected one hook placing this quantizer ({what}), found {len(hooks)}; "
            f"the {qm.family} adapter does not have the FFN layout the PEG rewrite needs"
        )
    return hooks[0]


def _parent_of(root: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for m in root.modules():
        for attr, c in m._modules.items():
            if c is child:
                return m, attr
    raise RewriteError(f"cannot find the parent of {type(child).__name__} in the model")


def _remove_quantizer(qm: QuantizedModel, name: str) -> None:
    for _m, d, hid in _hooks_named(qm, name):
        del d[hid]
    qm._qdict.pop(name, None)
    qm._kinds.pop(name, None)
    qm._weight_owner.pop(name, None)
    key = _escape(name)
    if key in qm.quantizer_modules:
        del qm.quantizer_modules[key]


def is_peg(q: Quantizer) -> bool:
    return q.enabled and isinstance(q.granularity, PerEmbeddingGroup)


def _perm_of(q: Quantizer, d: int) -> torch.Tensor:
    return q.perm.detach().to("cpu", torch.long).clone() if q.perm is not None else torch.arange(d)


def _check_frozen(q: Quantizer) -> None:
    if q.enabled and (q.state != QuantState.FROZEN or (q.x_min is None and q.scale_param is None)):
        raise RewriteError(
            f"{q.name}: the quantizer is {q.state.value}, not calibrated and frozen; run pegq.calibrate "
            f"(or `pegq ptq`) before rewriting/exporting"
        )


def _ranges(q: Quantizer) -> dict[str, torch.Tensor | None]:
    """The tensors that define a frozen quantizer's grid (``None`` where unset)."""
    return {k: getattr(q, k, None) for k in ("x_min", "x_max", "scale_param", "zero_param", "round_offset")}


def _new_like(q: Quantizer, name: str, granularity, pick=None, pick_offset=None) -> dict:
    """Settings + range tensors for a quantizer derived from ``q`` (``pick`` indexes the per-pair
    tensors, ``pick_offset`` the AdaRound offsets)."""
    r = _ranges(q)
    out = {}
    for k in ("x_min", "x_max", "scale_param", "zero_param"):
        v = r[k]
        if v is not None:
            v = v.detach()
            out[k] = (v if pick is None else pick(v)).clone()
    if r["round_offset"] is not None:
        v = r["round_offset"].detach()
        out["round_offset"] = (v if pick_offset is None else pick_offset(v)).clone()
    return {"name": name, "granularity": granularity, "tensors": out}


def _install(q: Quantizer, src: Quantizer, granularity, tensors: dict) -> None:
    """Configure ``q`` like ``src`` with ``granularity`` and the given range tensors, frozen."""
    q.configure(
        bits=src.bits,
        symmetric=src.symmetric,
        granularity=granularity,
        estimator=src.estimator.kind,
        momentum=src.estimator.momentum,
    )
    for k, v in tensors.items():
        if k in ("scale_param", "zero_param"):
            setattr(q, k, nn.Parameter(v, requires_grad=False))
        else:
            setattr(q, k, v)
    q._qcache = None
    q.state = QuantState.FROZEN


def _group_points(qm: QuantizedModel, name: str, k: int) -> list[str]:
    """Per-tensor quantizers replacing ``name``: its K group quantizers ``<name>.g{g}`` (each carrying its
    group's calibrated range) for PEG, ``[name]`` if per-tensor, none if off."""
    q = qm._qdict[name]
    if not q.enabled:
        return []
    if not is_peg(q):
        return [name]
    names = []
    for g in range(k):
        gname = f"{name}.g{g}"
        spec = _new_like(q, gname, PerTensor(), pick=lambda v, g=g: v[g : g + 1])
        _install(qm.add_point(gname), q, PerTensor(), spec["tensors"])
        names.append(gname)
    return names


def _replace_module(qm: QuantizedModel, old: nn.Module, new: nn.Module, drop_hook: str | None = None) -> None:
    """Put ``new`` where ``old`` is in the model; ``old``'s forward (pre-)hooks follow it, except the hook
    placing quantizer ``drop_hook``."""
    for src, dst in ((old._forward_pre_hooks, new._forward_pre_hooks), (old._forward_hooks, new._forward_hooks)):
        for hid, h in list(src.items()):
            if drop_hook is None or getattr(h, "name", None) != drop_hook:
                dst[hid] = h
    parent, attr = _parent_of(qm.model, old)
    setattr(parent, attr, new)


# --------------------------------------------------------------------------- planning


def _block(qm: QuantizedModel, i: int, order: int, names: dict) -> dict:
    out_name = names["output"]
    if not out_name.endswith(".output"):
        raise RewriteError(f"{out_name}: unexpected FFN output name")
    base = out_name[: -len(".output")]
    w1, w2 = base + ".intermediate.weight", out_name + ".weight"
    for w in (w1, w2):
        if w not in qm._weight_owner:
            raise RewriteError(f"layer {i}: weight quantizer {w} not found; cannot locate the FFN Linears")
    return {**names, "block": base, "layer": i, "order": order, "w1": w1, "w2": w2,
            "lin1": qm._weight_owner[w1], "lin2": qm._weight_owner[w2]}


def _ffn_blocks(qm: QuantizedModel, i: int) -> list[dict]:
    """The FFN blocks of layer ``i``: ``ffn_names(i)``, preceded on MobileBERT by the stacked FFNs
    ``ffn.{j}`` (input: ``attn.layernorm`` for the first, else the previous FFN's ``layernorm``)."""
    p = f"encoder.layer.{i}."
    blocks = []
    j = 0
    while f"{p}ffn.{j}.output" in qm._qdict and f"{p}ffn.{j}.residual_sum" in qm._qdict:
        src = f"{p}attn.layernorm" if j == 0 else f"{p}ffn.{j - 1}.layernorm"
        blocks.append(_block(qm, i, j, {"input": src, "output": f"{p}ffn.{j}.output",
                                        "residual_sum": f"{p}ffn.{j}.residual_sum"}))
        j += 1
    blocks.append(_block(qm, i, j, qm.ffn_names(i)))
    return blocks


def peg_plan(qm: QuantizedModel) -> dict[str, dict]:
    """Which FFN blocks need the rewrite (keyed by block, e.g. ``encoder.layer.3.ffn``), with their groups
    and shared permutation.

    Raises :class:`RewriteError` for PEG quantizers the per-tensor rewrite cannot express, PEG groups or
    permutations that differ within one FFN block, and quantizers that are not calibrated and frozen.
    """
    if getattr(qm, "_pegq_rewritten", False):
        raise RewriteError("this model is already rewritten into per-tensor operations")
    ffn_roles: dict[str, tuple[str, str]] = {}
    hidden: dict[str, dict] = {}  # FFN hidden activation (the second Linear's input) -> its block
    layouts = {}
    for i in range(qm.num_layers):
        try:
            blocks = _ffn_blocks(qm, i)
        except (KeyError, ValueError) as e:
            raise RewriteError(str(e)) from None
        for lay in blocks:
            layouts[lay["block"]] = lay
            for role in ("input", "output", "residual_sum"):
                ffn_roles.setdefault(lay[role], (lay["block"], role))
            hidden[lay["block"] + ".intermediate"] = lay
    plan: dict[str, dict] = {}
    outlier_plan: dict[str, dict] = {}
    for n, q in qm.quantizers.items():
        if not q.enabled:
            continue
        _check_frozen(q)
        g = q.granularity
        if qm.kind(n) == "weight":
            if not isinstance(g, PerTensor | PerChannel):
                raise RewriteError(
                    f"{n}: {g.describe()} weights have no per-tensor form; use per-tensor or per-channel weights"
                )
            continue
        if isinstance(g, PerTensor):
            continue
        if not isinstance(g, PerEmbeddingGroup):
            raise RewriteError(
                f"{n}: {g.describe()} activation quantization needs one scale per embedding dim, which "
                f"per-tensor hardware cannot do; use PEG (peg<K>[p]) on the FFN tensors or per-tensor"
            )
        if n in hidden:
            if g.groups != 2 or not g.outliers:
                raise RewriteError(
                    f"{n}: PEG on the FFN hidden activation is rewritable only with one outlier group "
                    f"(peg2po<M>, e.g. peg2po16: a 2-way split of the second FFN Linear), not {g.describe()}"
                )
            try:
                g.sizes(hidden[n]["lin2"].in_features)
            except ValueError as e:
                raise RewriteError(f"{n}: {e}") from None
            outlier_plan[n] = {"layout": hidden[n], "q": q}
            continue
        if n not in ffn_roles:
            raise RewriteError(
                f"{n}: PEG is only rewritable into per-tensor operations on a layer's FFN input, output "
                f"and residual sum (paper section 4: split the FFN Linears) and, with one outlier group "
                f"(peg2po<M>), on the FFN hidden activation; set this quantizer per-tensor"
            )
        b, role = ffn_roles[n]
        p = plan.setdefault(b, {"layout": layouts[b], "peg": {}})
        p["peg"][role] = q
    for b, p in plan.items():
        d = p["layout"]["lin1"].in_features  # the FFN's width (MobileBERT: its bottleneck width)
        qs = list(p["peg"].values())
        k = qs[0].granularity.groups
        outl = qs[0].granularity.outliers
        perm = _perm_of(qs[0], d)
        for q in qs[1:]:
            if (q.granularity.groups, q.granularity.outliers) != (k, outl):
                raise RewriteError(
                    f"{b}: PEG groups differ within the FFN block ({qs[0].name}: "
                    f"{qs[0].granularity.describe()}, {q.name}: {q.granularity.describe()}); the rewrite "
                    f"splits the block once, so use one K (and outlier group) for the block"
                )
            if not torch.equal(_perm_of(q, d), perm):
                raise RewriteError(
                    f"{b}: {qs[0].name} and {q.name} use different permutations; the rewrite needs "
                    f"the shared per-layer permutation that pegq.calibrate computes (paper section 4)"
                )
        try:
            sizes = qs[0].granularity.sizes(d)
        except ValueError as e:
            raise RewriteError(f"{b}: {e}") from None
        p["groups"], p["width"], p["sizes"] = k, d, sizes
        p["perm"] = None if torch.equal(perm, torch.arange(d)) else perm
    for n, p in outlier_plan.items():
        d = p["layout"]["lin2"].in_features
        plan[n] = {**p, "outlier_split": True, "groups": 2, "width": d,
                   "sizes": p["q"].granularity.sizes(d), "perm": _perm_of(p["q"], d)}
    for p in plan.values():  # the Linears the rewrite splits must not carry smoothing column scales
        for w in ("w2",) if p.get("outlier_split") else ("w1", "w2"):
            wname = p["layout"][w]
            wq = qm._qdict[wname]
            if wq.enabled and wq.smooth is not None:
                raise RewriteError(f"{wname}: smoothed weights (an sq<alpha> FFN input) cannot be split by the "
                                   f"PEG rewrite; use PEG or smoothing on this FFN block, not both")
    return plan


# --------------------------------------------------------------------------- the rewrite


def _rewrite_block(qm: QuantizedModel, p: dict) -> dict:
    lay, k, perm, d, sizes = p["layout"], p["groups"], p["perm"], p["width"], p["sizes"]
    starts = [sum(sizes[:g]) for g in range(k)]
    inv = torch.argsort(perm) if perm is not None else None
    qd = qm._qdict

    # 1. FFN input: permute + per-group quantize at the normalisation's output (replaces its hook)
    in_name = lay["input"]
    m_in, d_in, hid_in = _one_hook(qm, in_name, "output of the normalisation before the FFN")
    if m_in._forward_hooks is not d_in:
        raise RewriteError(f"{in_name}: expected an output hook on the module before the FFN")
    in_points = _group_points(qm, in_name, k)
    d_in[hid_in] = _PermuteGroupsHook(qm, in_points, sizes, perm)

    # 2. first Linear: split its (permuted) input columns into K Linear layers
    lin1: nn.Linear = lay["lin1"]
    q1 = qd[lay["w1"]]
    w1 = lin1.parametrizations.weight.original.detach()
    if perm is not None:
        w1 = w1.index_select(1, perm)
    linears = []
    for g in range(k):
        lin = nn.Linear(sizes[g], lin1.out_features, bias=False).to(device=w1.device, dtype=w1.dtype)
        with torch.no_grad():
            lin.weight.copy_(w1[:, starts[g] : starts[g] + sizes[g]])
        linears.append(lin)
    split = SplitInputLinear(linears, lin1.bias).train(lin1.training)
    for g, lin in enumerate(linears):
        gname = lay["w1"][: -len(".weight")] + f".g{g}.weight"
        nq = qm.add_weight(gname, lin)
        if q1.enabled:
            sl = slice(starts[g], starts[g] + sizes[g])
            cols = perm[sl] if perm is not None else torch.arange(d)[sl]
            gran = q1.granularity
            per_col = isinstance(gran, PerChannel) and gran.axis in (1, -1)
            spec = _new_like(
                q1, gname, gran,
                pick=(lambda v, c=cols: v.index_select(0, c.to(v.device))) if per_col else None,
                pick_offset=lambda v, c=cols: v.index_select(1, c.to(v.device)),
            )
            _install(nq, q1, gran, spec["tensors"])
    _replace_module(qm, lin1, split)  # hooks on the old module (none in the stock adapters) follow it
    _remove_quantizer(qm, lay["w1"])

    # 3. second Linear: permute its rows, quantize its output per group
    lin2: nn.Linear = lay["lin2"]
    q2 = qd[lay["w2"]]
    if perm is not None:
        with torch.no_grad():
            orig = lin2.parametrizations.weight.original
            orig.copy_(orig.index_select(0, perm.to(orig.device)))
            if lin2.bias is not None:
                lin2.bias.copy_(lin2.bias.index_select(0, perm.to(lin2.bias.device)))
        if q2.enabled:
            gran = q2.granularity
            per_row = isinstance(gran, PerChannel) and gran.axis in (0, -2)
            r = _ranges(q2)
            with torch.no_grad():
                if per_row:
                    for kname in ("x_min", "x_max", "scale_param", "zero_param"):
                        v = r[kname]
                        if v is not None:
                            v.data = v.data.index_select(0, perm.to(v.device))
                if r["round_offset"] is not None:
                    q2.round_offset = r["round_offset"].index_select(0, perm.to(r["round_offset"].device))
            q2._qcache = None
    out_name = lay["output"]
    out_points = _group_points(qm, out_name, k)
    if qd[out_name].enabled:
        m_out, d_out, hid_out = _one_hook(qm, out_name, "output of the second FFN Linear")
        if m_out is not lin2 or d_out is not lin2._forward_hooks:
            raise RewriteError(f"{out_name}: expected an output hook on the second FFN Linear")
        d_out[hid_out] = _GroupsHook(qm, out_points, sizes)
    # 4. residual sum: per-group quantize, then inverse-permute before the normalisation
    res_name = lay["residual_sum"]
    m_res, d_res, hid_res = _one_hook(qm, res_name, "input of the normalisation after the FFN")
    if m_res._forward_pre_hooks is not d_res:
        raise RewriteError(f"{res_name}: expected an input hook on the normalisation after the FFN")
    res_points = _group_points(qm, res_name, k)
    d_res[hid_res] = _GroupsInversePermuteHook(qm, res_points, sizes, inv)

    order = {}
    for name, points in ((in_name, in_points), (out_name, out_points), (res_name, res_points)):
        if is_peg(qd[name]):
            _remove_quantizer(qm, name)
            order[name] = points
    order[lay["w1"]] = [lay["w1"][: -len(".weight")] + f".g{g}.weight" for g in range(k)]
    return {"layer": lay["layer"], "groups": k, "sizes": sizes, "permuted": perm is not None, "perm": perm, "width": d,
            "points": {"input": in_points, "output": out_points, "residual_sum": res_points}, "replaced": order}


def _rewrite_outlier_split(qm: QuantizedModel, name: str, p: dict) -> dict:
    """PEG ``peg2po<M>`` on the FFN hidden activation ``name`` -> :class:`OutlierSplitLinear` in place of
    the second FFN Linear (its hooks move along)."""
    lay, d, sizes = p["layout"], p["width"], p["sizes"]
    index = p["perm"][sizes[0]:].clone()  # the outlier group: the last slice of the permutation
    lin2: nn.Linear = lay["lin2"]
    qw = qm._qdict[lay["w2"]]
    gran = qw.granularity
    if isinstance(gran, PerChannel) and gran.axis % 2 == 1:
        raise RewriteError(f"{lay['w2']}: per-input-channel weights cannot be split by columns here; use "
                           f"per-tensor or per-output-channel (channel0) weights")
    w = lin2.parametrizations.weight.original.detach()
    bulk = nn.Linear(d, lin2.out_features, bias=lin2.bias is not None).to(device=w.device, dtype=w.dtype)
    outl = nn.Linear(sizes[1], lin2.out_features, bias=False).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        wb = w.clone()
        wb[:, index.to(w.device)] = 0.0
        bulk.weight.copy_(wb)
        if lin2.bias is not None:
            bulk.bias.copy_(lin2.bias.detach())
        outl.weight.copy_(w.index_select(1, index.to(w.device)))
    base = lay["w2"][: -len(".weight")]
    wnames = [f"{base}.g0.weight", f"{base}.g1.weight"]
    for wname, lin, cols in ((wnames[0], bulk, None), (wnames[1], outl, index)):
        nq = qm.add_weight(wname, lin)
        if not qw.enabled:
            nq.configure(bits=None)
            continue

        def pick_offset(v, c=cols):
            if c is None:  # the zeroed columns must stay exactly 0: no rounding up there
                v = v.clone()
                v[:, index.to(v.device)] = 0
                return v
            return v.index_select(1, c.to(v.device))

        spec = _new_like(qw, wname, gran, pick_offset=pick_offset)
        _install(nq, qw, gran, spec["tensors"])
    points = _group_points(qm, name, 2)
    split = OutlierSplitLinear(qm, points, bulk, outl, index).train(lin2.training)
    # DistilBERT places the hidden quantizer as a pre-hook of lin2: that one is replaced, not moved
    _replace_module(qm, lin2, split, drop_hook=name)
    _remove_quantizer(qm, name)
    _remove_quantizer(qm, lay["w2"])
    return {"layer": lay["layer"], "groups": 2, "sizes": sizes, "permuted": True, "perm": p["perm"],
            "width": d, "outlier_split": True, "points": {"hidden": points},
            "replaced": {name: points, lay["w2"]: wnames}}


def _restore_order(qm: QuantizedModel, replaced: dict[str, list[str]], old_order: list[str]) -> None:
    """Put new quantizers where the ones they replace were, so ``qm.quantizers`` stays in forward order."""
    new = {}
    for n in old_order:
        for m in replaced.get(n, [n]):
            if m in qm._qdict:
                new[m] = qm._qdict[m]
    for n, q in qm._qdict.items():
        new.setdefault(n, q)
    qm._qdict.clear()
    qm._qdict.update(new)


def rewrite_peg(qm: QuantizedModel, inplace: bool = False) -> QuantizedModel:
    """The calibrated PEG model ``qm`` with every PEG activation quantizer rewritten into per-tensor
    quantizers and split Linear layers (module docstring). A copy unless ``inplace``; a model without
    PEG quantizers comes back unchanged (still a copy unless ``inplace``).

    Afterwards ``qm.peg_rewrite`` maps each rewritten FFN block (``encoder.layer.{i}.ffn``; MobileBERT's
    stacked ``encoder.layer.{i}.ffn.{j}`` too; an outlier-split hidden activation by its quantizer name,
    with ``"outlier_split": True``) to ``{"layer", "groups", "sizes", "permuted", "perm",
    "width", "points"}`` (``points``: the per-tensor quantizers of its input, output and residual sum). The
    result is for inference and export: do not re-calibrate or re-configure it (its quantizer names
    changed), and do not ``unwrap`` it.
    """
    if not isinstance(qm, QuantizedModel):
        raise RewriteError(f"expected a calibrated pegq QuantizedModel, got {type(qm).__name__}")
    plan = peg_plan(qm)
    if not inplace:
        qm = copy.deepcopy(qm)
        plan = peg_plan(qm)
    info, replaced, old_order = {}, {}, list(qm._qdict)
    with torch.no_grad():
        # the permuted FFN blocks first: they permute the second Linear's rows in place, which the outlier
        # split of its input columns (after them) then copies
        for b, p in sorted(plan.items(), key=lambda kv: (bool(kv[1].get("outlier_split")),
                                                         kv[1]["layout"]["layer"], kv[1]["layout"]["order"])):
            info[b] = _rewrite_outlier_split(qm, b, p) if p.get("outlier_split") else _rewrite_block(qm, p)
            replaced.update(info[b].pop("replaced"))
    _restore_order(qm, replaced, old_order)
    qm.peg_rewrite = info
    qm._pegq_rewritten = bool(info)
    return qm


def per_tensor_only(qm: QuantizedModel) -> list[str]:
    """Names of enabled activation quantizers that are not per-tensor (empty after :func:`rewrite_peg`)."""
    return [n for n, q in qm.activation_quantizers().items() if q.enabled and not isinstance(q.granularity, PerTensor)]


__all__ = ["RewriteError", "SplitInputLinear", "is_peg", "peg_plan", "per_tensor_only", "rewrite_peg"]
