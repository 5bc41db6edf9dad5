"""Packed checkpoints: quantized weights stored at their bit-width, loadable back into the simulated model.

A packed checkpoint is a folder::

    config.json          the Hugging Face model config (architectures says which head)
    model.safetensors    every tensor (see below)
    pegq_packed.json     format version, the QuantConfig, every quantizer's settings, the weight table
    tokenizer files      when a tokenizer was given

``model.safetensors`` holds:

* for every weight with an enabled quantizer (``<key>`` = its Hugging Face state-dict key):
  ``<key>.packed`` -- the integer codes ``q - qmin`` (unsigned), packed little-end-first at the
  storage width: 2 bits (four per byte) for 1-2 bit weights, 4 bits (two per byte) for 3-4 bits,
  one byte for 5-8 bits, two bytes for 9-16 bits; ``<key>.scale`` (float32) and ``<key>.zero_point``
  (int32), one per parameter pair (1 for per-tensor, one per channel);
* every other parameter and buffer of the model at its own dtype (biases, LayerNorm, FP32 weights);
* ``pegq.<quantizer name>.<x_min|x_max|perm|scale_param|zero_param|smooth|shift>`` -- the frozen state of
  every quantizer (ranges, PEG permutations, learned QAT parameters, smoothing scales), so that the
  loaded quantizers have the very same scales and zero-points. A smoothed weight (:mod:`pegq.smooth`)
  is stored as the codes of ``W diag(s)`` and loaded as their dequantized values divided by ``s``.

Loading (:func:`load_packed`) builds the model from ``config.json``, sets every quantized weight to its
dequantized value ``s * (q - z)`` (which lies exactly on the grid, so the quantizer maps it back to the
same integers -- AdaRound's rounding decisions included, since the codes are stored), wraps it, restores
every quantizer and freezes them: outputs are identical to the simulated model that was saved.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..models.base import QuantizedModel
from ..quant import QuantState

FORMAT = "pegq-packed-v1"
META = "pegq_packed.json"
WEIGHTS = "model.safetensors"
_STATE = ("x_min", "x_max", "perm", "scale_param", "zero_param", "smooth", "shift")


class PackedError(ValueError):
    """A model that cannot be packed, or a folder that is not a packed checkpoint (message says why)."""


# --------------------------------------------------------------------------- bit packing


def storage_bits(bits: int) -> int:
    """Container width for ``bits``-bit codes: 2, 4, 8 or 16."""
    if not 1 <= bits <= 16:
        raise PackedError(f"cannot pack {bits}-bit codes; allowed: 1..16 bits")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8 if bits <= 8 else 16


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integer codes (any shape, values in ``[0, 2^bits)``) as a flat ``uint8`` array."""
    w = storage_bits(bits)
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise PackedError(f"codes outside [0, {2**bits - 1}] cannot be packed at {bits} bits")
    if w == 16:
        return flat.astype("<u2").view(np.uint8).copy()
    if w == 8:
        return flat.astype(np.uint8)
    per = 8 // w
    pad = (-flat.size) % per
    v = np.concatenate([flat, np.zeros(pad, np.int64)]).reshape(-1, per)
    shifts = np.arange(per, dtype=np.int64) * w
    return (v << shifts).sum(axis=1).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``n`` codes as int64."""
    w = storage_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if w == 16:
        return packed.view("<u2")[:n].astype(np.int64)
    if w == 8:
        return packed[:n].astype(np.int64)
    per = 8 // w
    shifts = np.arange(per, dtype=np.int64) * w
    v = (packed.astype(np.int64)[:, None] >> shifts) & (2**w - 1)
    return v.reshape(-1)[:n]


# --------------------------------------------------------------------------- saving


def _weight_table(qm: QuantizedModel) -> dict[str, dict]:
    """HF state-dict key -> {quantizer, module} for every weight quantizer."""
    mod_names = {id(m): n for n, m in qm.model.named_modules()}
    out = {}
    for qn in qm.weight_quantizers():
        module = qm._weight_owner[qn]
        mname = mod_names.get(id(module))
        if mname is None:
            raise PackedError(f"{qn}: its module is not part of the model")
        out[f"{mname}.weight" if mname else "weight"] = {"quantizer": qn, "module": module}
    return out


def _plain_state(qm: QuantizedModel, quantized_keys: set[str]) -> dict[str, torch.Tensor]:
    """Every parameter/persistent buffer of the HF model except the quantized weights, under HF keys."""
    out = {}
    for k, v in qm.model.state_dict().items():
        if ".parametrizations." in k:
            head, tail = k.split(".parametrizations.", 1)
            attr, rest = tail.split(".", 1)
            if rest != "original":
                continue  # the quantizer's own state: stored under pegq.<name>.*
            k = f"{head}.{attr}"
            if k in quantized_keys:
                continue
        out[k] = v.detach().cpu().contiguous()
    return out


def save_packed(qm: QuantizedModel, out_dir: str | Path, tokenizer=None, overwrite: bool = False) -> dict:
    """Write the calibrated model ``qm`` as a packed checkpoint (atomically: a complete folder or none).

    Returns the size accounting: bytes on disk (total and ``model.safetensors``), FP32 bytes of the
    model's parameters, the ratio, and -- where :mod:`pegq.size` is available -- its theoretical
    memory reduction for the same model.
    """
    from safetensors.torch import save_file

    from ..export.onnx import qparams_numpy, weight_codes
    from ..io import OutputError, atomic_dir

    if not isinstance(qm, QuantizedModel):
        raise PackedError(f"expected a calibrated pegq QuantizedModel, got {type(qm).__name__}")
    if getattr(qm, "_pegq_rewritten", False):
        raise PackedError("pack the simulated model, not its per-tensor rewrite (rewrite after loading)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output path {str(out_dir)!r} exists and is not a directory; choose another --output")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputError(f"{str(out_dir)!r} is not empty; pass --overwrite to replace it or choose another --output")
    for n, q in qm.quantizers.items():
        if q.enabled and (q.state != QuantState.FROZEN or (q.x_min is None and q.scale_param is None)):
            raise PackedError(f"{n}: not calibrated and frozen ({q.state.value}); calibrate the model first")
    t0 = time.perf_counter()
    table = _weight_table(qm)
    tensors: dict[str, torch.Tensor] = {}
    weights_meta = {}
    quantized = {k for k, v in table.items() if qm.quantizers[v["quantizer"]].enabled}
    for key in sorted(quantized):
        qn = table[key]["quantizer"]
        q = qm.quantizers[qn]
        w = table[key]["module"].parametrizations.weight.original
        codes = weight_codes(q, w) - q.qmin
        s, z = qparams_numpy(q)
        tensors[f"{key}.packed"] = torch.from_numpy(pack_codes(codes, q.bits))
        tensors[f"{key}.scale"] = torch.from_numpy(s.astype(np.float32))
        tensors[f"{key}.zero_point"] = torch.from_numpy(z.astype(np.int32))
        weights_meta[key] = {"quantizer": qn, "shape": list(w.shape), "bits": q.bits,
                             "storage_bits": storage_bits(q.bits), "qmin": q.qmin, "dtype": str(w.dtype)}
    plain = _plain_state(qm, quantized)
    overlap = set(plain) & set(tensors)
    if overlap:
        raise PackedError(f"internal: key clash {sorted(overlap)[:3]}")
    tensors.update(plain)
    qspecs = {}
    for n, q in qm.quantizers.items():
        qspecs[n] = {"kind": qm.kind(n), **q.spec(), "state": q.state.value}
        for attr in _STATE:
            v = getattr(q, attr, None)
            if v is not None and q.enabled:
                tensors[f"pegq.{n}.{attr}"] = v.detach().cpu().contiguous().clone()
    cfg = getattr(qm, "config", None)
    model = qm.model
    meta = {
        "format": FORMAT,
        "family": qm.family,
        "model_class": type(model).__name__,
        "quant_config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
        "quantizers": qspecs,
        "weights": weights_meta,
    }
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # temporary files are created 0600; publish them like any other file
            f.chmod(0o666 & ~umask)
    info = size_report(qm, out_dir)
    info["save_s"] = time.perf_counter() - t0
    return info


def size_report(qm: QuantizedModel, path: str | Path) -> dict:
    """Bytes on disk of a packed folder against the FP32 bytes of the model's parameters (+ the
    theoretical accounting of :mod:`pegq.size` where present)."""
    path = Path(path)
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
    fp32 = 0
    seen = set()
    for _, p in qm.model.named_parameters(remove_duplicate=True):
        if id(p) not in seen and not any(p is qp for q in qm.quantizers.values() for qp in q.parameters()):
            seen.add(id(p))
            fp32 += 4 * p.numel()
    model_bytes = files.get(WEIGHTS, 0)
    out = {
        "path": str(path),
        "bytes_on_disk": sum(files.values()),
        "safetensors_bytes": model_bytes,
        "fp32_bytes": fp32,
        "reduction_on_disk": fp32 / model_bytes if model_bytes else float("nan"),
        "files": files,
    }
    try:
        from ..size import model_size
    except ImportError:  # pragma: no cover - pegq.size is optional
        return out
    try:
        out["theoretical"] = model_size(qm)
    except Exception as e:  # noqa: BLE001 - the accounting is informative only
        out["theoretical_error"] = f"{type(e).__name__}: {e}"
    return out


def size_text(info: dict) -> str:
    mib = 2**20
    line = (f"on disk: {info['safetensors_bytes'] / mib:.1f} MiB (model.safetensors; {info['bytes_on_disk'] / mib:.1f} "
            f"MiB with config/tokenizer) vs {info['fp32_bytes'] / mib:.1f} MiB FP32 parameters = "
            f"x{info['reduction_on_disk']:.2f}")
    th = info.get("theoretical")
    if th:
        line += (f"; theoretical (pegq.size): x{th['reduction']:.2f} total, x{th['weights']['reduction']:.2f} "
                 f"weights ({th['quantized_mb']:.1f} MiB)")
    return line


# --------------------------------------------------------------------------- loading


def _read_meta(path: Path) -> dict:
    if not path.is_dir():
        raise PackedError(f"packed checkpoint {str(path)!r} is not a folder")
    f = path / META
    if not f.is_file() or not (path / WEIGHTS).is_file():
        raise PackedError(f"{str(path)!r} is not a pegq packed checkpoint (no {META} / {WEIGHTS}); "
                          f"write one with `pegq export packed`")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT:
        raise PackedError(f"{str(f)!r}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def load_packed(path: str | Path, with_tokenizer: bool = True):
    """``(QuantizedModel, tokenizer or None)`` from a packed checkpoint: every quantizer restored and
    frozen; outputs identical to the simulated model that was saved."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from ..config import QuantConfig
    from ..models import wrap
    from ..quant import granularity_from_dict

    path = Path(path)
    meta = _read_meta(path)
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForSequenceClassification if meta["model_class"].endswith("ForSequenceClassification") else AutoModel
    model = cls.from_config(config).eval()
    sd = load_file(str(path / WEIGHTS))
    state = {}
    for key, w in meta["weights"].items():
        n = math.prod(w["shape"])
        codes = unpack_codes(sd[f"{key}.packed"].numpy(), w["bits"], n) + w["qmin"]
        s = torch.from_numpy(sd[f"{key}.scale"].numpy().astype(np.float32))
        z = torch.from_numpy(sd[f"{key}.zero_point"].numpy().astype(np.float32))
        codes = torch.from_numpy(codes).reshape(w["shape"]).float()
        spec = meta["quantizers"][w["quantizer"]]
        g = granularity_from_dict(spec["granularity"])
        if s.numel() > 1:
            ax = g.axis % codes.ndim
            shape = [1] * codes.ndim
            shape[ax] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        wv = (codes - z) * s
        smooth = sd.get(f"pegq.{w['quantizer']}.smooth")
        if smooth is not None:  # codes of W diag(s): the weight is their value divided by s (its columns)
            wv = wv / smooth.float()
        state[key] = wv.to(getattr(torch, w["dtype"].replace("torch.", "")))
    packed_keys = {f"{k}.{suffix}" for k in meta["weights"] for suffix in ("packed", "scale", "zero_point")}
    state.update({k: v for k, v in sd.items() if not k.startswith("pegq.") and k not in packed_keys})
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected = set(model.state_dict())
    missing = [k for k in missing if k in expected and not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise PackedError(f"{str(path)!r} does not match its config.json: missing {missing[:3]}, "
                          f"unexpected {list(unexpected)[:3]}")
    qm = wrap(model)
    if set(qm.quantizers) != set(meta["quantizers"]):
        diff = sorted(set(qm.quantizers) ^ set(meta["quantizers"]))
        raise PackedError(f"quantizer names differ from the checkpoint's (e.g. {diff[:3]}); written by another pegq?")
    for n, spec in meta["quantizers"].items():
        q = qm.quantizers[n]
        q.configure(bits=spec["bits"], symmetric=spec["symmetric"],
                    granularity=granularity_from_dict(spec["granularity"]),
                    estimator=spec["estimator"], momentum=spec.get("momentum", 0.9))
        q.smooth_alpha = spec.get("smooth")
        q.smooth_shift = bool(spec.get("shift", False))
        if q.enabled:
            if f"pegq.{n}.smooth" in sd:
                q.set_smooth(sd[f"pegq.{n}.smooth"], sd.get(f"pegq.{n}.shift"))
            if f"pegq.{n}.perm" in sd:
                q.set_permutation(sd[f"pegq.{n}.perm"])
            for attr in ("x_min", "x_max"):
                if f"pegq.{n}.{attr}" in sd:
                    setattr(q, attr, sd[f"pegq.{n}.{attr}"].clone())
            for attr in ("scale_param", "zero_param"):
                if f"pegq.{n}.{attr}" in sd:
                    setattr(q, attr, torch.nn.Parameter(sd[f"pegq.{n}.{attr}"].clone(), requires_grad=False))
            q._qcache = None
            q.freeze()
    if meta.get("quant_config"):
        qm.config = QuantConfig.from_dict(meta["quant_config"])
    qm.eval()
    tok = None
    if with_tokenizer and (path / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(path)
    return qm, tok
