"""Helpers for the model-adapter tests: tiny random encoders of every family, batches, switches."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    MobileBertConfig,
    MobileBertForSequenceClassification,
    MobileBertModel,
    MPNetConfig,
    MPNetForSequenceClassification,
    MPNetModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
)

from pegq.quant import PerTensor  # noqa: E402

SMALL = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    num_labels=3,
)


def tiny_config(family: str):
    if family == "bert":
        return BertConfig(**SMALL, type_vocab_size=2)
    if family == "roberta":
        return RobertaConfig(**SMALL, type_vocab_size=1, pad_token_id=1)
    if family == "mpnet":
        return MPNetConfig(**SMALL)
    if family == "distilbert":
        return DistilBertConfig(
            vocab_size=100,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=37,
            max_position_embeddings=64,
            num_labels=3,
        )
    if family == "mobilebert":
        return MobileBertConfig(
            **{**SMALL, "num_hidden_layers": 2},
            embedding_size=16,
            intra_bottleneck_size=16,
            true_hidden_size=16,
            num_feedforward_networks=2,
        )
    raise KeyError(family)


CLASSES = {
    "bert": (BertModel, BertForSequenceClassification),
    "roberta": (RobertaModel, RobertaForSequenceClassification),
    "mpnet": (MPNetModel, MPNetForSequenceClassification),
    "distilbert": (DistilBertModel, DistilBertForSequenceClassification),
    "mobilebert": (MobileBertModel, MobileBertForSequenceClassification),
}
FAMILIES = tuple(CLASSES)


def tiny_model(family: str, head: bool, seed: int = 0):
    torch.manual_seed(seed)
    cls = CLASSES[family][1 if head else 0]
    return cls(tiny_config(family)).eval()


def padded_batch(pad_id: int = 0, seed: int = 1):
    """3 sequences of length 9, 5 and 2 padded to 9 (ids 5..99)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    for row, n in ((1, 5), (2, 2)):
        mask[row, n:] = 0
        ids[row, n:] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


def pad_id_of(model) -> int:
    return model.config.pad_token_id if model.config.pad_token_id is not None else 0


def main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def all_on(qm, bits: int = 8) -> None:
    """The paper's setup: symmetric weights, asymmetric activations, per-tensor, current min-max."""
    for name, q in qm.quantizers.items():
        q.configure(
            bits=bits,
            symmetric=qm.kind(name) == "weight",
            granularity=PerTensor(),
            estimator="current_minmax",
        )


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello!",
    "Quantizing transformer encoders is hard because of strong outliers in the residual stream.",
    "A cat sat on the mat, and then it slept for a long, long time.",
]
