"""The ``"pegq"`` attention implementation: eager attention with quantizers at the softmax input/output.

Registered in transformers' ``AttentionInterface`` (the function) and ``AttentionMaskInterface`` (the mask
builder) under the name ``"pegq"``. A wrapped model sets ``config._attn_implementation = "pegq"``; every
attention module that calls ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)``
(BERT, RoBERTa, DistilBERT, MobileBERT in transformers 5.x) then lands here.

While both quantizers of a module are off and nothing captures them, the call is handed to the model's
original implementation when that was ``"sdpa"`` (same arguments, same ``bool`` mask), so a wrapped model
with every quantizer off reproduces the original bit for bit; otherwise the eager math below runs.

Masks: the mask builder is transformers' ``sdpa_mask`` (4-D ``bool``, True = attend, or ``None`` when there
is no padding). Without a registered mask builder transformers would pass *no mask at all* for a custom
implementation, silently breaking padded batches. User-made 4-D masks are passed through unchanged by
transformers, so both ``bool`` and additive float masks are handled (:func:`pegq.models.base.apply_mask`).

The scores are quantized **after scaling and before the mask is added**: the mask holds ``finfo.min``/-inf,
which would wreck the quantization range (and fail the estimator's finiteness check). Masked positions get
probability 0 either way, so this matches the paper's "softmax input" everywhere it matters.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ATTN_ATTR, apply_mask

NAME = "pegq"
_registered = False


def pegq_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """Same contract as transformers' ``eager_attention_forward`` (q/k/v are ``[B, H, T, d_head]``;
    returns ``([B, T, H, d_head], probs)``)."""
    points = module.__dict__.get(ATTN_ATTR)
    if points is not None and not points.active() and points.original_implementation == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if points is not None:
        scores = points.scores(scores)
    scores = apply_mask(scores, attention_mask)
    probs = nn.functional.softmax(scores, dim=-1)
    if points is not None:
        probs = points.probs(probs)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def register_attention() -> None:
    """Register ``"pegq"`` with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, pegq_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True
