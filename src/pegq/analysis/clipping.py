"""Where a calibrated model's activation quantization error comes from: rounding or clipping (not in the paper).

A calibrated range is estimated on a few calibration sequences. On other data some values fall outside it
and are clipped to the grid's ends: an error that can be many quantization steps, against at most half a
step for rounding. :func:`clipping_report` runs held-out batches through a calibrated
:class:`~pegq.models.QuantizedModel` and splits each enabled activation quantizer's squared error
``||q(x) - x||^2`` into the part on elements whose error exceeds half a step (clipped) and the rest
(rounding). The step of an element is its group's scale (per-tensor, per-embedding or PEG group),
divided by the smoothing scale where the quantizer smooths (``pegq.smooth``).

A large clipped share says the range is too narrow for the data (more calibration sequences, a wider
estimator, an outlier group); a small one says only a finer grid (more bits, smaller groups) helps.
Measured on MPNet-base ``sq-gemm`` (docs/results.md section 4): 23% of the activation error energy on
512 dev sentences is clipping, 19-62% on the FFN hidden activation of each layer.

Padding rows are left out of tensors laid out ``[batch, tokens, d]`` (as in GPTQ and bias correction,
``pegq.adaround_model._rows``); the attention scores and probabilities (4-D) are counted whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..models.base import ACTIVATION
from ..quant.quantizer import QuantState

#: an element counts as clipped when its error exceeds this many steps (half a step, plus float slack)
CLIP_STEPS = 0.5 + 1e-3


@dataclass
class ClipStats:
    name: str
    elements: int = 0
    clipped: int = 0
    error_energy: float = 0.0  # sum of squared errors
    clip_energy: float = 0.0  # the part of it on clipped elements
    max_error_steps: float = 0.0

    @property
    def clip_share(self) -> float:
        return self.clip_energy / self.error_energy if self.error_energy > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "clip_share": self.clip_share}


def element_steps(q, x: torch.Tensor) -> torch.Tensor:
    """The quantization step of every element of ``x`` under quantizer ``q`` (broadcastable to ``x``),
    in ``x``'s own units (smoothing undone). Per-token (dynamic) quantizers: each token's own step."""
    if q.granularity.dynamic:
        step = q.token_qparams(q.smooth_in(x))[0].to(x.dtype).abs()
    else:
        scale, _ = q.qparams()
        step = q.granularity.broadcast(scale.detach().to(x.device, x.dtype), x, q.group_index).abs()
    if q.smooth is not None:
        step = step / q.smooth.to(device=x.device, dtype=x.dtype).abs()
    return step


@torch.no_grad()
def clipping_report(qm, batches, patterns=None, progress: bool = True, device="cpu") -> dict:
    """Split each enabled, calibrated activation quantizer's error on ``batches`` (dicts of model inputs,
    e.g. from :func:`pegq.data.make_loader`) into clipping and rounding. Returns ``{"rows": [...],
    "total": {...}}``: one row per quantizer (:class:`ClipStats` as a dict), sorted by clipped energy,
    and the sums over all of them (energies are in each tensor's own units, so the total share weighs
    tensors by their scale). Raises ``ValueError`` for an uncalibrated quantizer."""
    from ..adaround_model import _rows
    from ..api import _to_device, model_inputs

    quantizers = {n: q for n, q in qm.activation_quantizers().items() if q.enabled}
    if patterns is not None:
        keep = set(qm.select(patterns, ACTIVATION))
        quantizers = {n: q for n, q in quantizers.items() if n in keep}
    for n, q in quantizers.items():
        if q.state != QuantState.FROZEN:
            raise ValueError(f"{n} is not calibrated (state {q.state}); run pegq.calibrate on the model first")
    stats = {n: ClipStats(n) for n in quantizers}
    was_training = qm.training
    qm.eval()
    try:
        for b in tqdm(list(batches), desc="clipping", disable=not progress):
            inputs = model_inputs(_to_device(b, device))
            mask = inputs.get("attention_mask")
            with qm.capture(list(quantizers)) as store:
                qm(**inputs)
            for n, xs in store.items():
                q, st = quantizers[n], stats[n]
                for x in xs:
                    x = x.to(device)
                    err = q(x) - x
                    steps = err.abs() / element_steps(q, x).clamp_min(torch.finfo(x.dtype).tiny)
                    err, steps = _rows(err, mask), _rows(steps, mask)
                    clip = steps > CLIP_STEPS
                    e2 = err.double().square()
                    st.elements += err.numel()
                    st.clipped += int(clip.sum())
                    st.error_energy += float(e2.sum())
                    st.clip_energy += float(e2[clip].sum())
                    if steps.numel():
                        st.max_error_steps = max(st.max_error_steps, float(steps.max()))
                xs.clear()
    finally:
        qm.train(was_training)
    rows = sorted((s.to_dict() for s in stats.values()), key=lambda r: -r["clip_energy"])
    total = ClipStats("total", sum(s.elements for s in stats.values()), sum(s.clipped for s in stats.values()),
                      sum(s.error_energy for s in stats.values()), sum(s.clip_energy for s in stats.values()),
                      max((s.max_error_steps for s in stats.values()), default=0.0))
    return {"rows": rows, "total": total.to_dict()}


def clipping_table(report: dict, top: int = 12):
    """A rich table of :func:`clipping_report`'s ``top`` rows with the most clipped energy, and the total."""
    from rich.table import Table

    t = Table(title=f"Activation error on held-out data: clipping vs rounding (top {top} by clipped energy)")
    for col in ("quantizer", "clipped share of error", "clipped elements", "max error (steps)"):
        t.add_column(col, justify="left" if col == "quantizer" else "right", overflow="fold")
    for r in [*report["rows"][:top], report["total"]]:
        t.add_row(r["name"], f"{r['clip_share']:.3f}", f"{r['clipped']} / {r['elements']}",
                  f"{r['max_error_steps']:.1f}")
    return t
