"""Range-based permutation for per-embedding-group (PEG) quantization (paper section 4).

Calibration data goes once through the unquantized model; for every embedding dim ``j`` the dynamic
range ``r_j = max(x[:, j]) - min(x[:, j])`` is recorded; ``argsort(r)`` split into K even slices gives
the groups, so the outlier dims end up together.

Sharing (paper section 4): FFN input (``attn.layernorm``), FFN output (``ffn.output``) and the residual
sum (``ffn.residual_sum``) of a layer use ONE permutation, computed from the ranges of the FFN output
("the outliers in the output dominate the ones from the input"). Any other permuted PEG quantizer gets
a permutation from its own tensor's ranges; so does a PEG FFN input whose layer has neither its FFN output
nor its residual sum PEG-quantized (the int8 deployment presets, where those stay float).
"""

from __future__ import annotations

import contextlib
import time

import torch

from .quant import PerEmbeddingGroup


def range_permutation(ranges: torch.Tensor) -> torch.Tensor:
    """Permutation of embedding dims sorted by ascending range (stable, deterministic)."""
    return torch.argsort(ranges, stable=True)


@contextlib.contextmanager
def quantizers_off(qm):
    saved = {n: q.bits for n, q in qm.quantizers.items()}
    try:
        for q in qm.quantizers.values():
            q.bits = None
        yield
    finally:
        for n, q in qm.quantizers.items():
            q.bits = saved[n]


def _permuted(qm) -> dict:
    return {
        n: q
        for n, q in qm.activation_quantizers().items()
        if q.enabled and isinstance(q.granularity, PerEmbeddingGroup) and q.granularity.permute
    }


@torch.no_grad()
def prepare_permutations(qm, batches, device="cpu") -> float:
    """Set the range-based permutation on every permuted PEG quantizer. Returns seconds spent."""
    from .api import _to_device, model_inputs

    targets = _permuted(qm)
    if not targets:
        return 0.0
    t0 = time.perf_counter()
    # which tensor decides each target's permutation
    source: dict[str, str] = {}
    for i in range(qm.num_layers):
        names = qm.ffn_names(i)
        group = [names["input"], names["output"], names["residual_sum"]]
        if not any(n in targets for n in group[1:]):
            continue  # PEG on the FFN input alone (int8 deployment presets): its own widest dims
        for n in group:
            if n in targets:
                source[n] = names["output"]
    for n in targets:
        source.setdefault(n, n)
    needed = sorted(set(source.values()))
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}
    with quantizers_off(qm), qm.capture(needed) as store:
        for b in batches:
            qm(**model_inputs(_to_device(b, device)))
            for n in needed:
                for x in store[n]:
                    x = x.reshape(-1, x.shape[-1])
                    mn, mx = x.amin(0), x.amax(0)
                    lo[n] = mn if n not in lo else torch.minimum(lo[n], mn)
                    hi[n] = mx if n not in hi else torch.maximum(hi[n], mx)
                store[n].clear()
    perms = {n: range_permutation(hi[n] - lo[n]) for n in needed}
    for n, q in targets.items():
        q.set_permutation(perms[source[n]])
    return time.perf_counter() - t0
