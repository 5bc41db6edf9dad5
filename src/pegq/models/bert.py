"""BERT family adapter (``model_type == "bert"``): ``BertModel``, ``BertForSequenceClassification``.
MiniLM (e.g. all-MiniLM-L6-v2) is a BERT and uses this adapter unchanged.

Where each quantizer sits (HF module paths relative to the ``BertModel``; ``L`` = ``encoder.layer[i]``,
quantizer names prefixed ``encoder.layer.{i}.``):

* ``embeddings.word.weight``, ``embeddings.token_type.weight``, ``embeddings.position.weight`` --
  parametrizations of ``embeddings.word_embeddings`` / ``token_type_embeddings`` / ``position_embeddings``
* ``embeddings.sum_token_type`` -- adapter forward of ``embeddings`` (word + token type)
* ``embeddings.sum`` / ``embeddings.layernorm`` -- pre-hook / hook of ``embeddings.LayerNorm``
* ``attn.query``, ``attn.key``, ``attn.value`` (+ ``.weight``) -- hook / parametrization of
  ``L.attention.self.query/key/value``
* ``attn.scores`` / ``attn.probs`` -- ``"pegq"`` attention function: scaled q.k before the mask / softmax
  output
* ``attn.context`` -- pre-hook of ``L.attention.output.dense``
* ``attn.output`` (+ ``.weight``) -- hook / parametrization of ``L.attention.output.dense``
* ``attn.residual_sum`` / ``attn.layernorm`` -- pre-hook / hook of ``L.attention.output.LayerNorm``
* ``ffn.intermediate`` -- hook on ``L.intermediate`` (after GELU); ``.weight`` on ``L.intermediate.dense``
* ``ffn.output`` (+ ``.weight``) -- hook / parametrization of ``L.output.dense``
* ``ffn.residual_sum`` / ``ffn.layernorm`` -- pre-hook / hook of ``L.output.LayerNorm``
* ``pooler`` -- hook on ``pooler`` (after tanh); ``pooler.weight`` on ``pooler.dense``
* ``classifier.output`` (+ ``classifier.weight``) -- hook / parametrization of the head's ``classifier``

Deviations from the stock module code:

* ``BertEmbeddings.forward`` is replaced on the instance by :func:`bert_embeddings_forward` (same ids logic
  as transformers 5.x) because word + token-type embeddings has no module boundary to hook.
* Attention runs through ``"pegq"`` (eager math); the model's original implementation (usually
  ``sdpa``) is restored by ``unwrap``. Outputs agree with sdpa to FP32 rounding (~1e-6).
* Hidden dropout after ``attn.output`` / ``ffn.output`` is applied after the quantizer (no-op in eval).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import QuantizedModel, check_encoder_only

FAMILY = "bert"


# --------------------------------------------------------------------------- embeddings


def embeddings_tail(
    emb: nn.Module, qm: QuantizedModel, input_ids, inputs_embeds, token_type_ids, position_ids
):
    """``(word + token_type)`` -> quantize -> ``+ position`` -> LayerNorm (hooked) -> dropout."""
    if inputs_embeds is None:
        inputs_embeds = emb.word_embeddings(input_ids)
    x = inputs_embeds + emb.token_type_embeddings(token_type_ids)
    x = qm.act("embeddings.sum_token_type", x)
    x = x + emb.position_embeddings(position_ids)
    x = emb.LayerNorm(x)
    return emb.dropout(x)


def buffered_token_type_ids(emb: nn.Module, position_ids, batch_size: int, seq_length: int):
    """Token-type ids when none are given, as ``BertEmbeddings.forward`` builds them."""
    if hasattr(emb, "token_type_ids"):
        buffered = emb.token_type_ids.to(position_ids.device).expand(position_ids.shape[0], -1)
        buffered = torch.gather(buffered, dim=1, index=position_ids)
        return buffered.expand(batch_size, seq_length)
    return torch.zeros((batch_size, seq_length), dtype=torch.long, device=emb.position_ids.device)


def bert_embeddings_forward(
    emb,
    qm,
    input_ids=None,
    token_type_ids=None,
    position_ids=None,
    inputs_embeds=None,
    past_key_values_length: int = 0,
):
    """Adapter for ``BertEmbeddings.forward`` (transformers 5.x), adding ``embeddings.sum_token_type``."""
    input_shape = input_ids.size() if input_ids is not None else inputs_embeds.size()[:-1]
    batch_size, seq_length = input_shape
    if position_ids is None:
        position_ids = emb.position_ids[:, past_key_values_length : seq_length + past_key_values_length]
    if token_type_ids is None:
        token_type_ids = buffered_token_type_ids(emb, position_ids, batch_size, seq_length)
    return embeddings_tail(emb, qm, input_ids, inputs_embeds, token_type_ids, position_ids)


def attach_embeddings(qm: QuantizedModel, emb: nn.Module, forward_fn) -> None:
    qm.add_weight("embeddings.word.weight", emb.word_embeddings)
    qm.add_weight("embeddings.token_type.weight", emb.token_type_embeddings)
    qm.add_point("embeddings.sum_token_type")
    qm.add_weight("embeddings.position.weight", emb.position_embeddings)
    qm.add_input("embeddings.sum", emb.LayerNorm)
    qm.add_output("embeddings.layernorm", emb.LayerNorm)
    qm.override_forward(emb, forward_fn)


# --------------------------------------------------------------------------- encoder layer


def attach_layer(qm: QuantizedModel, i: int, layer: nn.Module) -> None:
    """The 13 activation and 6 weight quantizers of one BERT-style encoder layer."""
    p = f"encoder.layer.{i}."
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
    qm.add_weight(p + "ffn.intermediate.weight", layer.intermediate.dense)
    qm.add_output(p + "ffn.intermediate", layer.intermediate)
    qm.add_linear(p + "ffn.output", layer.output.dense)
    qm.add_input(p + "ffn.residual_sum", layer.output.LayerNorm)
    qm.add_output(p + "ffn.layernorm", layer.output.LayerNorm)
    qm.set_ffn_names(i, p + "attn.layernorm", p + "ffn.output", p + "ffn.residual_sum")


def attach_pooler(qm: QuantizedModel, pooler: nn.Module | None) -> None:
    if pooler is None:
        return
    qm.add_weight("pooler.weight", pooler.dense)
    qm.add_output("pooler", pooler)


def attach_linear_classifier(qm: QuantizedModel, classifier: nn.Linear) -> None:
    qm.add_weight("classifier.weight", classifier)
    qm.add_output("classifier.output", classifier)


def attach_dense_classifier(qm: QuantizedModel, head: nn.Module, dense: nn.Linear, out: nn.Linear) -> None:
    """RoBERTa-style head ``dense -> tanh -> dropout -> out_proj``: ``classifier.dense`` quantizes the
    out_proj input (after tanh), ``classifier.output`` the logits."""
    qm.add_weight("classifier.dense.weight", dense)
    qm.add_input("classifier.dense", out)
    qm.add_weight("classifier.weight", out)
    qm.add_output("classifier.output", out)


# --------------------------------------------------------------------------- entry point


def split_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """``(base encoder, has_sequence_classification_head)``; other heads are refused."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module) or base is model:
        return model, False
    name = type(model).__name__
    if not name.endswith("ForSequenceClassification"):
        raise ValueError(
            f"unsupported model class {name}; pegq wraps a bare encoder (AutoModel) "
            f"or a *ForSequenceClassification model"
        )
    return base, True


def wrap(model: nn.Module) -> QuantizedModel:
    check_encoder_only(model.config)
    base, has_head = split_model(model)
    layers = base.encoder.layer
    qm = QuantizedModel(model, FAMILY, num_layers=len(layers), hidden_size=model.config.hidden_size)
    try:
        qm.use_attention_implementation(model.config)
        attach_embeddings(qm, base.embeddings, bert_embeddings_forward)
        for i, layer in enumerate(layers):
            attach_layer(qm, i, layer)
        attach_pooler(qm, base.pooler)
        if has_head:
            attach_linear_classifier(qm, model.classifier)
    except Exception:
        qm.unwrap()
        raise
    return qm
