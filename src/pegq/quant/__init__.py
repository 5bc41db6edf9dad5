"""The quantization math: no knowledge of models lives here."""

from .estimators import ESTIMATORS, RangeEstimator, canonical_estimator, mse_range
from .functional import dequantize, fake_quant, grid, qparams_from_range, quantize_to_int, round_ste
from .granularity import (
    Granularity,
    PerChannel,
    PerEmbedding,
    PerEmbeddingGroup,
    PerTensor,
    granularity_from_dict,
    group_index_from_perm,
)
from .quantizer import Quantizer, QuantState

__all__ = [
    "ESTIMATORS",
    "Granularity",
    "PerChannel",
    "PerEmbedding",
    "PerEmbeddingGroup",
    "PerTensor",
    "QuantState",
    "Quantizer",
    "RangeEstimator",
    "canonical_estimator",
    "dequantize",
    "fake_quant",
    "granularity_from_dict",
    "grid",
    "group_index_from_perm",
    "mse_range",
    "qparams_from_range",
    "quantize_to_int",
    "round_ste",
]
