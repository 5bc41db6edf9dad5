"""Typed quantization config: dataclasses that round-trip JSON/YAML, named presets, overrides.

A :class:`QuantConfig` says how every quantizer of a wrapped model is set:

* ``weights``     -- defaults for every ``*.weight`` quantizer (symmetric, per-tensor, min-max);
* ``embeddings``  -- defaults for the embedding tables (``embeddings.*.weight``); ``None`` = as weights;
* ``activations`` -- defaults for every activation quantizer (asymmetric, per-tensor, running min-max);
* ``overrides``   -- applied in order to the quantizers whose name matches a glob pattern;
* ``calibration`` -- batch size, number of batches and the seed of calibration sampling (paper B.2).

Override grammar (one string, parsed by :func:`parse_override`, never ``eval``)::

    PATTERN=TOKEN[,TOKEN...]

PATTERN is a glob over quantizer names (``*`` matches anything, dots included; ``?`` one char;
``[...]`` a set), e.g. ``encoder.layer.*.ffn.residual_sum`` or ``encoder.layer.1[01].*``.
TOKENs, case-insensitive:

=====================  ==========================================================
``off``                no quantization (FP32 pass-through)
``a16`` ``w4`` ``8``   bit-width (the ``a``/``w`` prefix is only for readability)
``tensor``             per-tensor granularity
``token``              activations only: dynamic per-token ranges (one range per vector along
                       the last axis, taken at run time; not in the paper)
``zp<N>``              with ``token`` (asymmetric): every row shares the zero-point N; a row's scale
                       covers its max and the calibrated per-tensor min (``PerToken.zero_point``:
                       no per-row zero-point correction in the integer matmuls; e.g. ``zp32`` on
                       a GELU output, whose min is -0.17 in every row)
``channel[AXIS]``      per-channel (default axis 0)
``emb``/``embedding``  per-embedding (last dim, paper eq. 4)
``peg<K>``             per-embedding-group with K groups (eq. 5); ``peg<K>p`` adds the
                       range-based permutation; ``peg<K>po<M>`` makes the last group the M
                       largest-range dims and splits the rest evenly (not in the paper)
``minmax`` ``running`` ``mse``  range estimator (current min-max, running min-max, MSE)
``sym`` ``asym``       symmetric / asymmetric grid
``sq<alpha>``          activations only, per-tensor: SmoothQuant-style smoothing with migration
                       strength alpha in (0, 1] (``sq`` = ``sq0.5``; ``nosq`` removes it): per-dim
                       scales moved into the weights of the Linears that read the tensor
                       (:mod:`pegq.smooth`; not in the paper); ``sqauto`` picks alpha per tensor
                       from a grid by the readers' output error on the calibration data
``shift`` ``noshift``  with ``sq``: also centre each dim before quantizing (Outlier Suppression+;
                       the readers' biases absorb it)
``optional``           no error when the pattern matches no quantizer (e.g. a head
                       that only some families have); by default that is an error
=====================  ==========================================================

Presets (``pegq presets``; a preset name goes wherever a config path does):

* ``fp32``, ``w8a8``, ``w8a32``, ``w32a8`` -- Table 1 (W8A8 = running min-max over 16 sequences).
* PTQ cures, paper section 5 setup (weights 8-bit per-tensor min-max; activations 8-bit asymmetric,
  current min-max from ONE calibration sequence):

  ==============  =====================================================================  ===========
  preset          what changes from ``peg-1``                                            paper row
  ==============  =====================================================================  ===========
  ``peg-1``       nothing: per-tensor everywhere                                         T4/T5 W8A8
  ``mp-ptq-res``  FFN residual sum (``ffn.residual_sum``) 16-bit                         T4 MP-PTQ*
  ``mp-ptq-ffn``  + FFN input (``attn.layernorm``) and output (``ffn.output``) 16-bit    T4 *+
  ``mp-ptq``      + final output: ``pooler``/``classifier.dense`` 16-bit, logits         T4 *+$
                  (``classifier.output``) 16-bit with the MSE estimator
  ``peg-d-all``   per-embedding ranges on every token activation (not the softmax       T5 K=d
                  in/output, not the head: pooler/logits have one vector per sequence)
  ``peg-d``       per-embedding on FFN input, output and residual sum only              T5 K=d FFN
  ``peg-6``       PEG K=6 on the same three tensors (``peg-3``: K=3)                     T5
  ``peg-6p``      PEG K=6 + range-based permutation shared per layer (``peg-3p``: K=3)   T5 +P
  ``peg-ptq``     = ``peg-6p``                                                           T6 PEG-PTQ
  ``peg-12p``     K=12 + permutation (not in the paper: narrower groups for d=384 models  -
                  such as MiniLM, where K=6 leaves 63 ordinary dims in the outlier group)
  ==============  =====================================================================  ===========

  On BERT-base (161 activation quantizers) ``mp-ptq-res``/``mp-ptq-ffn``/``mp-ptq`` keep 12/36/38 of
  them at 16 bits; the paper's "36 of 161" is ``mp-ptq-ffn``, its best setup on the classification
  tasks (``mp-ptq`` adds the pooler and the logits, the STS-B setup of the paper's code).
* Low-bit and QAT (section "low-bit and QAT" below): ``w6a32``, ``w4a32``, ``w8a32-e6/e4/e2``,
  ``qat-w8a8``, ``qat-w4a8``, ``qat-w4a8-e2``.
* int8 deployment on ONNX Runtime, not in the paper (section "int8 deployment" below): ``w8a8-gemm``
  (activations quantized only where a matmul consumes them), ``peg-gemm`` (+ PEG on the FFN input) and
  ``peg-outlier-gemm`` (+ per-channel encoder weights, per-embedding-dim embedding tables and a 16-dim
  outlier group, ``peg2po16``, on the FFN input and the FFN hidden activation), ``sq-gemm`` (as
  ``peg-outlier-gemm``, but every LayerNorm output a matmul reads -- Q/K/V input and FFN input -- per-tensor
  with smoothing, ``sq0.8``, instead of PEG), ``sq-token-gemm`` (as ``sq-gemm`` with dynamic per-token
  ranges on every encoder Linear's input), ``sq-token-probs-gemm`` (+ per-token attention probabilities),
  ``sq-token-sym-gemm`` (+ symmetric per-token LayerNorm outputs: no per-row zero-point correction),
  ``sq-token-zp-gemm`` (+ one fixed zero-point, 64, for every row of the FFN hidden activation).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .quant.estimators import canonical_estimator
from .quant.functional import MAX_BITS, MIN_BITS
from .quant.granularity import (
    Granularity,
    PerChannel,
    PerEmbedding,
    PerEmbeddingGroup,
    PerTensor,
    PerToken,
)

GRANULARITIES = ("tensor", "channel", "embedding", "token", "peg")
SMOOTHABLE = ("tensor", "token")  # granularities with one range per tensor or per token: smoothing keeps its point


class ConfigError(ValueError):
    """A config, preset or override that cannot be used (the message says how to fix it)."""


@dataclass
class QuantizerSettings:
    bits: int | None = 8
    symmetric: bool = False
    granularity: str = "tensor"
    axis: int = 0
    groups: int = 1
    permute: bool = False
    outliers: int = 0  # PEG: size of a small last group (the largest-range dims); 0 = even groups
    estimator: str = "current_minmax"
    momentum: float = 0.9
    smooth: float | str | None = None  # activations: SmoothQuant migration strength in (0, 1] or "auto"
    shift: bool = False  # with smooth: centre each dim first (pegq.smooth)
    zero_point: int | None = None  # token: every row's fixed zero-point (PerToken.zero_point); None = per row

    def __post_init__(self):
        if self.bits is not None and (
            isinstance(self.bits, bool) or not isinstance(self.bits, int)
            or not MIN_BITS <= self.bits <= MAX_BITS
        ):
            raise ConfigError(f"bits={self.bits!r} is not allowed; use {MIN_BITS}..{MAX_BITS} or null (off)")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"granularity {self.granularity!r} is unknown; allowed: {', '.join(GRANULARITIES)}"
            )
        try:
            self.estimator = canonical_estimator(self.estimator)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.granularity == "peg" and self.groups < 1:
            raise ConfigError(f"PEG needs groups >= 1, got {self.groups}")
        if self.smooth is not None:
            if self.smooth != "auto" and (isinstance(self.smooth, bool) or not isinstance(self.smooth, int | float)
                                          or not 0 < self.smooth <= 1):
                raise ConfigError(f"smooth={self.smooth!r} is not allowed; use a migration strength in (0, 1], "
                                  f"e.g. sq0.8, \"auto\" (sqauto), or null (no smoothing)")
            if self.granularity not in SMOOTHABLE:
                raise ConfigError(f"smoothing ({sq_token(self.smooth)}) needs a per-tensor (or per-token) quantizer, "
                                  f"not {self.granularity}: it exists to keep one scale per tensor")
        if not isinstance(self.shift, bool):
            raise ConfigError(f"shift={self.shift!r} is not allowed; use true or false")
        if self.shift and self.smooth is None:
            raise ConfigError("shift needs smoothing on the same quantizer (e.g. sq0.8,shift): the readers' weights "
                              "and biases absorb it together")
        z = self.zero_point
        if z is not None:
            if isinstance(z, bool) or not isinstance(z, int) or z < 1:
                raise ConfigError(f"zero_point={z!r} is not allowed; use a positive integer (zp32) or null")
            if self.granularity != "token" or self.symmetric:
                raise ConfigError(f"a fixed zero-point (zp{z}) needs an asymmetric per-token quantizer, not "
                                  f"{'symmetric ' if self.symmetric else ''}{self.granularity}; e.g. token,asym,zp{z}")
            if self.bits is not None and z >= 2**self.bits - 1:
                raise ConfigError(f"a fixed zero-point {z} does not fit inside the {self.bits}-bit grid (1.."
                                  f"{2**self.bits - 2}); pick a smaller one, e.g. zp{max(1, 2 ** (self.bits - 3))}")
        if self.granularity == "peg" and self.outliers and (self.outliers < 0 or self.groups < 2):
            raise ConfigError(
                f"a PEG outlier group (outliers={self.outliers}) needs outliers > 0 and groups >= 2, got "
                f"groups={self.groups}; e.g. peg2po16"
            )

    def make_granularity(self) -> Granularity:
        if self.granularity == "tensor":
            return PerTensor()
        if self.granularity == "channel":
            return PerChannel(self.axis)
        if self.granularity == "embedding":
            return PerEmbedding()
        if self.granularity == "token":
            return PerToken(zero_point=self.zero_point)
        return PerEmbeddingGroup(self.groups, self.permute, self.outliers)

    def short(self) -> str:
        if self.bits is None:
            return "off"
        token = "token" if self.zero_point is None else f"token,zp{self.zero_point}"
        g = {"tensor": "tensor", "channel": f"channel{self.axis}", "embedding": "emb", "token": token}.get(
            self.granularity, _peg_token(self.groups, self.permute, self.outliers)
        )
        sq = f",{sq_token(self.smooth)}{',shift' if self.shift else ''}" if self.smooth is not None else ""
        return f"{self.bits}b,{'sym' if self.symmetric else 'asym'},{g}{sq},{self.estimator}"


@dataclass
class Override:
    """Settings changed on every quantizer whose name matches ``pattern``; unset fields stay."""

    pattern: str
    bits: int | None | str = "keep"  # "keep" = unchanged; None = off
    symmetric: bool | None = None
    granularity: str | None = None
    axis: int | None = None
    groups: int | None = None
    permute: bool | None = None
    outliers: int | None = None
    estimator: str | None = None
    smooth: float | None | str = "keep"  # "keep" = unchanged; None = no smoothing; else alpha or "auto"
    shift: bool | None = None  # None = unchanged
    zero_point: int | None = None  # token: a fixed per-row zero-point (zp<N>); None = unchanged
    optional: bool = False  # a preset's pattern that may match nothing on some families (no error)

    def apply(self, s: QuantizerSettings) -> QuantizerSettings:
        changes: dict[str, Any] = {}
        if self.bits != "keep":
            changes["bits"] = self.bits
        for f in ("symmetric", "granularity", "axis", "groups", "permute", "outliers", "estimator"):
            v = getattr(self, f)
            if v is not None:
                changes[f] = v
        if self.smooth != "keep":
            changes["smooth"] = self.smooth
        elif changes.get("granularity", "tensor") not in SMOOTHABLE or changes.get("bits", 8) is None:
            changes["smooth"] = None  # a new granularity (or off) ends an inherited smoothing
        if self.shift is not None:
            changes["shift"] = self.shift
        if self.zero_point is not None:
            changes["zero_point"] = self.zero_point
        elif changes.get("granularity", "token") != "token" or changes.get("symmetric") is True:
            changes["zero_point"] = None  # another granularity, or a symmetric grid, ends an inherited one
        if changes.get("smooth", s.smooth) is None:
            changes["shift"] = False  # no smoothing, no shift
        return dataclasses.replace(s, **changes)

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def text(self) -> str:
        toks = []
        if self.bits != "keep":
            toks.append("off" if self.bits is None else str(self.bits))
        if self.granularity == "peg":
            toks.append(_peg_token(self.groups, self.permute, self.outliers or 0))
        elif self.granularity == "channel":
            toks.append(f"channel{self.axis or 0}")
        elif self.granularity == "embedding":
            toks.append("emb")
        elif self.granularity == "tensor":
            toks.append("tensor")
        elif self.granularity == "token":
            toks.append("token")
        if self.zero_point is not None:
            toks.append(f"zp{self.zero_point}")
        if self.estimator:
            toks.append({"current_minmax": "minmax", "running_minmax": "running"}.get(
                self.estimator, self.estimator))
        if self.symmetric is not None:
            toks.append("sym" if self.symmetric else "asym")
        if self.smooth != "keep":
            toks.append("nosq" if self.smooth is None else sq_token(self.smooth))
        if self.shift is not None:
            toks.append("shift" if self.shift else "noshift")
        if self.optional:
            toks.append("optional")
        return f"{self.pattern}={','.join(toks)}"


_BITS_RE = re.compile(r"^[aw]?(\d+)b?$")
_PEG_RE = re.compile(r"^peg(\d+)(p?)(?:o(\d+))?$")


def sq_token(alpha: float | str) -> str:
    """``sq<alpha>`` or ``sqauto``."""
    return "sqauto" if alpha == "auto" else f"sq{alpha:g}"


def _peg_token(groups: int, permute: bool, outliers: int) -> str:
    """``peg<K>[p][o<M>]``: K groups, range-based permutation, a last group of M outlier dims."""
    return f"peg{groups}{'p' if permute else ''}{f'o{outliers}' if outliers else ''}"
_CHANNEL_RE = re.compile(r"^channel(\d*)$")
_ZP_RE = re.compile(r"^zp(\d+)$")
_SQ_RE = re.compile(r"^sq(\d*\.?\d*)$")


def parse_override(text: str) -> Override:
    """Parse ``PATTERN=TOKEN[,TOKEN...]`` (see the module docstring)."""
    if text.count("=") != 1:
        raise ConfigError(
            f"override {text!r} must look like PATTERN=TOKENS, e.g. "
            f"'encoder.layer.*.ffn.residual_sum=a16' or '...=off' or '...=peg6p'"
        )
    pattern, spec = (p.strip() for p in text.split("="))
    if not pattern:
        raise ConfigError(f"override {text!r} has an empty pattern before '='")
    tokens = [t.strip().lower() for t in spec.split(",") if t.strip()]
    if not tokens:
        raise ConfigError(f"override {text!r} has nothing after '='; e.g. a16, off, peg6p, mse")
    o = Override(pattern=pattern)
    for t in tokens:
        if t == "off":
            o.bits = None
        elif m := _BITS_RE.match(t):
            b = int(m.group(1))
            if not MIN_BITS <= b <= MAX_BITS:
                raise ConfigError(f"override {text!r}: bit-width {b} not in {MIN_BITS}..{MAX_BITS}")
            o.bits = b
        elif t == "tensor":
            o.granularity = "tensor"
        elif t == "token":
            o.granularity = "token"
        elif t in ("emb", "embedding"):
            o.granularity = "embedding"
        elif m := _PEG_RE.match(t):
            o.granularity, o.groups, o.permute = "peg", int(m.group(1)), bool(m.group(2))
            o.outliers = int(m.group(3)) if m.group(3) else 0
            if o.groups < 1:
                raise ConfigError(f"override {text!r}: PEG needs at least 1 group")
            if m.group(3) and (o.outliers < 1 or o.groups < 2):
                raise ConfigError(
                    f"override {text!r}: a PEG outlier group needs at least 1 dim and K >= 2 groups; "
                    f"e.g. peg2po16 (16 outlier dims + one group for the rest)"
                )
        elif m := _CHANNEL_RE.match(t):
            o.granularity, o.axis = "channel", int(m.group(1) or 0)
        elif t in ("sym", "symmetric"):
            o.symmetric = True
        elif t in ("asym", "asymmetric"):
            o.symmetric = False
        elif t == "optional":
            o.optional = True
        elif t == "nosq":
            o.smooth = None
        elif t == "sqauto":
            o.smooth = "auto"
        elif t in ("shift", "noshift"):
            o.shift = t == "shift"
        elif m := _ZP_RE.match(t):
            o.zero_point = int(m.group(1))
            if o.zero_point < 1:
                raise ConfigError(f"override {text!r}: a fixed zero-point needs N >= 1, e.g. zp32")
        elif m := _SQ_RE.match(t):
            try:
                a = float(m.group(1)) if m.group(1) else 0.5
            except ValueError:
                a = -1.0
            if not 0 < a <= 1:
                raise ConfigError(f"override {text!r}: {t!r} needs a migration strength in (0, 1], e.g. sq0.8")
            o.smooth = a
        else:
            try:
                o.estimator = canonical_estimator(t)
            except ValueError:
                raise ConfigError(
                    f"override {text!r}: unknown token {t!r}; allowed: off, a<bits>/w<bits>, tensor, "
                    f"token, zp<N>, channel[AXIS], emb, peg<K>[p][o<M>], sq<alpha>, sqauto, nosq, shift, noshift, "
                    f"minmax, running, mse, sym, asym, optional"
                ) from None
    return o


@dataclass
class CalibrationConfig:
    batch_size: int = 1
    num_batches: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.num_batches < 1:
            raise ConfigError(
                f"calibration needs batch_size >= 1 and num_batches >= 1, got "
                f"{self.batch_size} x {self.num_batches}"
            )


def _weights_default() -> QuantizerSettings:
    return QuantizerSettings(bits=8, symmetric=True, estimator="current_minmax")


def _acts_default() -> QuantizerSettings:
    return QuantizerSettings(bits=8, symmetric=False, estimator="running_minmax")


@dataclass
class QuantConfig:
    name: str = "custom"
    description: str = ""
    weights: QuantizerSettings = field(default_factory=_weights_default)
    activations: QuantizerSettings = field(default_factory=_acts_default)
    embeddings: QuantizerSettings | None = None
    overrides: list[Override] = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    # ---------------------------------------------------------------- resolution
    def settings_for(self, name: str, is_weight: bool) -> QuantizerSettings:
        if is_weight:
            base = self.weights
            if self.embeddings is not None and name.startswith("embeddings.") and name.endswith(".weight"):
                base = self.embeddings
        else:
            base = self.activations
        s = dataclasses.replace(base)
        for o in self.overrides:
            if o.matches(name):
                s = o.apply(s)
        return s

    def resolve(self, names_weight: dict[str, bool]) -> dict[str, QuantizerSettings]:
        """Settings per quantizer name; ``names_weight`` maps name -> is-weight.

        Raises :class:`ConfigError` for an override pattern that matches nothing, listing close names.
        """
        names = list(names_weight)
        for o in self.overrides:
            if not o.optional and not any(o.matches(n) for n in names):
                close = difflib.get_close_matches(o.pattern, names, n=5, cutoff=0.5)
                hint = f"; close names: {', '.join(close)}" if close else "; see `pegq list-quantizers`"
                raise ConfigError(f"override pattern {o.pattern!r} matches no quantizer{hint}")
        return {n: self.settings_for(n, w) for n, w in names_weight.items()}

    def with_overrides(self, texts: list[str]) -> QuantConfig:
        c = dataclasses.replace(self, overrides=list(self.overrides) + [parse_override(t) for t in texts])
        return c

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; allowed: {sorted(known)}")
        try:
            for key in ("weights", "activations"):
                if key in d:
                    d[key] = QuantizerSettings(**d[key])
            if d.get("embeddings") is not None:
                d["embeddings"] = QuantizerSettings(**d["embeddings"])
            if "calibration" in d:
                d["calibration"] = CalibrationConfig(**d["calibration"])
            if "overrides" in d:
                d["overrides"] = [
                    parse_override(o) if isinstance(o, str) else Override(**o) for o in d["overrides"]
                ]
        except TypeError as e:
            raise ConfigError(f"bad config: {e}") from None
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> QuantConfig:
        import yaml

        return cls.from_dict(yaml.safe_load(text))

    @classmethod
    def load(cls, path: str | Path) -> QuantConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a .json/.yaml file or a preset name")
        text = p.read_text()
        return cls.from_yaml(text) if p.suffix in (".yaml", ".yml") else cls.from_json(text)


# --------------------------------------------------------------------------- presets
def _preset_w8a8() -> QuantConfig:
    return QuantConfig(
        name="w8a8",
        description="8-bit per-tensor weights (symmetric, min-max) and activations (asymmetric, "
        "running min-max over 16 single-sequence batches): the paper's W8A8 PTQ baseline",
    )


def _preset_w8a32() -> QuantConfig:
    c = _preset_w8a8()
    c.name, c.description = "w8a32", "8-bit weights only (activations FP32)"
    c.activations = dataclasses.replace(c.activations, bits=None)
    return c


def _preset_w32a8() -> QuantConfig:
    c = _preset_w8a8()
    c.name, c.description = "w32a8", "8-bit activations only (weights FP32)"
    c.weights = dataclasses.replace(c.weights, bits=None)
    return c


def _preset_fp32() -> QuantConfig:
    c = _preset_w8a8()
    c.name, c.description = "fp32", "nothing quantized (reference)"
    c.weights = dataclasses.replace(c.weights, bits=None)
    c.activations = dataclasses.replace(c.activations, bits=None)
    return c


PRESETS: dict[str, Any] = {
    "fp32": _preset_fp32,
    "w8a8": _preset_w8a8,
    "w8a32": _preset_w8a32,
    "w32a8": _preset_w32a8,
}


# ============================================================================ PTQ cures (issue 4)
# Mixed-precision PTQ (paper Table 4) and per-embedding(-group) PTQ (Tables 5 and 6). All of them share
# the paper's section-5 PTQ setup: 8-bit symmetric per-tensor min-max weights, 8-bit asymmetric
# activations with current min-max ranges "from a single input sequence" (calibration 1 x 1; the seed
# picks the sequence). `peg-1` is that setup with nothing cured: the "W8A8 PTQ" / "1 (=per-tensor)" row.
# The FFN tensors are named as in the BERT-style adapters (bert, roberta, mpnet, distilbert); on
# MobileBERT they reach the last FFN of each layer's stack only (docs/architecture.md, "PTQ cures").
FFN_INPUT = "encoder.layer.*.attn.layernorm"
FFN_OUTPUT = "encoder.layer.*.ffn.output"
FFN_RESIDUAL_SUM = "encoder.layer.*.ffn.residual_sum"
QKV_INPUT = "encoder.layer.*.ffn.layernorm"  # a layer's output: the next layer's Q/K/V input (and residual)
FFN_HIDDEN = "encoder.layer.*intermediate"  # the second FFN Linear's input (MobileBERT: every stacked FFN's too)
FFN_TENSORS = (FFN_INPUT, FFN_OUTPUT, FFN_RESIDUAL_SUM)
# "final output" (Table 4, double dagger): the head's activations -- the pooler (BERT) or the dense layer
# of a RoBERTa-style head, and the logits with the MSE range estimator; optional because a bare encoder
# has no logits and RoBERTa-style models no pooler.
FINAL_OUTPUT = ("pooler=a16,optional", "classifier.dense=a16,optional", "classifier.output=a16,mse,optional")


def _cures_base(name: str, description: str, overrides: list[str] | tuple[str, ...] = ()) -> QuantConfig:
    c = _preset_w8a8()
    c.name, c.description = name, description
    c.activations = dataclasses.replace(c.activations, estimator="current_minmax")
    c.calibration = CalibrationConfig(batch_size=1, num_batches=1)
    c.overrides = [parse_override(o) for o in overrides]
    return c


def _ffn(tokens: str) -> list[str]:
    return [f"{p}={tokens}" for p in FFN_TENSORS]


_CURES: dict[str, tuple[str, list[str]]] = {
    "peg-1": ("Table 4/5 baseline: W8A8 per-tensor, current min-max on one calibration sequence", []),
    "mp-ptq-res": ("MP-PTQ* (Table 4): as peg-1, FFN residual sums in 16 bits", [f"{FFN_RESIDUAL_SUM}=a16"]),
    "mp-ptq-ffn": ("MP-PTQ*+ (Table 4): as mp-ptq-res, plus FFN input and output in 16 bits", _ffn("a16")),
    "mp-ptq": ("MP-PTQ*+$ (Table 4): as mp-ptq-ffn, plus the final output (pooler/head, logits with MSE) in "
               "16 bits", _ffn("a16") + list(FINAL_OUTPUT)),
    "peg-d-all": ("Table 5, K=d: per-embedding ranges for every token activation (softmax input/output: "
                  "last dim is a key position, and the head: one vector per sequence, stay per-tensor)",
                  ["encoder.layer.*.attn.scores=tensor", "encoder.layer.*.attn.probs=tensor",
                   "pooler=tensor,optional", "classifier.dense=tensor,optional",
                   "classifier.output=tensor,optional"]),
    "peg-d": ("Table 5, K=d (only FFN): per-embedding ranges for FFN input, output and residual sum",
              _ffn("emb")),
    "peg-6": ("Table 5: PEG with K=6 groups on FFN input, output and residual sum", _ffn("peg6")),
    "peg-3": ("Table 5: PEG with K=3 groups on FFN input, output and residual sum", _ffn("peg3")),
    "peg-3p": ("Table 5: as peg-3 with the range-based permutation (shared per layer)", _ffn("peg3p")),
    "peg-6p": ("Table 5: as peg-6 with the range-based permutation (shared per layer)", _ffn("peg6p")),
    "peg-12p": ("not in the paper: PEG K=12 with the range-based permutation on FFN input, output and residual "
                "sum (narrower groups, e.g. for d=384 models)", _ffn("peg12p")),
    "peg-ptq": ("PEG-PTQ (Table 6): K=6 with range-based permutation on FFN input, output and residual "
                "sum (= peg-6p)", _ffn("peg6p")),
}


def _cure_factory(name: str):
    def factory() -> QuantConfig:
        description, overrides = _CURES[name]
        c = _cures_base(name, description, overrides)
        if name == "peg-d-all":
            c.activations = dataclasses.replace(c.activations, granularity="embedding")
        return c

    factory.__name__ = f"_preset_{name.replace('-', '_')}"
    return factory


PRESETS.update({name: _cure_factory(name) for name in _CURES})
# ============================================================================ end PTQ cures


# ============================================================================ low-bit and QAT (issue 6)
# Paper section 5 and Table 7: below 8 bits, weights and token embeddings always use the MSE range
# estimator. "Token embeddings" = the word-embedding table (`embeddings.word.weight`, every family); the
# position and token-type tables follow the weights. The qat-* presets are the PTQ setups QAT starts
# from (`pegq qat` calibrates with them, then learns every range jointly with the weights); used with
# `pegq ptq` they are plain PTQ. W4A32 AdaRound = `pegq ptq -p w4a32 --adaround`.
TOKEN_EMBEDDINGS = "embeddings.word.weight"

_LOW_BIT: dict[str, tuple[str, int, int | None, int | None]] = {
    # name: (description, weight bits, activation bits (None = FP32), token-embedding bits)
    "w6a32": ("Table 7 W6A32 PTQ: 6-bit weights and embeddings (MSE ranges), activations FP32", 6, None, None),
    "w4a32": ("Table 7 W4A32 PTQ: 4-bit weights and embeddings (MSE ranges), activations FP32; "
              "add --adaround for W4A32 AdaRound", 4, None, None),
    "w8a32-e6": ("Table 12: 8-bit weights, 6-bit token embeddings (MSE), activations FP32", 8, None, 6),
    "w8a32-e4": ("Table 12: 8-bit weights, 4-bit token embeddings (MSE), activations FP32", 8, None, 4),
    "w8a32-e2": ("Table 12: 8-bit weights, 2-bit token embeddings (MSE), activations FP32", 8, None, 2),
    "qat-w8a8": ("Table 6 W8A8 QAT (pegq qat): starts from the W8A8 PTQ setup (weights min-max, "
                 "activations running min-max over 16 sequences)", 8, 8, None),
    "qat-w4a8": ("Table 7 W4A8 QAT (pegq qat): 4-bit weights and embeddings (MSE init), 8-bit activations",
                 4, 8, None),
    "qat-w4a8-e2": ("Table 7 W4A8 QAT with 2-bit token embeddings (MSE init)", 4, 8, 2),
}


def _low_bit_factory(name: str):
    def factory() -> QuantConfig:
        description, w_bits, a_bits, e_bits = _LOW_BIT[name]
        c = _preset_w8a8()
        c.name, c.description = name, description
        c.weights = dataclasses.replace(c.weights, bits=w_bits, estimator="mse" if w_bits < 8 else "current_minmax")
        c.activations = dataclasses.replace(c.activations, bits=a_bits)
        if e_bits is not None:
            c.overrides = [parse_override(f"{TOKEN_EMBEDDINGS}={e_bits},mse")]
        return c

    factory.__name__ = f"_preset_{name.replace('-', '_')}"
    return factory


PRESETS.update({name: _low_bit_factory(name) for name in _LOW_BIT})
# ============================================================================ end low-bit and QAT


# ============================================================================ int8 deployment (issue 7)
# On ONNX Runtime (and other CPU int8 runtimes) only matrix multiplications run on integer kernels: the
# residual sums, LayerNorm, softmax and GELU run in float whatever the QDQ graph says, so quantizing
# their inputs costs time (extra QuantizeLinear/DequantizeLinear) and accuracy and buys nothing. These
# presets quantize an activation only where a matmul consumes it (the input of every Linear and both
# operands of the two attention matmuls), per-tensor as the kernels need. Weights: 8-bit per-tensor with
# the MSE range (min-max costs MPNet-base 4.6 points at W8A32). Not per-channel: ORT's u8 x s8 kernel on
# x86 CPUs without VNNI adds pairs of products in saturating int16, and per-channel scales put every row's
# largest weight at +-127, so pairs saturate often (MPNet, per-channel int8 weights: logit cosine -0.03 on
# ORT against 0.94 simulated; docs/results.md section 4). Not in the paper, whose simulation targets
# fixed-point hardware that quantizes every tensor.
NOT_MATMUL_INPUTS = (
    "embeddings.sum*=off,optional",  # summed embeddings: the LayerNorm's input
    "*.attn.scores=off,optional",  # softmax input
    "*.attn.output=off,optional",  # attention output projection's result: residual-sum operand
    "*.ffn.output=off,optional",  # second FFN Linear's result: residual-sum operand
    "*residual_sum=off,optional",  # LayerNorm inputs
    "classifier.output=off,optional",  # logits
)

# The input of a classifier's last Linear (hidden -> labels): a [batch, d] x [d, labels] matmul, nothing next to
# the encoder's, but its 8-bit input is a visible part of the logit error (MPNet head-only fine-tune: dev-logit
# cosine 0.9959 -> 0.9968 with it in float)
HEAD_INPUT_FLOAT = ("pooler=off,optional", "classifier.dense=off,optional")

_DEPLOY: dict[str, tuple[str, list[str]]] = {
    "w8a8-gemm": ("int8 deployment (not in the paper): 8-bit per-tensor activations only where a matmul "
                  "consumes them (ONNX Runtime runs the rest in float anyway), 8-bit per-tensor weights with "
                  "MSE ranges", []),
    "peg-gemm": ("int8 deployment (not in the paper): as w8a8-gemm, plus PEG K=6 with the range-based "
                 "permutation on the FFN input (the only matmul input that carries the residual outliers); "
                 "exported as 6 per-tensor int8 matmuls", [f"{FFN_INPUT}=peg6p"]),
    "peg-outlier-gemm": ("int8 deployment (not in the paper): as w8a8-gemm with per-output-channel encoder "
                         "weights and embedding tables with one scale per embedding dim (looked up as int8 "
                         "rows, dequantized after the lookup), plus PEG with one 16-dim outlier group "
                         "(peg2po16: the 16 widest-range dims get their own range, every other dim one narrow "
                         "range) on the FFN input and on the FFN hidden activation (the second FFN Linear's "
                         "input); exported as 2-way split int8 matmuls",
                         [f"{FFN_INPUT}=peg2po16", f"{FFN_HIDDEN}=peg2po16", "encoder.layer.*.weight=channel",
                          "embeddings.*.weight=channel1,optional"]),
    "sq-gemm": ("int8 deployment (not in the paper): as peg-outlier-gemm, but the LayerNorm outputs that matmuls "
                "read (the Q/K/V input and the FFN input) are per-tensor with SmoothQuant-style smoothing "
                "(sq0.8: per-dim scales s = max|x|^0.8 / max|W|^0.2 moved into the input columns of the Linears "
                "reading them; pegq.smooth) instead of PEG; the FFN hidden activation keeps its 16-dim outlier "
                "group (peg2po16); the classifier's last Linear (hidden -> labels, one vector per sequence) reads "
                "its input in float; exported as one int8 matmul per encoder Linear (two for the second FFN "
                "Linear)",
                [f"{FFN_INPUT}=tensor,sq0.8", f"{QKV_INPUT}=sq0.8,optional", "embeddings.layernorm=sq0.8,optional",
                 f"{FFN_HIDDEN}=peg2po16", "encoder.layer.*.weight=channel", "embeddings.*.weight=channel1,optional",
                 *HEAD_INPUT_FLOAT]),
    "sq-token-gemm": ("int8 deployment (not in the paper): as sq-gemm, but every encoder Linear's input -- the "
                      "Q/K/V input, the attention context (output projection input), the FFN input and the FFN "
                      "hidden activation -- quantized per token with dynamic ranges (min/max of each token's vector "
                      "at run time, SmoothQuant's per-token setting), smoothing kept on the LayerNorm outputs; the "
                      "two attention matmuls keep static per-tensor operands; exported as int8 matmuls with a "
                      "per-row scale (MatMulIntegerToFloat) and a per-row zero-point correction",
                      [f"{FFN_INPUT}=token,sq0.8", f"{QKV_INPUT}=token,sq0.8,optional",
                       "embeddings.layernorm=token,sq0.8,optional", f"{FFN_HIDDEN}=token",
                       "*.attn.context=token,optional",
                       "encoder.layer.*.weight=channel", "embeddings.*.weight=channel1,optional", *HEAD_INPUT_FLOAT]),
}
_DEPLOY["sq-token-probs-gemm"] = (
    "int8 deployment (not in the paper): as sq-token-gemm, plus the attention probabilities (softmax output, the "
    "left operand of the matmul with V) quantized per token (per query row) with dynamic ranges; each row's range "
    "starts at 0, so its zero-point is 0; exported as an integer matmul with V's static uint8 codes in heads and "
    "a per-row scale",
    [*_DEPLOY["sq-token-gemm"][1], "*.attn.probs=token"])
_DEPLOY["sq-token-sym-gemm"] = (
    "int8 deployment (not in the paper): as sq-token-probs-gemm, but the LayerNorm outputs that matmuls read (the "
    "Q/K/V input and the FFN input) are quantized per token *symmetrically* (each token's range is +-max|x|): every "
    "row's codes share one zero-point, so their integer matmuls need no per-row zero-point correction (the largest "
    "one is the FFN's first Linear, 3072 outputs per token); exported as uint8 codes + 128",
    [*_DEPLOY["sq-token-probs-gemm"][1], f"{FFN_INPUT}=sym", f"{QKV_INPUT}=sym,optional",
     "embeddings.layernorm=sym,optional"])
_DEPLOY["sq-token-zp-gemm"] = (
    "int8 deployment (not in the paper): as sq-token-sym-gemm, and the FFN hidden activation (the GELU output, "
    "whose min is about -0.17 in every row) keeps one zero-point for every row, 64 (zp64: each row's scale covers "
    "its max and the calibrated min): the largest per-token tensor gets no per-row zero-point and no per-row min; "
    "its integer matmul (the FFN's second Linear) no zero-point correction",
    [*_DEPLOY["sq-token-sym-gemm"][1], f"{FFN_HIDDEN}=zp64"])


def _deploy_factory(name: str):
    def factory() -> QuantConfig:
        description, extra = _DEPLOY[name]
        c = _preset_w8a8()
        c.name, c.description = name, description
        c.weights = dataclasses.replace(c.weights, estimator="mse")
        c.overrides = [parse_override(o) for o in (*NOT_MATMUL_INPUTS, *extra)]
        return c

    factory.__name__ = f"_preset_{name.replace('-', '_')}"
    return factory


PRESETS.update({name: _deploy_factory(name) for name in _DEPLOY})
# ============================================================================ end int8 deployment


def register_preset(name: str, factory) -> None:
    PRESETS[name] = factory


def get_preset(name: str) -> QuantConfig:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; available: {', '.join(PRESETS)}")
    return PRESETS[name]()


def resolve_config(preset_or_path: str | QuantConfig) -> QuantConfig:
    """A preset name, a JSON/YAML file path, or a QuantConfig."""
    if isinstance(preset_or_path, QuantConfig):
        return preset_or_path
    s = str(preset_or_path)
    if s.endswith((".json", ".yaml", ".yml")) or Path(s).is_file():
        return QuantConfig.load(s)
    return get_preset(s)
