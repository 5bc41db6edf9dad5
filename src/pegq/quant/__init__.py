"""The quantization math (paper section 2, eq. 1-2; section 4, eq. 4-5): no knowledge of models.

* :mod:`.functional`  -- eq. (1)-(2): grid, qparams, fake-quant with the STE, to/from integers;
* :mod:`.granularity` -- per-tensor, per-channel, per-embedding, per-embedding-group (PEG, eq. 5), and
  dynamic per-token (not in the paper);
* :mod:`.estimators`  -- current / running (EMA) min-max and MSE range estimation;
* :mod:`.quantizer`   -- the ``Quantizer`` module and its states (estimating, frozen, learning).
"""

from .estimators import ESTIMATORS, RangeEstimator, canonical_estimator, mse_range, quant_error
from .functional import (
    dequantize,
    fake_quant,
    fake_quant_nograd,
    grid,
    qparams_from_range,
    quantize_to_int,
    round_ste,
)
from .granularity import (
    Granularity,
    PerChannel,
    PerEmbedding,
    PerEmbeddingGroup,
    PerTensor,
    PerToken,
    granularity_from_dict,
    group_index_from_perm,
    range_permutation,
)
from .quantizer import Quantizer, QuantState

__all__ = [
    "ESTIMATORS",
    "Granularity",
    "PerChannel",
    "PerEmbedding",
    "PerEmbeddingGroup",
    "PerTensor",
    "PerToken",
    "QuantState",
    "Quantizer",
    "RangeEstimator",
    "canonical_estimator",
    "dequantize",
    "fake_quant",
    "fake_quant_nograd",
    "granularity_from_dict",
    "grid",
    "group_index_from_perm",
    "mse_range",
    "qparams_from_range",
    "quant_error",
    "quantize_to_int",
    "range_permutation",
    "round_ste",
]
