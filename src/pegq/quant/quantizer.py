"""The quantizer module: one per weight or activation tensor.

States (:class:`QuantState`):

* ``ESTIMATING`` -- every forward updates the range with the range estimator, then quantizes with
  the updated range (so that downstream quantizers see quantized inputs, as at inference);
* ``FROZEN``     -- fixed range, plain fake-quantization;
* ``LEARNING``   -- scale and zero-point are ``nn.Parameter``s trained with the rest of the model
  (LSQ-style gradients through the straight-through estimator), initialised from the current range.

``bits=None`` means "off": the quantizer passes its input through untouched.
"""

from __future__ import annotations

import enum
import math

import torch
from torch import nn

from .estimators import RangeEstimator, canonical_estimator
from .functional import MAX_BITS, MIN_BITS, fake_quant, grid, qparams_from_range
from .granularity import (
    Granularity,
    PerEmbeddingGroup,
    PerTensor,
    group_index_from_perm,
)


class QuantState(str, enum.Enum):
    ESTIMATING = "estimating"
    FROZEN = "frozen"
    LEARNING = "learning"


def check_bits(bits: int | None, name: str) -> None:
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{name}: bit-width {bits!r} is not allowed; use an integer in "
            f"{MIN_BITS}..{MAX_BITS}, or None/'off' for no quantization"
        )


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
        check_bits(bits, name)
        self.name = name
        self.bits = bits
        self.symmetric = symmetric
        self.granularity = granularity or PerTensor()
        self.estimator = RangeEstimator(canonical_estimator(estimator), momentum, mse_candidates)
        self.state = QuantState.ESTIMATING
        self.register_buffer("x_min", None)
        self.register_buffer("x_max", None)
        self.register_buffer("perm", None)
        self.register_buffer("group_index", None)
        self.register_parameter("scale_param", None)
        self.register_parameter("zero_param", None)

    # ------------------------------------------------------------------ configuration
    @property
    def enabled(self) -> bool:
        return self.bits is not None

    def configure(self, bits=..., symmetric=..., granularity=..., estimator=..., momentum=...):
        """Change settings; ranges are reset when anything that shapes them changes."""
        if bits is not ...:
            check_bits(bits, self.name)
            self.bits = bits
        if symmetric is not ...:
            self.symmetric = symmetric
        if granularity is not ...:
            self.granularity = granularity
            self.perm = None
            self.group_index = None
        if estimator is not ... or momentum is not ...:
            self.estimator = RangeEstimator(
                canonical_estimator(self.estimator.kind if estimator is ... else estimator),
                self.estimator.momentum if momentum is ... else momentum,
                self.estimator.mse_candidates,
            )
        self.reset()
        return self

    def set_permutation(self, perm: torch.Tensor | None) -> None:
        """Permutation of the embedding dims for a permuted PEG granularity."""
        if perm is None:
            self.perm = None
            self.group_index = None
            return
        if not isinstance(self.granularity, PerEmbeddingGroup):
            raise ValueError(
                f"{self.name}: a permutation needs a PEG granularity, not {self.granularity.describe()}"
            )
        perm = torch.as_tensor(perm, dtype=torch.long).flatten()
        d = perm.numel()
        if not torch.equal(torch.sort(perm).values, torch.arange(d)):
            raise ValueError(
                f"{self.name}: {perm.tolist()[:8]}... is not a permutation of 0..{d - 1}; "
                f"pass each embedding index exactly once"
            )
        self.granularity.check(d, self.name)
        self.perm = perm
        self.group_index = group_index_from_perm(perm, self.granularity.groups)

    def reset(self) -> None:
        """Forget the range and return to ESTIMATING."""
        self.x_min = None
        self.x_max = None
        self.scale_param = None
        self.zero_param = None
        self.estimator.reset()
        self.state = QuantState.ESTIMATING

    # ------------------------------------------------------------------ state changes
    def estimate(self) -> Quantizer:
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
        if self.scale_param is None:
            if self.x_min is None:
                raise ValueError(
                    f"{self.name}: cannot learn ranges before they are initialised; calibrate first"
                )
            s, z = qparams_from_range(self.x_min, self.x_max, self.bits, self.symmetric)
            self.scale_param = nn.Parameter(s.clone())
            self.zero_param = nn.Parameter(z.clone(), requires_grad=not self.symmetric)
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
        return qparams_from_range(self.x_min, self.x_max, self.bits, self.symmetric)

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
    def _check_input(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            raise ValueError(
                f"{self.name}: got an empty tensor of shape {tuple(x.shape)}; "
                f"range estimation needs at least one element"
            )
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(
                f"{self.name}: {bad} NaN/inf values seen during range estimation; "
                f"inputs must be finite (check the model in FP32 first)"
            )
        g = self.granularity
        if isinstance(g, PerEmbeddingGroup):
            g.check(x.shape[-1], self.name)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.granularity.as_rows(x, self.perm)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the range from one batch (what ESTIMATING does before quantizing)."""
        self._check_input(x)
        self.x_min, self.x_max = self.estimator.update(
            self._rows(x), self.x_min, self.x_max, self.bits, self.symmetric
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.state == QuantState.ESTIMATING:
            self.observe(x)
        scale, zero = self.qparams()
        g = self.granularity
        s = g.broadcast(scale, x, self.group_index)
        z = g.broadcast(zero, x, self.group_index)
        return fake_quant(x, s.to(x.dtype), z.to(x.dtype), self.qmin, self.qmax)

    # ------------------------------------------------------------------ reporting
    def spec(self) -> dict:
        """JSON-able description of the settings (not the ranges)."""
        return {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity.to_dict(),
            "estimator": self.estimator.kind,
            "momentum": self.estimator.momentum,
        }

    def extra_repr(self) -> str:
        if not self.enabled:
            return f"{self.name}: off"
        return (
            f"{self.name}: {self.bits}b {'sym' if self.symmetric else 'asym'} "
            f"{self.granularity.describe()} {self.estimator.kind} {self.state.value}"
        )

    def bits_per_element(self) -> float:
        return float(self.bits) if self.enabled else 32.0

    def num_qparams(self) -> int:
        if not self.enabled or self.x_min is None and self.scale_param is None:
            return 0
        return int(math.prod(self.qparams()[0].shape)) * 2
