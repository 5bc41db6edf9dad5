"""Packed checkpoints: weights at their bit-width, reloaded into exactly the simulated model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import main_output, peg_tiny

import pegq
from pegq.export.packed import (
    PackedError,
    load_packed,
    pack_codes,
    save_packed,
    size_report,
    storage_bits,
    unpack_codes,
)
from pegq.io import OutputError


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_pack_unpack_round_trip(bits, n):
    rng = np.random.default_rng(bits * 100 + n)
    codes = rng.integers(0, 2**bits, size=n)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == -(-n * storage_bits(bits) // 8)  # ceil(n * width / 8) bytes
    assert np.array_equal(unpack_codes(packed, bits, n), codes)


def test_packing_density_and_range():
    assert pack_codes(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]  # four per byte, first lowest
    assert pack_codes(np.array([0xA, 0x5]), 4).tolist() == [0x5A]  # two per byte
    with pytest.raises(PackedError, match="outside"):
        pack_codes(np.array([4]), 2)


def test_mixed_bits_round_trip_is_identical(tmp_path, one_thread):
    qm, batch = peg_tiny("bert", head=True, extra=["encoder.*.weight=w4,mse", "embeddings.word.weight=w2",
                                                  "encoder.layer.1.attn.query.weight=w8,channel0"])
    info = save_packed(qm, tmp_path / "p")
    loaded, tok = load_packed(tmp_path / "p")
    assert tok is None
    with torch.no_grad():
        assert torch.equal(main_output(qm(**batch)), main_output(loaded(**batch)))
    for n, q in qm.quantizers.items():
        lq = loaded.quantizers[n]
        assert (lq.bits, lq.symmetric, lq.granularity) == (q.bits, q.symmetric, q.granularity), n
        if q.perm is not None:
            assert torch.equal(lq.perm, q.perm), n
    # the bytes really are packed: 4-bit encoder weights, 2-bit word embeddings
    w = info["files"]["model.safetensors"]
    assert w == info["safetensors_bytes"] and info["reduction_on_disk"] > 2.0  # tiny: biases, LayerNorm weigh in
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "p" / "model.safetensors"))
    word = sd["bert.embeddings.word_embeddings.weight.packed"]
    assert word.dtype == torch.uint8 and word.numel() == 100 * 32 // 4
    ffn = sd["bert.encoder.layer.0.output.dense.weight.packed"]
    assert ffn.numel() == 32 * 37 // 2 + (32 * 37) % 2
    assert "bert.encoder.layer.0.output.dense.weight" not in sd  # no FP32 copy


def test_outlier_group_round_trip(tmp_path, one_thread):
    """PEG with an outlier group (FFN tensors and the FFN hidden activation) survives save/load."""
    qm, batch = peg_tiny("roberta", head=True, token="peg2po4", extra=["encoder.layer.*intermediate=peg2po8"])
    save_packed(qm, tmp_path / "p")
    loaded, _ = load_packed(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(main_output(qm(**batch)), main_output(loaded(**batch)))
    for n in ("encoder.layer.0.ffn.residual_sum", "encoder.layer.1.ffn.intermediate"):
        assert loaded.quantizers[n].granularity == qm.quantizers[n].granularity
        assert torch.equal(loaded.quantizers[n].group_index, qm.quantizers[n].group_index)
    assert loaded.quantizers["encoder.layer.1.ffn.intermediate"].granularity.outliers == 8


def test_minilm_round_trip_and_size(minilm_peg, tmp_path):
    qm, tok, batch = minilm_peg
    info = save_packed(qm, tmp_path / "m", tokenizer=tok)
    # 8-bit weights: a quarter of the FP32 parameter bytes (biases/LayerNorm stay FP32)
    assert 3.8 < info["reduction_on_disk"] <= 4.0
    if "theoretical" in info:  # pegq.size (another module) accounts the same model
        assert abs(info["theoretical"]["reduction"] - info["reduction_on_disk"]) < 0.1
    loaded, tok2 = load_packed(tmp_path / "m")
    assert tok2 is not None
    with torch.no_grad():
        assert torch.equal(qm(**batch).logits, loaded(**batch).logits)
    assert size_report(loaded, tmp_path / "m")["bytes_on_disk"] == info["bytes_on_disk"]


def test_refuses_bad_inputs(tmp_path, one_thread):
    from models_helpers import tiny_model

    from pegq.export.rewrite import rewrite_peg

    qm = pegq.quantize(tiny_model("bert", True), "w8a8")
    with pytest.raises(PackedError, match="calibrate"):
        save_packed(qm, tmp_path / "a")
    qm, _ = peg_tiny("distilbert")
    with pytest.raises(PackedError, match="rewrite"):
        save_packed(rewrite_peg(qm), tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.txt").write_text("keep me")
    with pytest.raises(OutputError, match="--overwrite"):
        save_packed(qm, tmp_path / "c")
    assert (tmp_path / "c" / "x.txt").read_text() == "keep me"
    with pytest.raises(PackedError, match="not a pegq packed checkpoint"):
        load_packed(tmp_path / "c")
    with pytest.raises(PackedError, match="not a folder"):
        load_packed(tmp_path / "c" / "x.txt")


def test_smoothed_weights_round_trip_is_identical(tmp_path, one_thread):
    """Smoothed weights are stored as the codes of W diag(s) and loaded back divided by s: same outputs."""
    from models_helpers import pad_id_of, padded_batch, tiny_model

    m = tiny_model("bert", True)
    qm = pegq.quantize(m, "sq-gemm", overrides=["encoder.layer.*intermediate=peg2po4",
                                                "encoder.layer.*.attn.layernorm=sqauto,shift"])
    pegq.calibrate(qm, [padded_batch(pad_id_of(m), seed=1)], progress=False)
    assert qm.quantizers["encoder.layer.1.attn.key.weight"].smooth is not None
    assert qm.quantizers["encoder.layer.1.attn.layernorm"].shift is not None
    save_packed(qm, tmp_path / "p")
    loaded, _ = load_packed(tmp_path / "p")
    batch = padded_batch(pad_id_of(m), seed=2)
    with torch.no_grad():
        assert torch.equal(main_output(qm(**batch)), main_output(loaded(**batch)))
    for n, q in qm.quantizers.items():
        if q.smooth is not None:
            assert torch.equal(loaded.quantizers[n].smooth, q.smooth), n
            assert loaded.quantizers[n].smooth_alpha == q.smooth_alpha, n
            assert (q.shift is None and loaded.quantizers[n].shift is None) or torch.equal(
                loaded.quantizers[n].shift, q.shift), n
            assert loaded.quantizers[n].smooth_shift == q.smooth_shift, n


def test_per_token_quantizers_round_trip(tmp_path, one_thread):
    """``sq-token-gemm``: the per-token (dynamic) activation quantizers come back as such (no stored range is
    used to quantize), with their smoothing: same outputs."""
    from models_helpers import pad_id_of, padded_batch, tiny_model

    from pegq.quant import PerToken

    m = tiny_model("bert", True)
    qm = pegq.quantize(m, "sq-token-gemm")
    pegq.calibrate(qm, [padded_batch(pad_id_of(m), seed=1)], progress=False)
    save_packed(qm, tmp_path / "p")
    loaded, _ = load_packed(tmp_path / "p")
    assert loaded.quantizers["encoder.layer.1.ffn.intermediate"].granularity == PerToken()
    assert loaded.quantizers["encoder.layer.1.attn.layernorm"].smooth is not None
    batch = padded_batch(pad_id_of(m), seed=2)
    with torch.no_grad():
        assert torch.equal(main_output(qm(**batch)), main_output(loaded(**batch)))
