"""MPNet family adapter (``model_type == "mpnet"``): ``MPNetModel``, ``MPNetForSequenceClassification``.

Where each quantizer sits (``L`` = ``encoder.layer[i]``, names prefixed ``encoder.layer.{i}.``):

* ``embeddings.word.weight`` / ``embeddings.position.weight`` -- parametrizations
* ``embeddings.sum`` / ``embeddings.layernorm`` -- pre-hook / hook of ``embeddings.LayerNorm``
* ``encoder.relative_attention_bias.weight`` -- parametrization (MPNet-only table, see below)
* ``attn.query``, ``attn.key``, ``attn.value`` (+ ``.weight``) -- hook / parametrization of
  ``L.attention.attn.q/k/v``
* ``attn.scores`` / ``attn.probs`` -- adapter forward of ``L.attention.attn`` (see below)
* ``attn.context`` -- pre-hook of ``L.attention.attn.o``
* ``attn.output`` (+ ``.weight``) -- hook / parametrization of ``L.attention.attn.o``
* ``attn.residual_sum`` / ``attn.layernorm`` -- pre-hook / hook of ``L.attention.LayerNorm``
* ``ffn.intermediate`` -- hook on ``L.intermediate`` (after GELU); ``.weight`` on its ``dense``
* ``ffn.output`` (+ ``.weight``) -- hook / parametrization of ``L.output.dense``
* ``ffn.residual_sum`` / ``ffn.layernorm`` -- pre-hook / hook of ``L.output.LayerNorm``
* ``pooler`` (+ ``.weight``) -- bare ``MPNetModel`` only: hook on ``pooler`` / ``pooler.dense``
* ``classifier.dense`` -- pre-hook of ``classifier.out_proj``; ``classifier.dense.weight`` on
  ``classifier.dense``
* ``classifier.output`` (+ ``classifier.weight``) -- hook / parametrization of ``classifier.out_proj``

Deviations:

* No token types: there is no ``embeddings.sum_token_type`` (2 embedding activations, not 3).
* MPNet's self-attention does not go through transformers' ``AttentionInterface``: it adds a relative
  position bias to the scores inside ``MPNetSelfAttention.forward``. That forward is replaced on each
  instance by :func:`mpnet_self_attention_forward`, the same computation with ``attn.scores`` taken on
  ``q.k / sqrt(d) + position_bias`` (the real softmax logits, bias included) **before** the padding mask,
  and ``attn.probs`` on the softmax output. The model's attention implementation is left untouched
  (eager; its additive float mask and ``bool`` masks are both handled).
* The relative-attention-bias table (an ``nn.Embedding``, ``buckets x heads``) is a weight like the
  others, so it gets a weight quantizer too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import bert
from .base import ATTN_ATTR, QuantizedModel, apply_mask, check_encoder_only

FAMILY = "mpnet"


def mpnet_self_attention_forward(
    sa, qm, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs
):
    """Adapter for ``MPNetSelfAttention.forward`` (transformers 5.x) with softmax input/output quantizers."""
    points = sa.__dict__[ATTN_ATTR]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, sa.attention_head_size)
    q = sa.q(hidden_states).view(hidden_shape).transpose(1, 2)
    k = sa.k(hidden_states).view(hidden_shape).transpose(1, 2)
    v = sa.v(hidden_states).view(hidden_shape).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(sa.attention_head_size)
    if position_bias is not None:
        scores = scores + position_bias
    scores = points.scores(scores)
    scores = apply_mask(scores, attention_mask)
    probs = nn.functional.softmax(scores, dim=-1)
    probs = points.probs(probs)
    probs = sa.dropout(probs)
    c = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
    c = c.view(*c.size()[:-2], sa.all_head_size)
    o = sa.o(c)
    return (o, probs) if output_attentions else (o,)


def attach_layer(qm: QuantizedModel, i: int, layer: nn.Module) -> None:
    p = f"encoder.layer.{i}."
    sa = layer.attention.attn
    qm.add_linear(p + "attn.query", sa.q)
    qm.add_linear(p + "attn.key", sa.k)
    qm.add_linear(p + "attn.value", sa.v)
    qm.add_attention(p + "attn.", sa)
    qm.override_forward(sa, mpnet_self_attention_forward)
    qm.add_input(p + "attn.context", sa.o)
    qm.add_linear(p + "attn.output", sa.o)
    qm.add_input(p + "attn.residual_sum", layer.attention.LayerNorm)
    qm.add_output(p + "attn.layernorm", layer.attention.LayerNorm)
    qm.add_weight(p + "ffn.intermediate.weight", layer.intermediate.dense)
    qm.add_output(p + "ffn.intermediate", layer.intermediate)
    qm.add_linear(p + "ffn.output", layer.output.dense)
    qm.add_input(p + "ffn.residual_sum", layer.output.LayerNorm)
    qm.add_output(p + "ffn.layernorm", layer.output.LayerNorm)
    qm.set_ffn_names(i, p + "attn.layernorm", p + "ffn.output", p + "ffn.residual_sum")


def wrap(model: nn.Module) -> QuantizedModel:
    check_encoder_only(model.config)
    base, has_head = bert.split_model(model)
    layers = base.encoder.layer
    qm = QuantizedModel(model, FAMILY, num_layers=len(layers), hidden_size=model.config.hidden_size)
    try:
        emb = base.embeddings
        qm.add_weight("embeddings.word.weight", emb.word_embeddings)
        qm.add_weight("embeddings.position.weight", emb.position_embeddings)
        qm.add_input("embeddings.sum", emb.LayerNorm)
        qm.add_output("embeddings.layernorm", emb.LayerNorm)
        qm.add_weight("encoder.relative_attention_bias.weight", base.encoder.relative_attention_bias)
        for i, layer in enumerate(layers):
            attach_layer(qm, i, layer)
        bert.attach_pooler(qm, getattr(base, "pooler", None))
        if has_head:
            head = model.classifier
            bert.attach_dense_classifier(qm, head, head.dense, head.out_proj)
    except Exception:
        qm.unwrap()
        raise
    return qm
