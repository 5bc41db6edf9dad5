"""The quantizer module: one per weight or activation tensor (paper Figure 1 / section 2).

It applies eq. (1)-(2) (:mod:`pegq.quant.functional`) with the scale/zero-point shared as the
granularity says (per-tensor; per-channel; per-embedding and per-embedding-group PEG, eq. 4-5 and
section 4, :mod:`pegq.quant.granularity`), and ranges from a static range estimator
(:mod:`pegq.quant.estimators`).

States (:class:`QuantState`):

* ``ESTIMATING`` -- every forward updates the range with the range estimator, then quantizes with
  the updated range (so that downstream quantizers see quantized inputs, as at inference);
* ``FROZEN``     -- fixed range, plain fake-quantization;
* ``LEARNING``   -- scale and zero-point are ``nn.Parameter``s trained with the rest of the model
  (QAT with LSQ-style gradients through the straight-through estimator, Esser et al. 2019),
  initialised from the current range.

Transitions: ``reset()`` -> ESTIMATING with no range; ``estimate()`` -> ESTIMATING (drops learned
parameters, keeps the range to continue from); ``freeze()`` -> FROZEN (needs a range or learned
parameters); ``learn_ranges()`` -> LEARNING (needs a range). ``bits=None`` (or ``"off"``) means
"off": the quantizer passes its input through untouched in every state.

Smoothing (SmoothQuant, Xiao et al. 2022; not in the paper): ``smooth`` is an optional vector ``m`` along
the tensor's last axis; the quantizer then returns ``q(x * m) / m`` (ranges estimated on ``x * m``). An
activation read by Linear layers gets ``m = 1/s`` and those Linears' weight quantizers ``m = s`` (their
input columns), so the integer matmul sees the per-tensor codes of ``x / s`` and of ``W diag(s)``:
per-dim activation ranges moved into the weights. :mod:`pegq.smooth` picks ``s`` at calibration;
``set_smooth`` sets it (a new ``m`` resets the range). An activation may also carry a per-dim ``shift``
``z`` (Outlier Suppression+, Wei et al. 2023): it then returns ``q((x - z) * m) / m + z``, so each dim is
centred before the per-tensor range is taken (the readers' biases absorb ``W z`` in an integer deployment).

Bad input raises ``ValueError`` naming the quantizer, the offending value and what is allowed:
bit-widths outside 2..16, PEG ``K`` not dividing ``d``, a permutation that is not one, empty or
non-finite tensors during range estimation, a tensor whose layout does not match the estimated
parameters.
"""

from __future__ import annotations

import enum
import math
import numbers

import torch
from torch import nn

from .adaround import fake_quant_fixed_rounding
from .estimators import RangeEstimator, canonical_estimator
from .functional import EPS_SCALE, MAX_BITS, MIN_BITS, fake_quant, grid, qparams_from_range
from .granularity import (
    Granularity,
    PerEmbeddingGroup,
    PerTensor,
    group_index_from_perm,
)
from .lsq import fake_quant_learnable, grad_scale, lsq_grad_factor


class QuantState(enum.StrEnum):
    ESTIMATING = "estimating"
    FROZEN = "frozen"
    LEARNING = "learning"


def normalize_bits(bits, name: str = "quantizer") -> int | None:
    """``bits`` as an int in 2..16 or ``None`` (off); ``"off"``/``"none"``/``"fp32"`` mean off."""
    if bits is None or (isinstance(bits, str) and bits.lower() in ("off", "none", "fp32", "32")):
        return None
    if isinstance(bits, numbers.Integral) and not isinstance(bits, bool):
        bits = int(bits)
    check_bits(bits, name)
    return bits


def check_bits(bits: int | None, name: str) -> None:
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{name}: bit-width {bits!r} is not allowed; use an integer in "
            f"{MIN_BITS}..{MAX_BITS}, or None/'off' for no quantization"
        )


def _check_symmetric(symmetric, name: str) -> bool:
    if not isinstance(symmetric, bool):
        raise ValueError(f"{name}: symmetric must be True or False, got {symmetric!r}")
    return symmetric


def _check_granularity(granularity, name: str) -> Granularity:
    if granularity is None:
        return PerTensor()
    if not isinstance(granularity, Granularity):
        raise ValueError(
            f"{name}: granularity {granularity!r} is not allowed; use PerTensor(), PerChannel(axis), "
            f"PerEmbedding(), PerToken() or PerEmbeddingGroup(K, permute)"
        )
    return granularity


def _check_fixed_zero_point(bits: int | None, symmetric: bool, granularity: Granularity, name: str) -> None:
    """A per-token quantizer with a fixed zero-point: asymmetric, with the zero-point inside the grid."""
    z = getattr(granularity, "zero_point", None)
    if z is None or bits is None:
        return
    if symmetric:
        raise ValueError(f"{name}: a fixed per-token zero-point ({z}) needs an asymmetric quantizer; a symmetric "
                         f"one already shares its zero-point (drop one of the two)")
    if not 1 <= z < 2**bits - 1:
        raise ValueError(f"{name}: a fixed per-token zero-point {z} is outside 1..{2**bits - 2}, the inside of the "
                         f"{bits}-bit grid; pick one there (e.g. {max(1, 2 ** (bits - 3))})")


class Quantizer(nn.Module):
    def __init__(
        self,
        name: str = "quantizer",
        bits: int | None = 8,
        symmetric: bool = False,
        granularity: Granularity | None = None,
        estimator: str = "current_minmax",
        momentum: float = 0.9,
        mse_candidates: int = 100,
    ):
        super().__init__()
        self.name = name
        self.bits = normalize_bits(bits, name)
        self.symmetric = _check_symmetric(symmetric, name)
        self.granularity = _check_granularity(granularity, name)
        _check_fixed_zero_point(self.bits, self.symmetric, self.granularity, name)
        self.estimator = RangeEstimator(estimator, momentum, mse_candidates, name=name)
        self.state = QuantState.ESTIMATING
        self.register_buffer("x_min", None)
        self.register_buffer("x_max", None)
        self.register_buffer("perm", None)
        self.register_buffer("group_index", None)
        # AdaRound / GPTQ (pegq.quant.adaround, .gptq): per-element rounding offsets from floor(W/s) (AdaRound:
        # uint8 0/1; GPTQ: int16), shaped like the weight
        # used instead of round-to-nearest when set; dropped by reset()/estimate()
        self.register_buffer("round_offset", None)
        self.register_buffer("smooth", None)  # per-last-axis prescale m: q(x * m) / m (see the module docstring)
        self.register_buffer("shift", None)  # with smooth, per-last-axis centre z: q((x - z) * m) / m + z
        self.smooth_alpha: float | str | None = None  # activations: migration strength or "auto" (pegq.smooth)
        self.smooth_shift = False  # activations: also centre each dim (pegq.smooth)
        self.register_parameter("scale_param", None)
        self.register_parameter("zero_param", None)
        self._qcache = None
        # LEARNING: scale/zero gradients times 1/sqrt(N * Qp) (LSQ; see pegq.quant.lsq for why)
        self.lsq_grad_scale = True

    # ------------------------------------------------------------------ configuration
    @property
    def enabled(self) -> bool:
        return self.bits is not None

    def configure(self, bits=..., symmetric=..., granularity=..., estimator=..., momentum=...):
        """Change settings; ranges are reset when anything that shapes them changes."""
        if bits is not ...:
            bits = normalize_bits(bits, self.name)
        if symmetric is not ...:
            symmetric = _check_symmetric(symmetric, self.name)
        if granularity is not ...:
            granularity = _check_granularity(granularity, self.name)
        if estimator is not ... or momentum is not ...:
            new_est = RangeEstimator(
                self.estimator.kind if estimator is ... else canonical_estimator_named(estimator, self.name),
                self.estimator.momentum if momentum is ... else momentum,
                self.estimator.mse_candidates,
                name=self.name,
            )
        _check_fixed_zero_point(self.bits if bits is ... else bits, self.symmetric if symmetric is ... else symmetric,
                                self.granularity if granularity is ... else granularity, self.name)
        # validated everything: now apply
        if bits is not ...:
            self.bits = bits
        if symmetric is not ...:
            self.symmetric = symmetric
        if granularity is not ...:
            self.granularity = granularity
            self.perm = None
            self.group_index = None
        if estimator is not ... or momentum is not ...:
            self.estimator = new_est
        self.reset()
        return self

    def set_permutation(self, perm: torch.Tensor | None) -> None:
        """Permutation of the embedding dims for a (permuted) PEG granularity.

        Group ``g`` is the ``g``-th slice of ``perm`` (``perm[g*d/K:(g+1)*d/K]`` for even groups; see
        :meth:`PerEmbeddingGroup.sizes`). A different permutation invalidates the range:
        the quantizer is reset (back to ESTIMATING) when the permutation changes.
        """
        if perm is None:
            changed = self.perm is not None
            self.perm = None
            self.group_index = None
            if changed:
                self.reset()
            return
        if not isinstance(self.granularity, PerEmbeddingGroup):
            raise ValueError(
                f"{self.name}: a permutation needs a PEG granularity, not {self.granularity.describe()}"
            )
        p = torch.as_tensor(perm)
        if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool or p.ndim != 1:
            raise ValueError(
                f"{self.name}: the permutation must be a 1-D integer tensor, got dtype {p.dtype} and "
                f"shape {tuple(p.shape)}"
            )
        p = p.to(torch.long)
        d = p.numel()
        if d == 0 or not torch.equal(torch.sort(p).values, torch.arange(d, device=p.device)):
            raise ValueError(
                f"{self.name}: {p.tolist()[:8]}{'...' if d > 8 else ''} is not a permutation of "
                f"0..{d - 1}; pass each embedding index in 0..{d - 1} exactly once"
            )
        self.granularity.check(d, self.name)
        device = self.x_min.device if self.x_min is not None else p.device
        p = p.to(device)
        changed = self.perm is None or not torch.equal(self.perm.to(device), p)
        self.perm = p
        self.group_index = group_index_from_perm(p, self.granularity.groups, self.granularity.sizes(d))
        if changed and (self.x_min is not None or self.scale_param is not None):
            self.reset()

    def set_smooth(self, m: torch.Tensor | None, shift: torch.Tensor | None = None) -> None:
        """Set (or clear, ``None``) the prescale ``m`` along the last axis: the quantizer then returns
        ``q(x * m) / m`` (with a ``shift`` ``z``, same length: ``q((x - z) * m) / m + z``). A different ``m``
        or ``z`` resets the range (back to ESTIMATING)."""
        if m is None:
            if shift is not None:
                raise ValueError(f"{self.name}: a shift needs a smoothing scale (pass both, or neither)")
            changed = self.smooth is not None or self.shift is not None
            self.smooth = None
            self.shift = None
        else:
            m = torch.as_tensor(m).detach()
            if m.ndim != 1 or m.numel() == 0 or not m.is_floating_point():
                raise ValueError(f"{self.name}: the smoothing scale must be a non-empty 1-D float tensor, got "
                                 f"dtype {m.dtype} and shape {tuple(m.shape)}")
            if not bool(torch.isfinite(m).all()) or bool((m <= 0).any()):
                raise ValueError(f"{self.name}: the smoothing scale must be finite and > 0 everywhere")
            m = m.to(torch.float32)
            if shift is not None:
                shift = torch.as_tensor(shift).detach()
                if shift.shape != m.shape or not shift.is_floating_point() or not bool(torch.isfinite(shift).all()):
                    raise ValueError(f"{self.name}: the shift must be a finite float tensor shaped like the smoothing "
                                     f"scale {tuple(m.shape)}, got dtype {shift.dtype} and shape {tuple(shift.shape)}")
                shift = shift.to(device=m.device, dtype=torch.float32)
            changed = self.smooth is None or not torch.equal(self.smooth.to(m.device), m) or (
                (self.shift is None) != (shift is None)) or (
                shift is not None and not torch.equal(self.shift.to(m.device), shift))
            self.smooth = m
            self.shift = shift
        if changed:
            self.reset()

    def reset(self) -> None:
        """Forget the range (and learned parameters) and return to ESTIMATING."""
        self.x_min = None
        self.x_max = None
        self.scale_param = None
        self.zero_param = None
        self.round_offset = None
        self._qcache = None
        self.estimator.reset()
        self.state = QuantState.ESTIMATING

    # ------------------------------------------------------------------ state changes
    def estimate(self) -> Quantizer:
        """(Re-)enter ESTIMATING. Learned parameters (and AdaRound offsets) are dropped: the estimated
        range is used."""
        self.scale_param = None
        self.zero_param = None
        self.round_offset = None
        self.state = QuantState.ESTIMATING
        return self

    def freeze(self) -> Quantizer:
        if self.enabled and self.x_min is None and self.scale_param is None:
            raise ValueError(
                f"{self.name}: cannot freeze a quantizer that has no range yet; "
                f"run calibration data through it first"
            )
        if self.scale_param is not None:
            # keep the learned parameters as the frozen ones
            self.scale_param.requires_grad_(False)
            self.zero_param.requires_grad_(False)
        self.state = QuantState.FROZEN
        return self

    def learn_ranges(self) -> Quantizer:
        """Turn scale and zero-point into trainable parameters (QAT)."""
        if not self.enabled:
            return self
        if self.granularity.dynamic:
            raise ValueError(f"{self.name}: a per-token (dynamic) quantizer has no range to learn; use per-tensor "
                             f"for QAT")
        if self.scale_param is None:
            if self.x_min is None:
                raise ValueError(
                    f"{self.name}: cannot learn ranges before they are initialised; calibrate first"
                )
            s, z = qparams_from_range(self.x_min, self.x_max, self.bits, self.symmetric)
            self.scale_param = nn.Parameter(s.detach().clone())
            self.zero_param = nn.Parameter(z.detach().clone(), requires_grad=not self.symmetric)
        else:
            self.scale_param.requires_grad_(True)
            self.zero_param.requires_grad_(not self.symmetric)
        self.state = QuantState.LEARNING
        return self

    # ------------------------------------------------------------------ parameters
    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current ``(scale, zero_point)``, one entry per parameter pair of the granularity."""
        if self.scale_param is not None:
            return self.scale_param, self.zero_param
        if self.x_min is None:
            raise ValueError(f"{self.name}: no range estimated yet; calibrate first")
        c = self._qcache
        key = (self.bits, self.symmetric, self.x_min._version, self.x_max._version)
        if c is None or c[0] is not self.x_min or c[1] is not self.x_max or c[2] != key:
            s, z = qparams_from_range(self.x_min, self.x_max, self.bits, self.symmetric)
            c = self._qcache = (self.x_min, self.x_max, key, s, z)
        return c[3], c[4]

    @property
    def scale(self) -> torch.Tensor:
        return self.qparams()[0]

    @property
    def zero_point(self) -> torch.Tensor:
        return self.qparams()[1]

    @property
    def qmin(self) -> int:
        return grid(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return grid(self.bits, self.symmetric)[1]

    # ------------------------------------------------------------------ forward
    def _check_layout(self, x: torch.Tensor) -> None:
        g = self.granularity
        g.check(x.shape, self.name)
        if self.perm is not None and self.perm.numel() != x.shape[-1]:
            raise ValueError(
                f"{self.name}: the permutation has {self.perm.numel()} entries but the tensor's last "
                f"dim is {x.shape[-1]}; allowed: a tensor with d={self.perm.numel()}"
            )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            raise ValueError(
                f"{self.name}: got an empty tensor of shape {tuple(x.shape)}; "
                f"range estimation needs at least one element"
            )
        if x.is_complex() or not x.is_floating_point():
            raise ValueError(f"{self.name}: expected a floating-point tensor, got {x.dtype}")
        self._check_layout(x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.granularity.as_rows(x, self.perm)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the range from one batch (what ESTIMATING does before quantizing)."""
        if not self.enabled:
            return
        x = x.detach()
        if x.ndim == 0:
            x = x.reshape(1)
        self._check_input(x)
        mn, mx = self.granularity.minmax(x, self.perm)
        if not bool(torch.isfinite(mn).all() & torch.isfinite(mx).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(
                f"{self.name}: {bad} NaN/inf values seen during range estimation "
                f"(of {x.numel()}); inputs must be finite (check the model in FP32 first)"
            )
        rows = self._rows(x) if self.estimator.kind == "mse" else None
        self.x_min, self.x_max = self.estimator.update(
            rows, self.x_min, self.x_max, self.bits, self.symmetric, batch_range=(mn, mx)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if x.ndim == 0:
            return self.forward(x.reshape(1)).reshape(())
        m = self.smooth
        if m is not None:
            if x.shape[-1] != m.numel():
                raise ValueError(
                    f"{self.name}: the smoothing scale has {m.numel()} entries but the tensor has shape "
                    f"{tuple(x.shape)}; it applies along the last axis (re-calibrate for a new model)"
                )
            return self.unsmooth(self._fake_quant(self.smooth_in(x)))
        return self._fake_quant(x)

    def smooth_in(self, x: torch.Tensor) -> torch.Tensor:
        """What the grid quantizes: ``(x - z) * m`` (``x * m`` without a shift; ``x`` without smoothing)."""
        if self.smooth is None:
            return x
        m = self.smooth.to(device=x.device, dtype=x.dtype)
        return (x if self.shift is None else x - self.shift.to(device=x.device, dtype=x.dtype)) * m

    def unsmooth(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`smooth_in` on the (de)quantized values: ``y / m + z``."""
        if self.smooth is None:
            return y
        y = y / self.smooth.to(device=y.device, dtype=y.dtype)
        return y if self.shift is None else y + self.shift.to(device=y.device, dtype=y.dtype)

    def _fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.state == QuantState.ESTIMATING:
            self.observe(x)
        elif x.numel() == 0:
            return x.clone()
        else:
            self._check_layout(x)
        g = self.granularity
        if g.dynamic:
            return self._fake_quant_dynamic(x)
        scale, zero = self.qparams()
        n = g.num_params(x.shape)
        if scale.numel() != n:
            raise ValueError(
                f"{self.name}: has {scale.numel()} scale(s) but a tensor of shape {tuple(x.shape)} "
                f"needs {n} with {g.describe()}; reset and re-estimate for a new layout"
            )
        if self.scale_param is not None:
            # learned scales stay positive; the gradient passes the clip so a scale pushed below it can recover
            scale = scale + (scale.clamp_min(EPS_SCALE) - scale).detach() if scale.requires_grad else \
                scale.clamp_min(EPS_SCALE)
            if self.state == QuantState.LEARNING and self.lsq_grad_scale and torch.is_grad_enabled():
                gf = lsq_grad_factor(x.numel() // n, self.qmax)
                scale, zero = grad_scale(scale, gf), grad_scale(zero, gf)
        gi = self.group_index
        s = g.broadcast(scale, x, gi)
        z = None if self.symmetric else g.broadcast(zero, x, gi)
        if self.round_offset is not None:
            return fake_quant_fixed_rounding(x, s, z, self.qmin, self.qmax, self.round_offset)
        if self.state == QuantState.LEARNING and torch.is_grad_enabled():
            return fake_quant_learnable(x, s, z, self.qmin, self.qmax)  # same values, fused STE/LSQ grads
        return fake_quant(x, s, z, self.qmin, self.qmax)

    def token_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic (:class:`~pegq.quant.granularity.PerToken`): ``(scale, zero_point)`` of every vector along the
        last axis of ``x`` (the tensor as the grid sees it: smoothed), shaped like ``x`` with the last dim 1."""
        mn, mx = self.granularity.token_minmax(x.detach())
        z = self.granularity.zero_point
        if z is None:
            return qparams_from_range(mn, mx, self.bits, self.symmetric)
        # fixed zero-point z: the row's max on the top step, the calibrated min (not the row's) on the bottom one
        scale = torch.maximum(mx.clamp_min(0) / (self.qmax - z), self.token_scale_floor().to(mx))
        return scale, torch.full_like(scale, float(z))

    def token_scale_floor(self) -> torch.Tensor:
        """A fixed per-token zero-point ``z`` (:attr:`PerToken.zero_point`): the smallest row scale, ``max(-min / z,
        eps)`` with ``min`` the calibrated per-tensor min, so that min stays on the grid's bottom step (a 0-d
        float32 tensor; the ONNX export stores it as a constant)."""
        if self.x_min is None:
            raise ValueError(f"{self.name}: a fixed per-token zero-point needs the calibrated min; calibrate first")
        return ((-self.x_min.detach().float()).clamp_min(0).reshape(()) / self.granularity.zero_point).clamp_min(
            EPS_SCALE)

    def _fake_quant_dynamic(self, x: torch.Tensor) -> torch.Tensor:
        # never LEARNING (learn_ranges refuses it); empty tensors returned earlier by _fake_quant
        s, z = self.token_qparams(x)
        return fake_quant(x, s, None if self.symmetric else z, self.qmin, self.qmax)

    # ------------------------------------------------------------------ loading
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Ranges, permutation and learned parameters start as None (not in the state_dict); make
        # room for them so that a saved quantizer can be loaded into a fresh one.
        for name in ("x_min", "x_max", "perm", "group_index", "round_offset", "smooth", "shift"):
            v = state_dict.get(prefix + name)
            if v is not None and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(v))
        for name in ("scale_param", "zero_param"):
            v = state_dict.get(prefix + name)
            if v is not None and getattr(self, name) is None:
                setattr(self, name, nn.Parameter(torch.empty_like(v), requires_grad=False))
        self._qcache = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ reporting
    def spec(self) -> dict:
        """JSON-able description of the settings (not the ranges)."""
        return {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity.to_dict(),
            "estimator": self.estimator.kind,
            "momentum": self.estimator.momentum,
            **({"smooth": self.smooth_alpha} if self.smooth_alpha is not None else {}),
            **({"shift": True} if self.smooth_shift else {}),
        }

    def extra_repr(self) -> str:
        if not self.enabled:
            return f"{self.name}: off"
        sq = (" smoothed+shifted" if self.shift is not None else " smoothed") if self.smooth is not None else ""
        return (
            f"{self.name}: {self.bits}b {'sym' if self.symmetric else 'asym'} "
            f"{self.granularity.describe()}{sq} {self.estimator.kind} {self.state.value}"
        )

    def bits_per_element(self) -> float:
        return float(self.bits) if self.enabled else 32.0

    def num_qparams(self) -> int:
        if not self.enabled or self.x_min is None and self.scale_param is None:
            return 0
        return int(math.prod(self.qparams()[0].shape)) * 2


def canonical_estimator_named(kind: str, name: str) -> str:
    try:
        return canonical_estimator(kind)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
