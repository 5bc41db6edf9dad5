"""GPTQ over a whole wrapped model (:mod:`pegq.quant.gptq`; not in the paper, an alternative to AdaRound).

Sequential, as in the GPTQ reference code: the Linear layers are taken in forward order, in groups that
read the same input tensor (a layer's query, key and value Linears); for each group

1. ``H = X^T X / n`` is accumulated over the calibration sequences (padding tokens dropped) from the inputs
   the group sees in the *quantized* model: earlier groups with their GPTQ weights, activation quantizers
   as configured (a W8A8 model's Linears see 8-bit inputs, so GPTQ fits the weights to those), this and
   later groups' weights as the calibrated round-to-nearest; a forward pass stops at the group;
2. each member's weight is rounded by :func:`pegq.quant.gptq.gptq_offset` on its calibrated grid, and the
   result is frozen into the weight quantizer (``Quantizer.round_offset``, as AdaRound does). Where GPTQ's
   proxy loss on the calibration rows is above round-to-nearest's (it is greedy; rare), nearest is kept
   (reported as ``kept``). With a scale search (default with ``GPTQConfig.pair_limit``), each row is rounded by
   :func:`pegq.quant.gptq.gptq_search` on the best of several multiples of its calibrated scale, and the weight
   quantizer's range is multiplied accordingly (kept in the resume state).

A smoothed weight (:mod:`pegq.smooth`) is rounded on its own grid, that of ``W diag(s)``, for the Hessian of
the smoothed input ``diag(1/s) H diag(1/s)``.

``asymmetric`` (not in the paper; the objective of GPTAQ, Li et al. 2025): fit the quantized layer to the
FP32 *model's* output of the layer, ``||X_fp W^T - X Q^T||^2`` with ``X_fp`` the layer's input in the FP32
model (every quantizer off), instead of ``||X W^T - X Q^T||^2``. The least-squares weight
``W* = W + W G (H + lambda I)^-1`` (``G = (X_fp - X)^T X``, :func:`asymmetric_target`) makes the two
objectives differ by a constant, so GPTQ rounds ``W*`` for ``H`` on the grid calibrated for ``W``. It costs a
second (FP32) pass per group. Measured (docs/results.md section 4): it lowers a layer's output error to FP32
on the calibration rows (MiniLM W8A8, layer 1 FFN input: 0.277 -> 0.088 relative). End to end it needs
many rows per input: MiniLM ``sq-gemm`` dev-logit cosine 0.9986 with 128 sequences and ``asym_damp`` 0.01
(plain GPTQ 0.9991), 0.9992 with 512 sequences and ``asym_damp`` 0.1; but MPNet ``sq-gemm`` falls to 0.9925
(plain GPTQ 0.9984), where the outlier tokens dominate ``G``. No preset uses it.

Then the enabled activation quantizers are re-calibrated (:func:`pegq.adaround_model.recalibrate_activations`),
since their ranges were estimated with round-to-nearest weights. Embedding tables keep round-to-nearest.
An interrupted run resumes after the last finished group (``state_dir``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .adaround_model import (
    _rows,
    _save_state,
    _Stop,
    run_batches,
    run_on_sequences,
    shared_input_groups,
    start_rounding,
    state_dir_for,
)
from .models.base import QuantizedModel
from .quant.adaround import _inv, nearest_offset
from .quant.gptq import GPTQConfig, Hessian, gptq_offset, gptq_search, nearest_codes

STATE_FILE = "gptq_state.pt"


@dataclass
class GPTQRun:
    """Model-level settings: the per-layer algorithm (:class:`GPTQConfig`) plus the data."""

    num_samples: int = 256  # calibration sequences
    batch_size: int = 32  # sequences per forward pass
    seed: int = 0
    cls_weight: float = 1.0  # weight of each sequence's first token ([CLS], what a classifier reads) in H
    # fit the quantized layer's output to the FP32 model's output of the layer (its FP32 input), not to the
    # output the FP32 weights would give on the quantized input (see the module docstring)
    asymmetric: bool = False
    asym_damp: float = 0.01  # ridge of the asymmetric least-squares target, a fraction of mean(diag H)
    layer: GPTQConfig = field(default_factory=GPTQConfig)
    # with layer.pair_limit: keep a layer's pair-limited rounding only where its proxy loss is at most
    # (1 + pair_tolerance) x that of GPTQ without the limit, else the unconstrained one (exact only as uint8:
    # `pegq export onnx --weight-dtype exact`); None: every layer limited
    pair_tolerance: float | None = None

    def __post_init__(self):
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"GPTQ needs at least one calibration sequence, got {self.num_samples!r}")
        if not self.cls_weight > 0:
            raise ValueError(f"GPTQ cls_weight must be > 0, got {self.cls_weight}")
        if self.batch_size < 1:
            raise ValueError(f"GPTQ batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.asym_damp < 1:
            raise ValueError(f"GPTQ asym_damp must be in (0, 1), got {self.asym_damp}")
        if self.pair_tolerance is not None:
            if self.layer.pair_limit is None:
                raise ValueError("GPTQ pair_tolerance needs a pair_limit (--gptq-pair-limit)")
            if not self.pair_tolerance >= 0:
                raise ValueError(f"GPTQ pair_tolerance must be >= 0, got {self.pair_tolerance}")

    def to_dict(self) -> dict:
        return asdict(self)


def _block_of(model: nn.Module, layers: dict[str, nn.Linear]) -> dict[str, nn.Module | None]:
    """For each Linear, the encoder block it sits in: its outermost ancestor that is an element of an
    ``nn.ModuleList`` (``encoder.layer.3`` in BERT, ``transformer.layer.3`` in DistilBERT, ...); None for
    Linears outside such a list (pooler, classifier head)."""
    mods = dict(model.named_modules())
    path = {id(m): n for n, m in mods.items()}
    out = {}
    for name, lin in layers.items():
        parts = path[id(lin)].split(".")
        prefixes = [".".join(parts[:k]) for k in range(2, len(parts))]
        out[name] = next((mods[p] for p in prefixes if isinstance(mods[p.rsplit(".", 1)[0]], nn.ModuleList)), None)
    return out


class _Hessians:
    """Input Hessians of a group's Linear, either from full forward passes of the model that stop at it, or
    (for a Linear inside an encoder block) from the block alone, re-run on its inputs cached once per block
    through the quantized model so far. ``asymmetric``: also the cross moment ``(X_fp - X)^T X`` of the
    FP32 model's input of the Linear with the quantized model's, from the same passes with every quantizer
    off (the FP32 block inputs cached likewise)."""

    def __init__(self, qm: QuantizedModel, batches: list[dict], device="cpu", cls_weight: float = 1.0,
                 asymmetric: bool = False):
        self.qm, self.batches, self.device, self.cls_weight = qm, batches, device, cls_weight
        self.asymmetric = asymmetric
        self.block: dict[bool, nn.Module | None] = {False: None, True: None}  # key: FP32 passes
        self.cache: dict[bool, list[tuple[tuple, dict, torch.Tensor | None]]] = {False: [], True: []}

    def _mode(self, fp: bool):
        from .peg import quantizers_off

        return quantizers_off(self.qm) if fp else contextlib.nullcontext()

    @torch.no_grad()
    def _cache_block(self, block: nn.Module, fp: bool) -> None:
        cache: list = []
        self.cache[fp], self.block[fp] = cache, None
        mask_box: list[torch.Tensor | None] = [None]

        def hook(mod, args, kwargs):
            cache.append((args, kwargs, mask_box[0]))
            raise _Stop

        h = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with self._mode(fp), parametrize.cached():
                run_batches(self.qm, self.batches, mask_box, self.device)
        finally:
            h.remove()
        self.block[fp] = block

    @torch.no_grad()
    def _inputs(self, module: nn.Linear, block: nn.Module | None, fp: bool, each) -> None:
        """``each(rows, row_weights)`` for every batch's input rows of ``module`` (padding dropped)."""
        mask_box: list[torch.Tensor | None] = [None]

        def hook(mod, args):
            x, mask = args[0], mask_box[0]
            r = None
            if self.cls_weight != 1.0 and x.ndim == 3 and mask is not None and mask.shape[:2] == x.shape[:2]:
                w = mask.to(torch.float64)  # a new tensor (another dtype)
                w[:, 0] *= self.cls_weight
                r = w[mask.bool()]
            each(_rows(x, mask), r)
            raise _Stop

        h = module.register_forward_pre_hook(hook)
        try:
            with self._mode(fp), parametrize.cached():
                if block is None:
                    run_batches(self.qm, self.batches, mask_box, self.device)
                else:
                    if block is not self.block[fp]:
                        self._cache_block(block, fp)
                    self.qm.eval()
                    for args, kwargs, mask in self.cache[fp]:
                        mask_box[0] = mask
                        try:
                            block(*args, **kwargs)
                        except _Stop:
                            pass
        finally:
            h.remove()

    def __call__(self, module: nn.Linear, block: nn.Module | None) -> tuple[Hessian, torch.Tensor | None]:
        """``H`` of the quantized model's input of ``module``, and (``asymmetric``) ``G = (X_fp - X)^T X``
        with the same row weights and normalisation (else None)."""
        hess = Hessian(module.in_features)
        rows: list[tuple[torch.Tensor, torch.Tensor | None]] = []

        def add(x, r):
            hess.add(x, r)
            if self.asymmetric:
                rows.append((x, r))

        self._inputs(module, block, False, add)
        if hess.rows == 0:
            raise RuntimeError(f"{type(module).__name__} was never called during the forward pass")
        if not self.asymmetric:
            return hess, None
        g = Hessian(module.in_features)  # the cross moment (X_fp - X)^T diag(r) X / sum(r)
        seen = [0]

        def cross(x, r):
            k = seen[0]
            if k >= len(rows) or rows[k][0].shape != x.shape:
                raise RuntimeError(f"{type(module).__name__}: the FP32 and the quantized forward passes gave "
                                   f"different input rows; asymmetric GPTQ needs them paired")
            xq, rq = rows[k]
            g.add(x.double() - xq.double(), rq, right=xq)
            seen[0] = k + 1

        self._inputs(module, block, True, cross)
        if seen[0] != len(rows):
            raise RuntimeError(f"{type(module).__name__}: the FP32 pass saw {seen[0]} batches, the quantized "
                               f"pass {len(rows)}")
        return hess, g.h


def asymmetric_target(w: torch.Tensor, h: torch.Tensor, g: torch.Tensor, damp: float) -> torch.Tensor:
    """The least-squares weight ``W* = W + W G (H + lambda I)^-1`` (``lambda = damp * mean(diag H)``): the
    weight whose output on the quantized input ``X`` is closest to the FP32 output ``X_fp W^T``. Since
    ``X_fp W^T - X W*^T`` is then orthogonal to ``X``'s columns, ``||X_fp W^T - X Q^T||^2 =
    ||X (W* - Q)^T||^2 + const`` for every ``Q``: GPTQ of ``W*`` for ``H`` minimises the asymmetric loss."""
    hd = h.to(dtype=torch.float64).clone()
    lam = damp * float(torch.diagonal(hd).mean())
    hd.diagonal().add_(lam if lam > 0 else 1e-12)
    wd = w.detach().to(device="cpu", dtype=torch.float64)
    rhs = g.to(torch.float64).T @ wd.T  # G^T W^T
    corr = torch.cholesky_solve(rhs, torch.linalg.cholesky(hd)).T  # W G (H + lambda I)^-1
    return (wd + corr).to(device=w.device, dtype=torch.float32)


def _guarded_gptq(target, w, s, z, q, h, cfg: GPTQConfig):
    """GPTQ of ``target`` on ``q``'s grid (``s``, ``z``; pair-limited when ``cfg.pair_limit`` is set) with a
    safeguard (as for AdaRound): never worse than (pair-limited) nearest of ``w`` on the calibration rows.
    ``(offset, info, None)``, ``info["kept"]`` saying which. With a scale search (``cfg.scale_grid()`` other
    than ``(1.0,)``, symmetric grids only): :func:`~pegq.quant.gptq.gptq_search` per row, ``(codes, info,
    multiplier)``; the caller rescales the quantizer (:func:`_rescale`) and takes the offset from its new grid."""
    if z is None and cfg.scale_grid() != (1.0,):
        code, mult, info = gptq_search(target, s, q.qmin, q.qmax, h, cfg, base=w, per_row=s.numel() > 1)
        info["kept"] = "nearest" if info["rows_nearest"] == 1 else "gptq"
        return code, info, mult
    offset, info = gptq_offset(target, s, z, q.qmin, q.qmax, h, cfg, base=w)
    info["kept"] = "gptq"
    if info["proxy_gptq"] > info["proxy_nearest"]:
        offset, info["kept"] = nearest_offset(w.float(), s).to(torch.int16), "nearest"
        if cfg.pair_limit is not None:
            v = w.float() * _inv(s)
            offset = (nearest_codes(v, q.qmin, q.qmax, cfg.pair_limit) - torch.floor(v)).to(torch.int16)
    return offset, info, None


def _rescale(q, mult: torch.Tensor) -> dict:
    """Multiply a weight quantizer's scale by ``mult`` (``[out, 1]`` per output row; all equal for a per-tensor
    scale) and return its new range (for the resume state)."""
    scale = q.qparams()[0]
    m = (mult if scale.numel() > 1 else mult[:1]).reshape(scale.shape).to(scale.device, scale.dtype)
    if q.scale_param is not None:
        with torch.no_grad():
            q.scale_param.mul_(m)
        return {"scale_param": q.scale_param.detach().clone()}
    q.x_min, q.x_max = q.x_min * m, q.x_max * m
    return {"x_min": q.x_min.clone(), "x_max": q.x_max.clone()}


def _set_range(q, saved: dict) -> None:
    if "scale_param" in saved:
        with torch.no_grad():
            q.scale_param.copy_(saved["scale_param"])
    else:
        q.x_min, q.x_max = saved["x_min"].clone(), saved["x_max"].clone()


def gptq_model(
    qm: QuantizedModel,
    batches: list[dict],
    run: GPTQRun | None = None,
    state_dir: str | Path | None = None,
    progress: bool = True,
    device="cpu",
) -> dict:
    """GPTQ every Linear weight of a calibrated ``qm`` (see the module docstring), on ``batches`` (e.g. from
    :func:`pegq.adaround_model.calibration_sequences`). Returns a report with one entry per layer (proxy loss of
    round-to-nearest and of GPTQ, share of changed integers, seconds) and totals."""
    run = run or GPTQRun()
    layers, st, state_dir = start_rounding(qm, run, state_dir, "GPTQ", STATE_FILE, smoothed_ok=True)
    quantizers, names = qm.quantizers, list(layers)
    ranges = st.setdefault("ranges", {})  # weight grids the scale search changed
    for n, saved in ranges.items():  # resumed: re-apply them
        _set_range(quantizers[n], saved)
    t0 = time.perf_counter()
    groups = shared_input_groups(qm, layers, batches[0], device)
    blocks = _block_of(qm.model, layers)
    hessians = _Hessians(qm, batches, device, run.cls_weight, run.asymmetric)
    todo = [g for g in groups if any(n not in st["done"] for n in g)]
    bar = tqdm(total=len(todo), desc="GPTQ", disable=not progress, mininterval=1.0)
    for g in todo:
        hess, cross = hessians(layers[g[0]], blocks[g[0]])
        for n in g:
            q, lin = quantizers[n], layers[n]
            w = lin.parametrizations.weight.original.detach()
            h = hess.h
            target = w if cross is None else asymmetric_target(w, h, cross, run.asym_damp)
            if q.smooth is not None:
                # smoothed (pegq.smooth): the grid holds W' = W diag(s) and the Linear's input is X = X' diag(s)
                # with X' the codes' scale, so W X^T = W' X'^T: round W' for H' = diag(1/s) H diag(1/s)
                sm = q.smooth.to(w.device, torch.float32)
                w, target = w.float() * sm, target.float() * sm
                h = h / sm.to(h.device)[:, None] / sm.to(h.device)[None, :]
            scale, zero = q.qparams()
            gran = q.granularity
            s = gran.broadcast(scale.detach(), w, q.group_index)
            z = None if q.symmetric else gran.broadcast(zero.detach(), w, q.group_index)
            limit = run.layer.pair_limit if z is None else None  # only a symmetric grid has int8 pair sums
            offset, info, mult = _guarded_gptq(target, w, s, z, q, h, replace(run.layer, pair_limit=limit))
            info["rows"] = hess.rows
            if limit is not None and run.pair_tolerance is not None:
                free, free_info, free_mult = _guarded_gptq(target, w, s, z, q, h,
                                                           replace(run.layer, pair_limit=None))
                info["proxy_unlimited"] = min(free_info["proxy_gptq"], free_info["proxy_nearest"])
                info["proxy_limited"] = min(info["proxy_gptq"], info["proxy_nearest"])
                if info["proxy_limited"] > (1 + run.pair_tolerance) * info["proxy_unlimited"]:
                    # the limit costs too much here: unconstrained (uint8 for an exact export)
                    offset, mult = free, free_mult
                    info = {**free_info, **{k: info[k] for k in ("rows", "proxy_unlimited", "proxy_limited")}}
                    limit = None
            info["pair_limited"] = limit is not None
            if mult is not None:  # searched: codes on the grid scale * mult
                ranges[n] = _rescale(q, mult)
                s = gran.broadcast(q.qparams()[0].detach(), w, q.group_index)
                offset = (offset - torch.floor(w.float() * _inv(s))).to(torch.int16)
            q.round_offset = offset.to(w.device)
            st["done"][n] = offset.cpu()
            st["info"][n] = info
        if state_dir is not None:
            _save_state(state_dir, st, STATE_FILE)
        bar.update(1)
        bar.set_postfix(layer=g[0], refresh=False)
    bar.close()
    infos = st["info"]
    return {
        "layers": len(names),
        "groups": len(groups),
        "settings": run.to_dict(),
        "seconds_this_run": time.perf_counter() - t0,
        "proxy_nearest_sum": sum(i["proxy_nearest"] for i in infos.values()),
        "proxy_gptq_sum": sum(i["proxy_gptq"] for i in infos.values()),
        "layers_improved": sum(i["proxy_gptq"] < i["proxy_nearest"] for i in infos.values()),
        "layers_kept_nearest": sum(i["kept"] == "nearest" for i in infos.values()),
        "layers_pair_limited": sum(bool(i.get("pair_limited")) for i in infos.values()),
        "per_layer": infos,
    }


def run_gptq(qm: QuantizedModel, task, tokenizer, run: GPTQRun, calib_batches: list[dict],
             output_dir: str | Path | None = None, progress: bool = True, device="cpu") -> dict:
    """The ``pegq ptq --gptq`` step after calibration: GPTQ on ``run.num_samples`` training sequences, then
    re-calibrate enabled activation quantizers on the PTQ calibration batches. Resumable through
    ``<output_dir>/.gptq-state`` (removed by the caller once results are written:
    ``pegq.adaround_model.clear_state(output_dir, "gptq")``)."""
    state = state_dir_for(output_dir, "gptq") if output_dir is not None else None
    return run_on_sequences(gptq_model, qm, task, tokenizer, run, calib_batches, state, progress, device)
