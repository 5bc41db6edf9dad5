"""run_analysis on the real MiniLM (all-MiniLM-L6-v2) with real rotten_tomatoes sentences."""

import base64
import json
import re

import matplotlib.image as mpimg
import pytest
import torch

from pegq.analysis.collect import collect
from pegq.analysis.results import build_stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_stats_json_content(minilm_run):
    stats, out = minilm_run
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["settings"]["num_sequences"] == 8
    assert on_disk["model"]["num_layers"] == 6 and on_disk["model"]["hidden_size"] == 384
    assert not list(out.glob(".*.tmp")), "no temporary files left behind"
    L = on_disk["model"]["num_layers"]
    t = on_disk["tensors"]
    # every recorded tensor has the basic statistics
    for i in range(L):
        for suffix in (
            "attn.layernorm",
            "ffn.output",
            "ffn.residual_sum",
            "ffn.layernorm",
            "attn.residual_sum",
            "attn.query",
            "attn.key",
        ):
            e = t[f"encoder.layer.{i}.{suffix}"]
            for k in ("min", "max", "std", "kurtosis"):
                assert isinstance(e[k], float)
            assert e["dim_ranges"]["max"] >= e["dim_ranges"]["median"] > 0
            if suffix in ("attn.layernorm", "ffn.output", "ffn.residual_sum"):
                assert len(e["dim_ranges"]["values"]) == 384
            assert e["token_ranges"]["count"] == on_disk["num_tokens"]
    # known MiniLM outliers: dim 99 at [CLS], residual sum up to ~220 in the early layers
    rs0 = t["encoder.layer.0.ffn.residual_sum"]
    assert rs0["max"] > 50 and rs0["kurtosis"] > 100
    early = [t[f"encoder.layer.{i}.ffn.residual_sum"]["outliers"]["dims"] for i in range(4)]
    assert any(d["dim"] == 99 and "[CLS]" in d["tokens"] for dims in early for d in dims)
    assert rs0["dim_ranges"]["argmax_dim"] == 99
    summary = on_disk["summary"]
    dims = {d["dim"]: d for d in summary["outlier_dims"]}
    assert 99 in dims and dims[99]["max_abs_value"] > 50 and "[CLS]" in dims[99]["tokens"]
    assert {223, 127} & set(dims)  # the later-layer outlier dims
    assert "[CLS]" in summary["tokens"]
    assert summary["worst_layers_by_range"][0]["range"] > 50
    # attention: L x H shares in [0, 1], means consistent
    share = on_disk["attention"]["special_share"]
    assert len(share) == L and all(len(row) == 12 for row in share)
    assert all(0.0 <= v <= 1.0 for row in share for v in row)
    sep = on_disk["attention"]["separator_share"]
    assert all(s <= a + 1e-6 for ra, rs in zip(share, sep, strict=True) for a, s in zip(ra, rs, strict=True))
    assert set(on_disk["attention"]["special_tokens_seen"]) == {"[CLS]", "[SEP]"}
    assert on_disk["attention"]["special_tokens_seen"]["[CLS]"] == 8
    # recommendations name real quantizers in pegq's override grammar
    rec = summary["recommendations"]
    assert rec["mp_ptq"]["layers"]
    assert all(
        re.fullmatch(r"encoder\.layer\.(\d+|\*)\.ffn\.residual_sum=a16", o)
        for o in rec["mp_ptq"]["overrides"]
    )
    assert rec["peg"]["preset"] == "peg-ptq" and 384 % rec["peg"]["K"] == 0 and rec["peg"]["K"] >= 3
    assert "peg" in rec["peg"]["cli"] and "--preset peg-ptq" in rec["peg"]["cli"]
    # the returned dict is the document plus the written paths
    assert stats["summary"] == summary and "files" in stats


def test_every_png_is_valid_and_embedded(minilm_run):
    stats, out = minilm_run
    figs = stats["figures"]
    names = {f["file"] for f in figs}
    assert {
        "layer_ranges.png",
        "ffn_input_distributions.png",
        "ffn_output_distributions.png",
        "attention_special_share.png",
    } <= names
    assert {f"outliers_layer{i}.png" for i in range(6)} <= names
    assert any(n.startswith("token_ranges_layer") for n in names)
    assert any(n.startswith("attention_layer") for n in names) and any(
        n.startswith("qk_layer") for n in names
    )
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    html = (out / "report.html").read_text()
    for f in figs:
        raw = (out / f["file"]).read_bytes()
        assert raw[:8] == PNG_MAGIC
        img = mpimg.imread(out / f["file"])
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0.01
        assert f"data:image/png;base64,{base64.b64encode(raw).decode()}" in html
        assert f["caption"] and f["title"]
    # self-contained: no external resource
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", html)
    assert "<script" not in html and "<link" not in html
    assert html.index("Summary") < html.index("<figure")


def test_summary_md(minilm_run):
    _, out = minilm_run
    md = (out / "summary.md").read_text()
    for needle in (
        "## Worst layers",
        "## Outlier dimensions",
        "| 99 |",
        "[CLS]",
        "## Attention on special tokens",
        "MP-PTQ",
        'residual_sum=a16"',
        "peg-ptq",
    ):
        assert needle in md


def test_padding_never_enters_a_statistic(minilm_dir, minilm_tok, rt_sentences):
    """Batch size 1 (no padding) and 4 (padded) give the same statistics."""
    from pegq.models import load_model, wrap

    model, _ = load_model(str(minilm_dir), for_classification=False)
    qm = wrap(model)
    sents = rt_sentences[8:12]
    a = collect(qm, minilm_tok, sents, batch_size=1, max_length=64)
    b = collect(qm, minilm_tok, sents, batch_size=4, max_length=64)
    assert a.num_tokens == b.num_tokens
    for name in ("encoder.layer.0.ffn.residual_sum", "encoder.layer.5.attn.layernorm"):
        ma, mb = a.moments[name], b.moments[name]
        assert ma.n == mb.n and ma.max == pytest.approx(mb.max, rel=1e-4)
        assert ma.std == pytest.approx(mb.std, rel=1e-4) and ma.kurtosis == pytest.approx(
            mb.kurtosis, rel=1e-3
        )
        assert torch.allclose(a.dims[name].ranges, b.dims[name].ranges, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.outliers[name].dim_counts, b.outliers[name].dim_counts)
    for i in range(6):
        assert torch.allclose(a.special_sum[i], b.special_sum[i], atol=1e-4)
    assert a.query_count == b.query_count == a.num_tokens
    assert a.map_lengths == b.map_lengths


def test_bad_arguments(minilm_dir, rt_sentences, tmp_path):
    from pegq.analysis import run_analysis

    with pytest.raises(ValueError, match="num_sequences"):
        run_analysis(str(minilm_dir), None, rt_sentences, tmp_path, num_sequences=0)
    with pytest.raises(ValueError, match="no sentences"):
        run_analysis(str(minilm_dir), None, [], tmp_path)


def test_layer_and_head_choice(minilm_dir, minilm_tok, rt_sentences):
    from pegq.models import load_model, wrap

    model, _ = load_model(str(minilm_dir), for_classification=False)
    col = collect(wrap(model), minilm_tok, rt_sentences[:2], max_length=32)
    default = build_stats(col)
    worst = max(default["layers"], key=lambda r: r["ffn_residual_sum_range"])["layer"]
    assert default["settings"]["figure_layer"] == worst
    share = default["attention"]["special_share"]
    la, ha = default["settings"]["attention_layer"], default["settings"]["attention_head"]
    assert share[la][ha] == max(v for row in share for v in row)
    chosen = build_stats(col, layer=4, head=3)
    assert chosen["settings"]["figure_layer"] == chosen["settings"]["attention_layer"] == 4
    assert (
        chosen["settings"]["attention_head"] == 3 and chosen["qk"]["layer"] == 4 and chosen["qk"]["head"] == 3
    )
    only_layer = build_stats(col, layer=1)
    assert only_layer["settings"]["attention_head"] == max(range(12), key=lambda h: share[1][h])
    with pytest.raises(ValueError, match="layer 6 is out of range"):
        build_stats(col, layer=6)
    with pytest.raises(ValueError, match="head 12 is out of range"):
        build_stats(col, head=12)
