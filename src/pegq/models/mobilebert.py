"""MobileBERT family adapter (``model_type == "mobilebert"``): ``MobileBertModel``,
``MobileBertForSequenceClassification``.

MobileBERT differs from BERT by bottlenecks (a narrow ``true_hidden_size`` inside each layer), a stack of
``num_feedforward_networks`` FFNs per layer, ``NoNorm`` (elementwise affine) in place of LayerNorm, and
a trigram "convolution" plus a Linear on the (narrow) word embeddings. Names follow the BERT scheme
wherever the tensor has a BERT counterpart; the extras are listed below. ``*.layernorm`` /
``*.residual_sum`` sit at the output / input of whichever normalisation the config selects (``NoNorm``
or ``LayerNorm``).

Embeddings (forward order):

* ``embeddings.word.weight`` -- parametrization of ``embeddings.word_embeddings``
* ``embeddings.transformation`` (+ ``.weight``) -- hook / parametrization of
  ``embeddings.embedding_transformation`` (only when used: trigram input or ``embedding_size != hidden_size``)
* ``embeddings.token_type.weight`` -- parametrization
* ``embeddings.sum_token_type`` -- adapter forward (transformed word + token type)
* ``embeddings.position.weight`` -- parametrization
* ``embeddings.sum`` / ``embeddings.layernorm`` -- pre-hook / hook of ``embeddings.LayerNorm``

Per layer ``i`` (``L`` = ``encoder.layer[i]``, names prefixed ``encoder.layer.{i}.``), forward order:

* ``bottleneck.input.dense`` (+ ``.weight``) -- hook / parametrization of ``L.bottleneck.input.dense``
  (``use_bottleneck``)
* ``bottleneck.input.layernorm`` -- hook on ``L.bottleneck.input.LayerNorm`` (the residual input of the
  attention block)
* ``bottleneck.attention.dense`` (+ ``.weight``), ``bottleneck.attention.layernorm`` -- the same on
  ``L.bottleneck.attention`` (shared Q/K input; only with ``key_query_shared_bottleneck`` and without
  ``use_bottleneck_attention``)
* ``attn.query``, ``attn.key``, ``attn.value`` (+ ``.weight``) -- hook / parametrization of
  ``L.attention.self.query/key/value``
* ``attn.scores`` / ``attn.probs`` -- ``"pegq"`` attention function
* ``attn.context`` -- pre-hook of ``L.attention.output.dense``
* ``attn.output`` (+ ``.weight``) -- hook / parametrization of ``L.attention.output.dense``
* ``attn.residual_sum`` / ``attn.layernorm`` -- pre-hook / hook of ``L.attention.output.LayerNorm``
* ``ffn.{j}.intermediate``, ``ffn.{j}.output``, ``ffn.{j}.residual_sum``, ``ffn.{j}.layernorm`` (+ the two
  weights) -- stacked FFN ``L.ffn[j]``, ``j < num_feedforward_networks - 1``, placed like the BERT FFN
* ``ffn.intermediate`` -- hook on ``L.intermediate`` (after activation); ``.weight`` on its ``dense``
* ``ffn.output`` (+ ``.weight``) -- hook / parametrization of ``L.output.dense``
* ``ffn.residual_sum`` / ``ffn.layernorm`` -- pre-hook / hook of ``L.output.LayerNorm``
* ``output_bottleneck.output`` (+ ``.weight``) -- hook / parametrization of ``L.output.bottleneck.dense``
  (``use_bottleneck``)
* ``output_bottleneck.residual_sum`` / ``output_bottleneck.layernorm`` -- pre-hook / hook of
  ``L.output.bottleneck.LayerNorm`` (sum with the layer's input / the layer output)

Head: ``pooler`` (+ ``pooler.weight``) when the pooler has its dense + tanh (``classifier_activation``);
``classifier.output`` (+ ``classifier.weight``) on the ``classifier`` Linear.

``ffn_names(i)`` points at the *last* FFN of the stack (``ffn.output`` / ``ffn.residual_sum``) with its
input (``ffn.{n-2}.layernorm``, or ``attn.layernorm`` for a single FFN).

Deviations: ``MobileBertEmbeddings.forward`` is replaced on the instance by
:func:`mobilebert_embeddings_forward`, which adds the token-type embedding before the position
embedding (stock code adds position first) so that ``embeddings.sum_token_type`` exists; the result
differs from the stock one by FP32 rounding only. Modules that the config leaves unused (e.g. the
embedding transformation when ``embedding_size == hidden_size`` without trigrams) get no quantizer, so
that every quantizer sees data during calibration.
"""

from __future__ import annotations

import torch
from torch import nn

from . import bert
from .base import QuantizedModel, check_encoder_only

FAMILY = "mobilebert"


def mobilebert_embeddings_forward(
    emb, qm, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None
):
    """Adapter for ``MobileBertEmbeddings.forward`` (transformers 5.x) with ``embeddings.sum_token_type``."""
    input_shape = input_ids.size() if input_ids is not None else inputs_embeds.size()[:-1]
    seq_length = input_shape[1]
    if position_ids is None:
        position_ids = emb.position_ids[:, :seq_length]
    if token_type_ids is None:
        token_type_ids = torch.zeros(input_shape, dtype=torch.long, device=emb.position_ids.device)
    if inputs_embeds is None:
        inputs_embeds = emb.word_embeddings(input_ids)
    if emb.trigram_input:
        inputs_embeds = torch.cat(
            [
                nn.functional.pad(inputs_embeds[:, 1:], [0, 0, 0, 1, 0, 0], value=0.0),
                inputs_embeds,
                nn.functional.pad(inputs_embeds[:, :-1], [0, 0, 1, 0, 0, 0], value=0.0),
            ],
            dim=2,
        )
    if emb.trigram_input or emb.embedding_size != emb.hidden_size:
        inputs_embeds = emb.embedding_transformation(inputs_embeds)
    x = inputs_embeds + emb.token_type_embeddings(token_type_ids)
    x = qm.act("embeddings.sum_token_type", x)
    x = x + emb.position_embeddings(position_ids)
    x = emb.LayerNorm(x)
    return emb.dropout(x)


def _bottleneck_layer(qm: QuantizedModel, name: str, bl: nn.Module) -> None:
    qm.add_linear(name + ".dense", bl.dense)
    qm.add_output(name + ".layernorm", bl.LayerNorm)


def _ffn(qm: QuantizedModel, p: str, intermediate: nn.Module, dense: nn.Linear, norm: nn.Module) -> None:
    qm.add_weight(p + "intermediate.weight", intermediate.dense)
    qm.add_output(p + "intermediate", intermediate)
    qm.add_linear(p + "output", dense)
    qm.add_input(p + "residual_sum", norm)
    qm.add_output(p + "layernorm", norm)


def attach_layer(qm: QuantizedModel, i: int, layer: nn.Module, config) -> None:
    p = f"encoder.layer.{i}."
    if config.use_bottleneck:
        _bottleneck_layer(qm, p + "bottleneck.input", layer.bottleneck.input)
        if config.key_query_shared_bottleneck and not config.use_bottleneck_attention:
            _bottleneck_layer(qm, p + "bottleneck.attention", layer.bottleneck.attention)
    sa = layer.attention.self
    qm.add_linear(p + "attn.query", sa.query)
    qm.add_linear(p + "attn.key", sa.key)
    qm.add_linear(p + "attn.value", sa.value)
    qm.add_attention(p + "attn.", sa)
    so = layer.attention.output
    qm.add_input(p + "attn.context", so.dense)
    qm.add_linear(p + "attn.output", so.dense)
    qm.add_input(p + "attn.residual_sum", so.LayerNorm)
    qm.add_output(p + "attn.layernorm", so.LayerNorm)
    ffn_input = p + "attn.layernorm"
    for j, f in enumerate(getattr(layer, "ffn", None) or []):
        _ffn(qm, f"{p}ffn.{j}.", f.intermediate, f.output.dense, f.output.LayerNorm)
        ffn_input = f"{p}ffn.{j}.layernorm"
    _ffn(qm, p + "ffn.", layer.intermediate, layer.output.dense, layer.output.LayerNorm)
    if config.use_bottleneck:
        ob = layer.output.bottleneck
        qm.add_linear(p + "output_bottleneck.output", ob.dense)
        qm.add_input(p + "output_bottleneck.residual_sum", ob.LayerNorm)
        qm.add_output(p + "output_bottleneck.layernorm", ob.LayerNorm)
    qm.set_ffn_names(i, ffn_input, p + "ffn.output", p + "ffn.residual_sum")


def wrap(model: nn.Module) -> QuantizedModel:
    check_encoder_only(model.config)
    base, has_head = bert.split_model(model)
    config = model.config
    layers = base.encoder.layer
    qm = QuantizedModel(model, FAMILY, num_layers=len(layers), hidden_size=config.hidden_size)
    try:
        qm.use_attention_implementation(config)
        emb = base.embeddings
        qm.add_weight("embeddings.word.weight", emb.word_embeddings)
        if emb.trigram_input or emb.embedding_size != emb.hidden_size:
            qm.add_linear("embeddings.transformation", emb.embedding_transformation)
        qm.add_weight("embeddings.token_type.weight", emb.token_type_embeddings)
        qm.add_point("embeddings.sum_token_type")
        qm.add_weight("embeddings.position.weight", emb.position_embeddings)
        qm.add_input("embeddings.sum", emb.LayerNorm)
        qm.add_output("embeddings.layernorm", emb.LayerNorm)
        qm.override_forward(emb, mobilebert_embeddings_forward)
        for i, layer in enumerate(layers):
            attach_layer(qm, i, layer, config)
        pooler = getattr(base, "pooler", None)
        if pooler is not None and pooler.do_activate:
            bert.attach_pooler(qm, pooler)
        if has_head:
            bert.attach_linear_classifier(qm, model.classifier)
    except Exception:
        qm.unwrap()
        raise
    return qm
