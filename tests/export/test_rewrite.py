"""PEG rewritten into per-tensor operations (paper section 4): equal to the original model unquantized, and
to the simulated PEG model quantized (within one quantization step per tensor), for every family."""

from __future__ import annotations

import re

import pytest
import torch
from export_helpers import main_output, peg_tiny

import pegq
from pegq.export.rewrite import RewriteError, SplitInputLinear, per_tensor_only, rewrite_peg
from pegq.peg import quantizers_off
from pegq.quant import PerEmbeddingGroup, PerTensor

_GROUP = re.compile(r"^(encoder\.layer\.\d+\..+)\.g(\d+)$")


@torch.no_grad()
def assert_within_one_step(sim, rq, batch) -> int:
    """Every activation quantizer of the rewritten model ``rq`` against the simulated model ``sim``: the
    quantized tensors differ by at most one quantization step. Returns how many tensors were compared."""
    acts = [n for n, q in rq.activation_quantizers().items() if q.enabled]
    bases = sorted({(_GROUP.match(n).group(1) if _GROUP.match(n) else n) for n in acts})
    with sim.capture(bases) as cs, rq.capture(acts) as cr:
        sim(**batch)
        rq(**batch)
    for n in acts:
        q = rq.quantizers[n]
        assert isinstance(q.granularity, PerTensor), n
        got = q(cr[n][0])
        m = _GROUP.match(n)
        if m:
            base, g = m.group(1), int(m.group(2))
            want = sim.quantizers[base](cs[base][0])
            info = next(v for v in rq.peg_rewrite.values() if any(n in pts for pts in v["points"].values()))
            if info.get("outlier_split"):  # g0: the whole input, compared on the bulk dims; g1: gathered
                bulk = info["perm"][: info["sizes"][0]]
                if g == 0:
                    got, want = got.index_select(-1, bulk), want.index_select(-1, bulk)
                else:
                    want = want.index_select(-1, info["perm"][info["sizes"][0]:])
            elif info["perm"] is not None:
                want = want.index_select(-1, info["perm"])
            if not info.get("outlier_split"):
                start = sum(info["sizes"][:g])
                want = want[..., start : start + info["sizes"][g]]
        else:
            want = sim.quantizers[n](cs[n][0])
            # a per-tensor quantizer inside a rewritten FFN block sees its tensor in the permuted order
            info = next((v for v in rq.peg_rewrite.values() if any(n in pts for pts in v["points"].values())), None)
            if info is not None and info["perm"] is not None:
                want = want.index_select(-1, info["perm"])
        step = float(q.scale.reshape(()))
        diff = float((got - want).abs().max())
        assert diff <= step * 1.001 + 1e-6, f"{n}: {diff / step:.2f} steps apart"
    return len(acts)


def test_minilm_rewrite_structure_and_equivalence(minilm_peg):
    qm, _, batch = minilm_peg
    rq = rewrite_peg(qm)
    # the original is untouched: still PEG, still 83 activation quantizers
    assert isinstance(qm.quantizers["encoder.layer.0.ffn.residual_sum"].granularity, PerEmbeddingGroup)
    assert len(qm.activation_quantizers()) == 83
    # every activation quantizer of the rewrite is per-tensor; K=6 groups for the three FFN tensors
    assert per_tensor_only(rq) == []
    assert sorted(rq.peg_rewrite) == [f"encoder.layer.{i}.ffn" for i in range(6)]
    assert all(v["groups"] == 6 and v["permuted"] for v in rq.peg_rewrite.values())
    names = rq.quantizers
    for role in ("attn.layernorm", "ffn.output", "ffn.residual_sum"):
        assert f"encoder.layer.3.{role}" not in names
        assert [f"encoder.layer.3.{role}.g{g}" in names for g in range(6)] == [True] * 6
    splits = [m for m in rq.modules() if isinstance(m, SplitInputLinear)]
    assert len(splits) == 6 and all(s.groups == 6 and s.sizes == [64] * 6 for s in splits)
    # the group quantizers carry the calibrated scale of their group
    peg_q = qm.quantizers["encoder.layer.5.ffn.residual_sum"]
    for g in range(6):
        assert torch.equal(rq.quantizers[f"encoder.layer.5.ffn.residual_sum.g{g}"].scale, peg_q.scale[g : g + 1])

    with torch.no_grad(), quantizers_off(qm), quantizers_off(rq):
        a = qm(**batch, output_hidden_states=True)
        b = rq(**batch, output_hidden_states=True)
    assert float((a.logits - b.logits).abs().max()) <= 1e-4
    assert float((a.hidden_states[-1] - b.hidden_states[-1]).abs().max()) <= 1e-4

    assert assert_within_one_step(qm, rq, batch) == 173
    with torch.no_grad():
        assert float((qm(**batch).logits - rq(**batch).logits).abs().max()) <= 1e-4


@pytest.mark.parametrize("family", ["bert", "roberta", "mpnet", "distilbert", "mobilebert"])
@pytest.mark.parametrize("head", [True, False])
def test_family_rewrite_equivalence(family, head, one_thread):
    qm, batch = peg_tiny(family, head)
    rq = rewrite_peg(qm)
    assert per_tensor_only(rq) == []
    assert sorted(v["layer"] for v in rq.peg_rewrite.values()) == list(range(qm.num_layers))
    with torch.no_grad(), quantizers_off(qm), quantizers_off(rq):
        a, b = main_output(qm(**batch)), main_output(rq(**batch))
    assert float((a - b).abs().max()) <= 1e-4
    assert assert_within_one_step(qm, rq, batch) > 0
    with torch.no_grad():
        a, b = main_output(qm(**batch)), main_output(rq(**batch))
    assert float((a - b).abs().max()) <= 1e-4


def test_mobilebert_stacked_ffn_blocks(one_thread):
    """The peg-ptq patterns on MobileBERT (2 FFNs per layer): attn.layernorm is the input of the stacked
    FFN ffn.0, ffn.output / ffn.residual_sum belong to the last FFN -- both blocks are rewritten."""
    qm, batch = peg_tiny("mobilebert", peg=["encoder.layer.*.attn.layernorm", "encoder.layer.*.ffn.output",
                                            "encoder.layer.*.ffn.residual_sum"])
    rq = rewrite_peg(qm)
    assert sorted(rq.peg_rewrite) == [f"encoder.layer.{i}.ffn{s}" for i in range(2) for s in ("", ".0")]
    assert per_tensor_only(rq) == []
    with torch.no_grad(), quantizers_off(qm), quantizers_off(rq):
        assert float((main_output(qm(**batch)) - main_output(rq(**batch))).abs().max()) <= 1e-4
    assert_within_one_step(qm, rq, batch)


def test_rewrite_is_not_a_noop(one_thread):
    """The comparison above can fail: a wrong permutation is caught."""
    qm, batch = peg_tiny("bert", True)
    rq = rewrite_peg(qm)
    hook = next(h for m in rq.modules() for h in m._forward_hooks.values() if type(h).__name__ == "_PermuteGroupsHook")
    hook.perm = hook.perm.flip(0)
    with pytest.raises(AssertionError, match="steps apart"):
        assert_within_one_step(qm, rq, batch)


def test_per_channel_weights_and_unpermuted_peg(one_thread):
    qm, batch = peg_tiny("bert", True, extra=["*.weight=channel0", *[
        f"encoder.layer.1.{n}=peg4" for n in ("attn.layernorm", "ffn.output", "ffn.residual_sum")]])
    rq = rewrite_peg(qm)
    blocks = rq.peg_rewrite
    assert blocks["encoder.layer.1.ffn"]["permuted"] is False and blocks["encoder.layer.0.ffn"]["permuted"] is True
    assert_within_one_step(qm, rq, batch)
    with torch.no_grad():
        assert float((main_output(qm(**batch)) - main_output(rq(**batch))).abs().max()) <= 1e-4


@pytest.mark.parametrize("family", ["bert", "mobilebert"])
def test_outlier_group_rewrite(family, one_thread):
    """PEG with a small outlier group (peg2po4: the 4 widest-range dims, then the rest in one group) is
    rewritten into a 2-way split of unequal widths, equal to the simulation."""
    qm, batch = peg_tiny(family, True)
    d = next(iter(rewrite_peg(qm).peg_rewrite.values()))["width"]
    qm, batch = peg_tiny(family, True, token="peg2po4")
    q = qm.quantizers["encoder.layer.0.ffn.residual_sum"]
    assert q.granularity.sizes(d) == [d - 4, 4] and q.group_index.bincount().tolist() == [d - 4, 4]
    rq = rewrite_peg(qm)
    assert per_tensor_only(rq) == []
    assert all(v["sizes"] == [d - 4, 4] for v in rq.peg_rewrite.values())
    splits = [m for m in rq.modules() if isinstance(m, SplitInputLinear)]
    assert splits and all(s.sizes == [d - 4, 4] for s in splits)
    with torch.no_grad(), quantizers_off(qm), quantizers_off(rq):
        assert float((main_output(qm(**batch)) - main_output(rq(**batch))).abs().max()) <= 1e-4
    assert assert_within_one_step(qm, rq, batch) > 0
    with torch.no_grad():
        assert float((main_output(qm(**batch)) - main_output(rq(**batch))).abs().max()) <= 1e-4


@pytest.mark.parametrize("family", ["bert", "roberta", "mpnet", "distilbert", "mobilebert"])
def test_hidden_outlier_split(family, one_thread):
    """PEG with an outlier group on the FFN hidden activation (the second Linear's input): the Linear becomes
    a bulk matmul on the whole input (outlier columns of its weight zeroed) plus a matmul on the gathered
    outlier columns; equal to the original unquantized and to the simulation quantized, with or without
    the permuted FFN rewrite in the same layer."""
    from pegq.export.rewrite import OutlierSplitLinear

    qm, batch = peg_tiny(family, True, extra=["encoder.layer.*intermediate=peg2po4"])
    hidden = [n for n, q in qm.quantizers.items() if n.endswith("intermediate") and q.granularity.kind == "peg"]
    assert hidden
    rq = rewrite_peg(qm)
    assert per_tensor_only(rq) == []
    splits = [m for m in rq.modules() if isinstance(m, OutlierSplitLinear)]
    assert len(splits) == len(hidden) and all(s.index.numel() == 4 for s in splits)
    for n in hidden:
        assert n not in rq.quantizers and f"{n}.g0" in rq.quantizers and f"{n}.g1" in rq.quantizers
        w = rq.quantizers[n.replace("intermediate", "output") + ".g0.weight"]
        assert w.enabled and w.state.value == "frozen"
    s = splits[0]
    assert torch.count_nonzero(s.bulk.weight[:, s.index]) == 0  # zeroed before and after quantization
    assert torch.count_nonzero(s.bulk.parametrizations.weight.original[:, s.index]) == 0
    with torch.no_grad(), quantizers_off(qm), quantizers_off(rq):
        assert float((main_output(qm(**batch)) - main_output(rq(**batch))).abs().max()) <= 1e-4
    assert assert_within_one_step(qm, rq, batch) > 0
    with torch.no_grad():
        assert float((main_output(qm(**batch)) - main_output(rq(**batch))).abs().max()) <= 1e-4


def test_hidden_peg_without_an_outlier_group_is_refused(one_thread):
    qm, _ = peg_tiny("bert", True, extra=["encoder.layer.*.ffn.intermediate=peg37p"])  # d_ff=37
    with pytest.raises(RewriteError, match="peg2po"):
        rewrite_peg(qm)


def test_model_without_peg_comes_back_unchanged(one_thread):
    from models_helpers import padded_batch, tiny_model

    qm = pegq.quantize(tiny_model("bert", True), "w8a8")
    pegq.calibrate(qm, [padded_batch()], progress=False)
    rq = rewrite_peg(qm)
    assert rq.peg_rewrite == {} and list(rq.quantizers) == list(qm.quantizers)


def test_peg_outside_the_ffn_is_refused_with_the_reason(one_thread):
    with pytest.raises(RewriteError, match=r"encoder\.layer\.0\.attn\.query: PEG is only rewritable.*FFN"):
        qm, _ = peg_tiny("bert", True, extra=["encoder.layer.0.attn.query=peg1"])
        rewrite_peg(qm)


def test_per_embedding_activations_are_refused(one_thread):
    with pytest.raises(RewriteError, match="per-tensor hardware"):
        qm, _ = peg_tiny("bert", True, extra=["encoder.layer.0.attn.output=emb"])
        rewrite_peg(qm)


def test_uncalibrated_model_is_refused(one_thread):
    from models_helpers import tiny_model

    from pegq.models import wrap

    m = tiny_model("bert", True)
    qm = wrap(m)
    qm = pegq.quantize(qm, "w8a8", overrides=[f"{n}=peg4p" for n in qm.ffn_names(0).values()])
    with pytest.raises(RewriteError, match="calibrate"):
        rewrite_peg(qm)


def test_rewriting_twice_is_refused(one_thread):
    qm, _ = peg_tiny("distilbert", True)
    rq = rewrite_peg(qm)
    with pytest.raises(RewriteError, match="already rewritten"):
        rewrite_peg(rq)
