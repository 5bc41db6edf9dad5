"""run_analysis works for every adapter family (tiny random-init encoders, the MiniLM tokenizer)."""

import json

import pytest
import torch
from transformers import (
    DistilBertConfig,
    DistilBertModel,
    MobileBertConfig,
    MobileBertModel,
    MPNetConfig,
    MPNetForSequenceClassification,
    RobertaConfig,
    RobertaModel,
)

from pegq.analysis import run_analysis
from pegq.models import SUPPORTED_FAMILIES, wrap

VOCAB = 30522  # the MiniLM (BERT uncased) tokenizer's vocabulary
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
)


def tiny(family: str):
    torch.manual_seed(0)
    if family == "roberta":  # pad id 0 = the tokenizer's [PAD], so RoBERTa's position ids skip it
        return RobertaModel(RobertaConfig(**SMALL, type_vocab_size=1, pad_token_id=0))
    if family == "mpnet":  # with a classification head, and no token_type_ids input
        return MPNetForSequenceClassification(MPNetConfig(**SMALL, pad_token_id=0, num_labels=2))
    if family == "distilbert":
        return DistilBertModel(
            DistilBertConfig(
                vocab_size=VOCAB,
                dim=32,
                n_layers=2,
                n_heads=4,
                hidden_dim=48,
                max_position_embeddings=64,
                pad_token_id=0,
            )
        )
    if family == "mobilebert":  # bottlenecks and two stacked FFNs: FFN input != attn.layernorm
        return MobileBertModel(
            MobileBertConfig(
                **SMALL,
                embedding_size=16,
                intra_bottleneck_size=16,
                true_hidden_size=16,
                num_feedforward_networks=2,
                pad_token_id=0,
            )
        )
    raise KeyError(family)


FAMILIES = ("roberta", "mpnet", "distilbert", "mobilebert")


def test_every_supported_family_is_covered():
    assert set(SUPPORTED_FAMILIES) <= set(FAMILIES) | {"bert"}  # bert: the MiniLM tests


@pytest.mark.parametrize("family", FAMILIES)
def test_run_analysis_on_family(family, minilm_tok, rt_sentences, tmp_path):
    qm = wrap(tiny(family).eval())
    sents = [rt_sentences[0], (rt_sentences[1], rt_sentences[2]), rt_sentences[3]]  # a pair too
    stats = run_analysis(qm, minilm_tok, sents, tmp_path, num_sequences=3, max_length=24, console=False)
    on_disk = json.loads((tmp_path / "stats.json").read_text())
    assert on_disk["model"]["family"] == family and on_disk["model"]["num_layers"] == 2
    assert len(on_disk["layers"]) == 2
    assert (
        len(on_disk["attention"]["special_share"]) == 2 and len(on_disk["attention"]["special_share"][0]) == 4
    )
    for f in stats["figures"]:
        assert (tmp_path / f["file"]).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "report.html").stat().st_size > 10_000
    rec = on_disk["summary"]["recommendations"]
    names = set(qm.activation_quantizers())
    for o in rec["mp_ptq"]["overrides"] + rec["mp_ptq"]["overrides_ffn_io"]:
        pattern = o.split("=")[0]
        assert pattern in names or "*" in pattern
    ffn = qm.ffn_names(0)
    assert on_disk["tensors"][ffn["input"]]["role"] == "ffn_input"
    assert on_disk["tensors"][ffn["residual_sum"]]["role"] == "ffn_residual_sum"


def test_analysis_bypasses_and_restores_quantizers(minilm_tok, rt_sentences):
    from pegq.analysis.collect import collect

    qm = wrap(tiny("roberta").eval())
    name = "encoder.layer.0.ffn.residual_sum"
    ref = collect(qm, minilm_tok, rt_sentences[:2], max_length=24).moments[name]
    for q in qm.quantizers.values():
        q.configure(bits=2)
    qm.train()
    got = collect(qm, minilm_tok, rt_sentences[:2], max_length=24).moments[name]
    assert (got.min, got.max, got.std) == pytest.approx((ref.min, ref.max, ref.std))
    assert all(q.bits == 2 for q in qm.quantizers.values()) and qm.training
