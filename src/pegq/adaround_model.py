"""AdaRound over a whole wrapped model (paper Table 7, "W4A32 AdaRound (PTQ)").

Layer by layer, in forward order, over every Linear weight with an enabled weight quantizer (the
embedding tables are lookups, not layers with an output to reconstruct: they keep round-to-nearest with
their MSE range):

1. the weight quantizer's scale is the calibrated one (run :func:`pegq.api.calibrate` first; below 8 bits
   the presets use the MSE estimator, paper section 5);
2. the layer's inputs are cached from the calibration sequences (padding tokens dropped) with every
   activation quantizer off, the already processed layers quantized (with their learned rounding) and the
   later ones in FP32 ("asymmetric reconstruction", Nagel et al. 2020 section 5; ``asymmetric=False``
   takes the inputs from the FP32 model); the targets are the FP32 model's outputs of that layer. A
   forward pass stops as soon as the layer has been seen;
3. :func:`pegq.quant.adaround.optimize_rounding` learns the rounding; the hard decision is frozen into the
   weight quantizer (``Quantizer.round_offset``), which from then on quantizes that weight with it.

Defaults as in the paper: 1024 calibration sequences, 10^4 iterations per layer. A run that is
interrupted resumes after the last finished layer (``state_dir``). Activation quantizers that are enabled
(e.g. W4A8) are re-calibrated afterwards with :func:`recalibrate_activations`, since their ranges were
estimated with round-to-nearest weights.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .models.base import QuantizedModel
from .quant import QuantState
from .quant.adaround import AdaRoundConfig, optimize_rounding

STATE_FILE = "adaround_state.pt"


@dataclass
class AdaRoundRun:
    """Model-level settings: the per-layer optimisation (:class:`AdaRoundConfig`) plus the data."""

    num_samples: int = 1024  # calibration sequences (paper: 1024)
    batch_size: int = 32  # sequences per forward pass while caching
    asymmetric: bool = True
    seed: int = 0
    layer: AdaRoundConfig = field(default_factory=AdaRoundConfig)

    def __post_init__(self):
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"AdaRound needs at least one calibration sequence, got {self.num_samples!r}")
        if self.batch_size < 1:
            raise ValueError(f"AdaRound batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def linear_weight_quantizers(qm: QuantizedModel) -> dict[str, nn.Linear]:
    """``name -> Linear`` for every enabled weight quantizer sitting on an ``nn.Linear``, forward order."""
    out = {}
    for n, q in qm.weight_quantizers().items():
        m = qm._weight_owner[n]
        if q.enabled and isinstance(m, nn.Linear):
            out[n] = m
    return out


def _rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, T, d]`` -> the rows of real tokens ``[n, d]``; ``[B, d]`` (pooler, head) as is."""
    t = t.detach().float()
    if t.ndim == 3 and mask is not None and mask.shape[:2] == t.shape[:2]:
        return t[mask.bool()]
    return t.reshape(-1, t.shape[-1])


@torch.no_grad()
def run_batches(qm: QuantizedModel, batches: list[dict], mask_box: list, device="cpu") -> None:
    """Forward every batch through ``qm`` (eval mode, trimmed padding), with ``mask_box[0]`` set to the
    batch's attention mask for the hooks to read; a hook ends a pass early by raising :class:`_Stop`."""
    from .api import _to_device, model_inputs
    from .train import trim_batch

    qm.eval()
    for b in batches:
        b = _to_device(trim_batch(b), device)
        mask_box[0] = b.get("attention_mask")
        try:
            qm(**model_inputs(b))
        except _Stop:
            pass


@torch.no_grad()
def capture_layer(qm: QuantizedModel, module: nn.Module, batches: list[dict], what: str, device="cpu"):
    """Rows of ``module``'s input (``what="input"``) or output (``"output"``) over ``batches`` (each
    forward stops right after the module), padding tokens dropped. Quantizers are left as they are."""
    store: list[torch.Tensor] = []
    mask_box: list[torch.Tensor | None] = [None]

    def hook(mod, args, output):
        t = args[0] if what == "input" else output
        store.append(_rows(t, mask_box[0]).cpu())
        raise _Stop

    h = module.register_forward_hook(hook)
    try:
        run_batches(qm, batches, mask_box, device)
    finally:
        h.remove()
    if not store:
        raise RuntimeError(f"{type(module).__name__} was never called during the forward pass")
    return torch.cat(store)


@torch.no_grad()
def shared_input_groups(qm: QuantizedModel, layers: dict[str, nn.Linear], batch: dict, device) -> list[list[str]]:
    """``layers`` in forward order, consecutive layers that read the very same input tensor grouped (e.g.
    query/key/value; one forward pass of ``batch`` tells); layers that pass never called come last, one per
    group. Used by GPTQ (one Hessian per group) and bias correction (one pass per group)."""
    seen: list[tuple[str, torch.Tensor]] = []  # the tensors themselves (an id could be reused once freed)
    handles = [m.register_forward_hook(lambda m, a, o, n=n: seen.append((n, a[0]))) for n, m in layers.items()]
    try:
        run_batches(qm, [batch], [None], device)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for n, x in seen:
        if any(n in g for g in groups):
            continue
        if groups and x is last:
            groups[-1].append(n)
        else:
            groups.append([n])
        last = x
    return groups + [[n] for n in layers if not any(n in g for g in groups)]


class _ActsOff:
    """Activation quantizers off (FP32 activations) for the duration of the block."""

    def __init__(self, qm: QuantizedModel):
        self.qm = qm

    def __enter__(self):
        self.saved = {n: q.bits for n, q in self.qm.activation_quantizers().items()}
        for q in self.qm.activation_quantizers().values():
            q.bits = None

    def __exit__(self, *exc):
        for n, q in self.qm.activation_quantizers().items():
            q.bits = self.saved[n]


class _WeightsOff:
    """The given weight quantizers off (FP32 weights) for the duration of the block."""

    def __init__(self, quantizers):
        self.qs = list(quantizers)

    def __enter__(self):
        self.saved = [q.bits for q in self.qs]
        for q in self.qs:
            q.bits = None

    def __exit__(self, *exc):
        for q, b in zip(self.qs, self.saved, strict=True):
            q.bits = b


def _load_state(state_dir: Path | None, run, names: list[str], filename: str = STATE_FILE) -> dict:
    """The finished layers of an interrupted run (``run``: its settings, with ``to_dict``), or a fresh state."""
    if state_dir is None or not (state_dir / filename).exists():
        return {"done": {}, "info": {}}
    st = torch.load(state_dir / filename, weights_only=False)
    if st.get("run") != run.to_dict() or st.get("names") != names:
        print(f"ignoring {state_dir / filename}: it was made with other settings")
        return {"done": {}, "info": {}}
    return st


def _save_state(state_dir: Path, st: dict, filename: str = STATE_FILE) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{filename}.tmp"
    torch.save(st, tmp)
    os.replace(tmp, state_dir / filename)


def start_rounding(qm: QuantizedModel, run, state_dir, method: str, filename: str, smoothed_ok: bool = False):
    """The common start of a whole-model weight-rounding run (AdaRound, GPTQ): the Linear weights to
    round (checked calibrated and frozen; smoothed ones only with ``smoothed_ok``), the state of an interrupted
    run with its finished layers' offsets re-applied, and ``state_dir`` as a Path (or None)."""
    layers = linear_weight_quantizers(qm)
    if not layers:
        raise ValueError(f"no enabled weight quantizer on a Linear layer: nothing for {method} to do "
                         f"(use a preset with quantized weights, e.g. w4a32)")
    quantizers = qm.quantizers
    for n in layers:
        q = quantizers[n]
        if q.state != QuantState.FROZEN or (q.x_min is None and q.scale_param is None):
            raise ValueError(f"{n}: {method} needs calibrated, frozen weight quantizers; run calibrate first")
        if q.smooth is not None and not smoothed_ok:
            raise ValueError(f"{n}: {method} does not support smoothed weights (an sq<alpha> activation "
                             f"override); drop the sq override or the {method} option")
    names = list(layers)
    state_dir = Path(state_dir) if state_dir is not None else None
    st = _load_state(state_dir, run, names, filename)
    st.update(run=run.to_dict(), names=names)
    for n, off in st["done"].items():  # resumed: re-apply finished layers
        quantizers[n].round_offset = off.clone()
    if st["done"]:
        print(f"{method}: resuming after {len(st['done'])}/{len(names)} finished layers")
    return layers, st, state_dir


def adaround_model(
    qm: QuantizedModel,
    batches: list[dict],
    run: AdaRoundRun | None = None,
    state_dir: str | Path | None = None,
    progress: bool = True,
    device="cpu",
) -> dict:
    """AdaRound every Linear weight of a calibrated ``qm`` (see the module docstring).

    ``batches``: the calibration sequences (``run.num_samples`` of them, e.g. from
    :func:`calibration_sequences`). Returns a report with one entry per layer (reconstruction error with
    round-to-nearest and with AdaRound, fraction of flipped roundings, seconds) and totals.
    """
    run = run or AdaRoundRun()
    layers, st, state_dir = start_rounding(qm, run, state_dir, "AdaRound", STATE_FILE)
    quantizers, names = qm.quantizers, list(layers)
    t0 = time.perf_counter()
    pending = [n for n in names if n not in st["done"]]
    with _ActsOff(qm):
        for k, n in enumerate(names):
            if n not in pending:
                continue
            q, lin = quantizers[n], layers[n]
            later = [quantizers[m] for m in names[k:]]
            # targets: the FP32 model's output of this layer
            with _WeightsOff(quantizers[w] for w in qm.weight_quantizers()):
                targets = capture_layer(qm, lin, batches, "output", device)
                if not run.asymmetric:
                    inputs = capture_layer(qm, lin, batches, "input", device)
            if run.asymmetric:
                # inputs: earlier layers quantized (with their learned rounding), this and later FP32
                with _WeightsOff(later):
                    inputs = capture_layer(qm, lin, batches, "input", device)
            w = lin.parametrizations.weight.original.detach()
            bias = lin.bias.detach() if lin.bias is not None else None
            scale, zero = q.qparams()
            g = q.granularity
            s = g.broadcast(scale.detach(), w, q.group_index)
            z = None if q.symmetric else g.broadcast(zero.detach(), w, q.group_index)
            bar = tqdm(total=run.layer.iters, desc=f"AdaRound {k + 1}/{len(names)} {n}", leave=False,
                       disable=not progress, mininterval=1.0)

            def on_step(it, loss, bar=bar):
                bar.update(1)
                if it % 100 == 0:
                    bar.set_postfix(rec=f"{loss:.4g}")

            cfg = AdaRoundConfig(**{**run.layer.to_dict(), "seed": run.layer.seed + k})
            offset, info = optimize_rounding(w, s, z, q.qmin, q.qmax, inputs.to(w.device), targets.to(w.device),
                                             bias, cfg, on_step=on_step)
            bar.close()
            q.round_offset = offset
            st["done"][n] = offset.cpu()
            st["info"][n] = info
            if progress:
                print(f"AdaRound {k + 1}/{len(names)} {n}: output MSE {info['mse_nearest']:.4g} (nearest) -> "
                      f"{info['mse_adaround']:.4g} ({100 * info['flipped_vs_nearest']:.1f}% flipped, "
                      f"{info['rows']} rows, {info['seconds']:.0f} s)", flush=True)
            if state_dir is not None:
                _save_state(state_dir, st)
            del inputs, targets
    infos = st["info"]
    return {
        "layers": len(names),
        "settings": run.to_dict(),
        "seconds_this_run": time.perf_counter() - t0,
        "seconds_total": sum(i["seconds"] for i in infos.values()),
        "mse_nearest_sum": sum(i["mse_nearest"] for i in infos.values()),
        "mse_adaround_sum": sum(i["mse_adaround"] for i in infos.values()),
        "layers_improved": sum(i["mse_adaround"] < i["mse_nearest"] for i in infos.values()),
        "per_layer": infos,
    }


@torch.no_grad()
def recalibrate_activations(qm: QuantizedModel, batches: list[dict], progress: bool = True, device="cpu") -> None:
    """Re-estimate the enabled activation quantizers' ranges (weights untouched: frozen, with their
    AdaRound offsets), then freeze them."""
    from .api import _to_device, model_inputs

    acts = {n: q for n, q in qm.activation_quantizers().items() if q.enabled}
    if not acts:
        return
    qm.eval()
    for q in acts.values():
        q.reset()
        q.estimate()
    for b in tqdm(batches, desc="re-calibrating activations", disable=not progress, leave=False):
        qm(**model_inputs(_to_device(b, device)))
    for q in acts.values():
        q.freeze()


def calibration_sequences(task, tokenizer, num_samples: int, seed: int = 0, batch_size: int = 32,
                          max_length: int = 128) -> list[dict]:
    """``num_samples`` training sequences sampled with ``seed``, in batches (AdaRound's data)."""
    from .data import encode, make_loader, sample

    n = min(num_samples, len(task.train))
    ds = encode(sample(task.train, n, seed=seed), tokenizer, task.spec, max_length=max_length)
    return list(make_loader(ds, batch_size=batch_size))


def state_dir_for(output_dir: str | Path, method: str = "adaround") -> Path:
    """Where an interrupted ``pegq ptq --adaround`` (``method="gptq"``: ``--gptq``) keeps its finished layers."""
    return Path(output_dir) / f".{method}-state"


def run_on_sequences(method, qm: QuantizedModel, task, tokenizer, run, calib_batches: list[dict],
                     state_dir: Path | None, progress: bool = True, device="cpu") -> dict:
    """``method(qm, sequences, run, state_dir=..., progress=..., device=...)`` (:func:`adaround_model` or
    :func:`pegq.gptq_model.gptq_model`) on ``run.num_samples`` training sequences, then re-calibrate the
    enabled activation quantizers on the PTQ calibration batches."""
    seqs = calibration_sequences(task, tokenizer, run.num_samples, seed=run.seed, batch_size=run.batch_size)
    info = method(qm, seqs, run, state_dir=state_dir, progress=progress, device=device)
    recalibrate_activations(qm, calib_batches, progress=progress, device=device)
    info["num_sequences"] = sum(int(b["input_ids"].shape[0]) for b in seqs)
    return info


def run_adaround(qm: QuantizedModel, task, tokenizer, run: AdaRoundRun, calib_batches: list[dict],
                 output_dir: str | Path | None = None, progress: bool = True, device="cpu") -> dict:
    """The ``pegq ptq --adaround`` step after calibration (:func:`run_on_sequences`). Resumable through
    ``<output_dir>/.adaround-state`` (removed by the caller once results are written, :func:`clear_state`)."""
    state = state_dir_for(output_dir) if output_dir is not None else None
    return run_on_sequences(adaround_model, qm, task, tokenizer, run, calib_batches, state, progress, device)


def clear_state(output_dir: str | Path | None, method: str = "adaround") -> None:
    if output_dir is None:
        return
    import shutil

    shutil.rmtree(state_dir_for(output_dir, method), ignore_errors=True)
