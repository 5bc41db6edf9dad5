"""Empirical bias correction of a calibrated quantized model (not in the paper; Nagel et al. 2019,
"Data-Free Quantization Through Weight Equalization and Bias Correction", section 4.2, empirical form).

Quantization error is not zero-mean at the output of a Linear layer when its input has a non-zero mean:
``E[W_q x_q] - E[W x] = W_q E[x_q] - W E[x]``. Transformer encoders make this large: the outlier
embedding dims the paper finds (section 3) are large *and* one-signed on every token, so the rounding
error of the weight columns that multiply them becomes a fixed offset of every output row. The offset is
removed by folding it into the bias:

    b <- b + W E[x] - W_q E[x_q]

where ``E[x]`` is the layer's mean input in the FP32 model and ``E[x_q]`` its mean input in the quantized
model (activations quantized, the earlier layers already corrected), both over the real tokens of the
correction sequences (padding dropped). Layers are corrected in forward order; layers that read the
same tensor (Q/K/V) share one forward pass, which stops right after them. Only biases change, so the
result exports and runs like the uncorrected model.

Measured (docs/results.md section 4, ``benchmarks/deploy_fidelity.py --bias-correction``): it does *not*
help the int8 deployment preset ``peg-outlier-gemm``. Dev-logit cosine to FP32 went 0.9955 -> 0.9945 on
MiniLM and 0.9871 -> 0.9364 on MPNet-base (simulated). The output error of these models is not a
per-channel constant: it comes with the few tokens that carry the huge activations (delimiters, paper
section 3), so the mean over all tokens is dominated by them, and one offset that cancels it on average
shifts every ordinary token. It is kept as an analysis tool, not used by any preset.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .adaround_model import _rows, _Stop, linear_weight_quantizers, run_batches, shared_input_groups
from .models.base import QuantizedModel


@torch.no_grad()
def _input_means(qm: QuantizedModel, modules: dict[str, nn.Linear], batches: list[dict],
                 stop: nn.Module | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """Mean input row of each of ``modules`` over the real tokens of ``batches`` (float64). With
    ``stop``, each forward pass ends right after that module."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(modules, 0)
    mask_box: list[torch.Tensor | None] = [None]
    handles = []

    def make_hook(name, mod):
        def hook(m, args, output):
            rows = _rows(args[0], mask_box[0])
            s = rows.double().sum(0)
            sums[name] = s if name not in sums else sums[name] + s
            counts[name] += rows.shape[0]
            if mod is stop:
                raise _Stop

        return hook

    for n, m in modules.items():
        handles.append(m.register_forward_hook(make_hook(n, m)))
    try:
        run_batches(qm, batches, mask_box, device)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if counts[n] == 0 and (stop is None or modules[n] is stop)]
    if missing:
        raise RuntimeError(f"{missing[0]}: the layer was never called during the forward pass")
    return {n: sums[n] / counts[n] for n in sums}


@torch.no_grad()
def correct_bias(qm: QuantizedModel, batches: list[dict], progress: bool = True, device="cpu") -> dict:
    """Empirical bias correction of every Linear with an enabled weight quantizer of a calibrated ``qm``
    (see the module docstring), in place. ``batches``: the correction sequences (e.g. from
    :func:`pegq.adaround_model.calibration_sequences`). Returns a report: per layer the norm of the
    output offset removed, relative to the norm of the layer's FP32 mean output."""
    from .peg import quantizers_off

    layers = linear_weight_quantizers(qm)
    if not layers:
        raise ValueError("no enabled weight quantizer on a Linear layer: bias correction has nothing to "
                         "correct (use a preset with quantized weights, e.g. w8a8)")
    t0 = time.perf_counter()
    with quantizers_off(qm):
        fp_means = _input_means(qm, layers, batches, device=device)
    per_layer = {}
    groups = shared_input_groups(qm, layers, batches[0], device)
    bar = tqdm(groups, desc="bias correction", disable=not progress, leave=False)
    for group in bar:
        # layers reading one tensor (Q/K/V) do not feed each other: one pass, stopped at the last of them
        mods = {n: layers[n] for n in group}
        qx = _input_means(qm, mods, batches, stop=mods[group[-1]], device=device)
        for n, lin in mods.items():
            w = lin.parametrizations.weight.original.detach().double()
            wq = lin.weight.detach().double()  # through the weight quantizer
            target = w @ fp_means[n].to(w.device)
            offset = target - wq @ qx[n].to(w.device)
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=w.device))
            ref = target + lin.bias.detach().double()
            lin.bias.add_(offset.to(lin.bias.dtype))
            per_layer[n] = {"offset_norm": float(offset.norm()),
                            "relative": float(offset.norm() / ref.norm().clamp_min(1e-12))}
    return {"layers": len(per_layer), "sequences": sum(int(b["input_ids"].shape[0]) for b in batches),
            "seconds": time.perf_counter() - t0, "per_layer": per_layer}
