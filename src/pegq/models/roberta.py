"""RoBERTa family adapter (``model_type == "roberta"``): ``RobertaModel``,
``RobertaForSequenceClassification``; DistilRoBERTa is a 6-layer RoBERTa and uses it unchanged.

The encoder layers are module-for-module BERT's, so every per-layer quantizer sits exactly where
:mod:`pegq.models.bert` documents it (``encoder.layer.{i}.attn.*`` / ``ffn.*``, 13 activations and 6
weights per layer). Embeddings likewise (``embeddings.word/token_type/position.weight``,
``embeddings.sum_token_type``, ``embeddings.sum``, ``embeddings.layernorm``).

Differences from BERT:

* ``classifier.dense.weight`` -- parametrization of ``classifier.dense``
* ``classifier.dense`` -- pre-hook of ``classifier.out_proj`` (dense output after tanh)
* ``classifier.weight`` / ``classifier.output`` -- parametrization of / hook on ``classifier.out_proj``

``pooler`` (+ ``pooler.weight``) exists only for a bare ``RobertaModel`` built with its pooling layer;
``RobertaForSequenceClassification`` has none.

Deviations: ``RobertaEmbeddings.forward`` is replaced on the instance by
:func:`roberta_embeddings_forward` (padding-aware position ids as in transformers 5.x) to reach
word + token type; attention runs through ``"pegq"`` as for BERT.
"""

from __future__ import annotations

from torch import nn

from . import bert
from .base import QuantizedModel, check_encoder_only

FAMILY = "roberta"


def roberta_embeddings_forward(
    emb,
    qm,
    input_ids=None,
    token_type_ids=None,
    position_ids=None,
    inputs_embeds=None,
    past_key_values_length: int = 0,
):
    """Adapter for ``RobertaEmbeddings.forward`` (transformers 5.x), adding ``embeddings.sum_token_type``."""
    if position_ids is None:
        if input_ids is not None:
            position_ids = emb.create_position_ids_from_input_ids(
                input_ids, emb.padding_idx, past_key_values_length
            )
        else:
            position_ids = emb.create_position_ids_from_inputs_embeds(inputs_embeds, emb.padding_idx)
    input_shape = input_ids.size() if input_ids is not None else inputs_embeds.size()[:-1]
    batch_size, seq_length = input_shape
    if token_type_ids is None:
        token_type_ids = bert.buffered_token_type_ids(emb, position_ids, batch_size, seq_length)
    return bert.embeddings_tail(emb, qm, input_ids, inputs_embeds, token_type_ids, position_ids)


def wrap(model: nn.Module) -> QuantizedModel:
    check_encoder_only(model.config)
    base, has_head = bert.split_model(model)
    layers = base.encoder.layer
    qm = QuantizedModel(model, FAMILY, num_layers=len(layers), hidden_size=model.config.hidden_size)
    try:
        qm.use_attention_implementation(model.config)
        bert.attach_embeddings(qm, base.embeddings, roberta_embeddings_forward)
        for i, layer in enumerate(layers):
            bert.attach_layer(qm, i, layer)
        bert.attach_pooler(qm, getattr(base, "pooler", None))
        if has_head:
            head = model.classifier
            bert.attach_dense_classifier(qm, head, head.dense, head.out_proj)
    except Exception:
        qm.unwrap()
        raise
    return qm
