"""Where each quantizer sits in each architecture family: adapters, registry and loader.

``wrap(hf_model)`` puts a disabled quantizer at every weight and activation of the paper's Figure 1 and
returns a :class:`QuantizedModel`; ``load_model(path)`` loads ``(model, tokenizer)`` from a local folder
(or the hub, where reachable).
"""

from .base import QuantizedModel, describe_quantizers
from .registry import (
    SUPPORTED_FAMILIES,
    LoadedModel,
    ModelError,
    ModelLoadError,
    check_family,
    load_model,
    wrap,
)

__all__ = [
    "SUPPORTED_FAMILIES",
    "LoadedModel",
    "ModelError",
    "ModelLoadError",
    "QuantizedModel",
    "check_family",
    "describe_quantizers",
    "load_model",
    "wrap",
]
