"""DistilBERT family adapter (``model_type == "distilbert"``): ``DistilBertModel``,
``DistilBertForSequenceClassification``.

Where each quantizer sits (``L`` = ``transformer.layer[i]``, names prefixed ``encoder.layer.{i}.`` as for
every family, although DistilBERT calls its encoder ``transformer``):

* ``embeddings.word.weight`` / ``embeddings.position.weight`` -- parametrizations
* ``embeddings.sum`` / ``embeddings.layernorm`` -- pre-hook / hook of ``embeddings.LayerNorm``
* ``attn.query``, ``attn.key``, ``attn.value`` (+ ``.weight``) -- hook / parametrization of
  ``L.attention.q_lin/k_lin/v_lin``
* ``attn.scores`` / ``attn.probs`` -- ``"pegq"`` attention function
* ``attn.context`` -- pre-hook of ``L.attention.out_lin``
* ``attn.output`` (+ ``.weight``) -- hook / parametrization of ``L.attention.out_lin``
* ``attn.residual_sum`` / ``attn.layernorm`` -- pre-hook / hook of ``L.sa_layer_norm``
* ``ffn.intermediate`` -- pre-hook of ``L.ffn.lin2`` (= ``lin1`` + activation output);
  ``ffn.intermediate.weight`` on ``L.ffn.lin1``
* ``ffn.output`` (+ ``.weight``) -- hook / parametrization of ``L.ffn.lin2``
* ``ffn.residual_sum`` / ``ffn.layernorm`` -- pre-hook / hook of ``L.output_layer_norm``
* ``classifier.dense.weight`` -- parametrization of ``pre_classifier``
* ``classifier.dense`` -- pre-hook of ``classifier`` (``pre_classifier`` output after ReLU)
* ``classifier.output`` (+ ``classifier.weight``) -- hook / parametrization of ``classifier``

Deviations: no token types (no ``embeddings.sum_token_type``) and no pooler; the sequence-classification
head is ``pre_classifier -> ReLU -> classifier``, treated like RoBERTa's dense + out_proj head. No adapter
forward is needed (attention goes through ``"pegq"``). Sinusoidal position tables, when configured, are
quantized like learned ones.
"""

from __future__ import annotations

from torch import nn

from . import bert
from .base import QuantizedModel, check_encoder_only

FAMILY = "distilbert"


def attach_layer(qm: QuantizedModel, i: int, layer: nn.Module) -> None:
    p = f"encoder.layer.{i}."
    sa = layer.attention
    qm.add_linear(p + "attn.query", sa.q_lin)
    qm.add_linear(p + "attn.key", sa.k_lin)
    qm.add_linear(p + "attn.value", sa.v_lin)
    qm.add_attention(p + "attn.", sa)
    qm.add_input(p + "attn.context", sa.out_lin)
    qm.add_linear(p + "attn.output", sa.out_lin)
    qm.add_input(p + "attn.residual_sum", layer.sa_layer_norm)
    qm.add_output(p + "attn.layernorm", layer.sa_layer_norm)
    qm.add_weight(p + "ffn.intermediate.weight", layer.ffn.lin1)
    qm.add_input(p + "ffn.intermediate", layer.ffn.lin2)
    qm.add_linear(p + "ffn.output", layer.ffn.lin2)
    qm.add_input(p + "ffn.residual_sum", layer.output_layer_norm)
    qm.add_output(p + "ffn.layernorm", layer.output_layer_norm)
    qm.set_ffn_names(i, p + "attn.layernorm", p + "ffn.output", p + "ffn.residual_sum")


def wrap(model: nn.Module) -> QuantizedModel:
    base, has_head = bert.split_model(model)
    check_encoder_only(model.config)
    layers = base.transformer.layer
    qm = QuantizedModel(model, FAMILY, num_layers=len(layers), hidden_size=model.config.dim)
    try:
        qm.use_attention_implementation(model.config)
        emb = base.embeddings
        qm.add_weight("embeddings.word.weight", emb.word_embeddings)
        qm.add_weight("embeddings.position.weight", emb.position_embeddings)
        qm.add_input("embeddings.sum", emb.LayerNorm)
        qm.add_output("embeddings.layernorm", emb.LayerNorm)
        for i, layer in enumerate(layers):
            attach_layer(qm, i, layer)
        if has_head:
            bert.attach_dense_classifier(qm, model, model.pre_classifier, model.classifier)
    except Exception:
        qm.unwrap()
        raise
    return qm
