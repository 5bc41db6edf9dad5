"""``run_analysis``: FP32 forward passes -> ``stats.json``, PNG figures, ``summary.md``, ``report.html``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write_json, atomic_write_text, prepare_output_dir
from . import figures as F
from .collect import Collected, collect, resolve_model
from .report import print_console, report_html, summary_markdown
from .results import build_stats, jsonable, significant_dims
from .stats import DEFAULT_SIGMA, head_slice


def run_analysis(
    model_dir_or_qm: Any,
    tokenizer: Any = None,
    sentences: Sequence[str | tuple[str, str]] = (),
    output_dir: str | Path = "analysis",
    num_sequences: int = 64,
    layer: int | None = None,
    head: int | None = None,
    max_length: int = 128,
    *,
    batch_size: int = 8,
    sigma: float = DEFAULT_SIGMA,
    keep_sequences: int = 10,
    overwrite: bool = True,
    console: bool = True,
    progress: bool = False,
) -> dict:
    """Analyse the FP32 activations of a model on the first ``num_sequences`` sentences.

    ``model_dir_or_qm``: a model folder (loaded with :func:`pegq.models.load_model`), a Hugging Face
    model (wrapped with :func:`pegq.models.wrap`) or an already wrapped model (anything with
    ``capture``). ``sentences``: strings, or ``(text_a, text_b)`` pairs. ``layer``: the layer of the
    per-token-range and attention figures (default: the layer with the largest residual-sum range
    for the former; the (layer, head) with the most attention on special tokens for the latter).
    ``head``: the head of the attention figures (default: the one with the most attention on special
    tokens in that layer). Returns the ``stats.json`` document, plus ``files`` (paths written).
    """
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be at least 1, got {num_sequences}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    sentences = list(sentences)[:num_sequences]
    if not sentences:
        raise ValueError("no sentences to analyse; pass a list of strings or (text_a, text_b) pairs")
    out = prepare_output_dir(output_dir, overwrite, marker="stats.json")
    qm, tokenizer = resolve_model(model_dir_or_qm, tokenizer)

    col = collect(
        qm,
        tokenizer,
        sentences,
        batch_size=batch_size,
        max_length=max_length,
        sigma=sigma,
        keep_sequences=keep_sequences,
        progress=progress,
    )
    stats = build_stats(
        col,
        layer=layer,
        head=head,
        max_length=max_length,
        sentences_preview=[_preview(s) for s in sentences[:keep_sequences]],
    )
    figs = make_figures(col, stats, out)
    stats["figures"] = figs
    stats = jsonable(stats)
    files = {"stats": out / "stats.json", "summary": out / "summary.md", "report": out / "report.html"}
    atomic_write_json(files["stats"], stats)
    atomic_write_text(files["summary"], summary_markdown(stats, figs))
    atomic_write_text(files["report"], report_html(stats, figs, out))
    if console:
        print_console(stats)
    stats["files"] = {k: str(v) for k, v in files.items()} | {"figures": [str(out / f["file"]) for f in figs]}
    return stats


def _preview(s: Any, n: int = 160) -> Any:
    if isinstance(s, (tuple, list)):
        return [_preview(x, n // 2) for x in s]
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


def make_figures(col: Collected, stats: dict, out: Path) -> list[dict]:
    """Draw every figure into ``out``; returns ``[{file, title, caption}]`` in report order."""
    figs: list[dict] = []
    info, st = col.info, stats["settings"]
    L = info["num_layers"]
    H = len(stats["attention"]["special_share"][0])
    sigma = col.sigma
    n_keep = len(col.map_lengths)

    def add(path: Path, title: str, caption: str) -> None:
        figs.append({"file": path.name, "title": title, "caption": caption})

    # overview
    add(
        F.plot_layer_ranges(stats["layers"], out / "layer_ranges.png"),
        "Dynamic range per layer",
        "Left: range (max − min over all analysed tokens) of the FFN input, FFN output and the residual sum "
        "after the FFN, per encoder layer (log scale). Right: max / median of the residual sum's per-dim "
        "ranges; a large ratio means a few embedding dims dominate the per-tensor quantization range.",
    )

    # Fig. 2a
    lf = st["figure_layer"]
    tin = col.first_tok_ranges[col.name(lf, "ffn_input")]
    tout = col.first_tok_ranges[col.name(lf, "ffn_output")]
    layer_is_worst = lf == stats["summary"]["worst_layers_by_range"][0]["layer"]
    add(
        F.plot_token_ranges(tin, tout, col.first_tokens, lf, out / f"token_ranges_layer{lf}.png"),
        f"Per-token ranges of FFN input and output, layer {lf}",
        f"Paper Fig. 2a. Range (max − min over the {info['hidden_size']} embedding dims) "
        f"of every token of the first sequence, FFN input (top) and output (bottom) of layer {lf}"
        + (" (the layer with the largest residual-sum range)" if layer_is_worst else "")
        + ". Note the different y scales: a few tokens carry outliers that set the range of the whole "
        "tensor.",
    )

    # Fig. 2b / 5-7, every layer
    for i in range(L):
        maps, top = {}, {}
        for role, label in (("ffn_input", "FFN input"), ("ffn_output", "FFN output")):
            name = col.name(i, role)
            maps[label] = np.concatenate(col.maps[name]) if col.maps.get(name) else np.zeros((0, 1), bool)
            top[label] = [d["dim"] for d in significant_dims(stats["tensors"][name])]
        dims_txt = "; ".join(f"{k}: {', '.join(map(str, v[:6])) or 'none'}" for k, v in top.items())
        add(
            F.plot_outlier_map(maps, col.map_lengths, i, out / f"outliers_layer{i}.png", sigma, top),
            f"Outlier dims of FFN input and output, layer {i}",
            f"Paper Fig. 2b / 5-7. Dark: values beyond {sigma:g} standard deviations from the mean of the "
            f"activation tensor, for the tokens of the first {n_keep} sequences (stacked; x = "
            "embedding dim). "
            f"Dims marked on top (≥ 1% of all analysed tokens): {dims_txt}.",
        )

    # Fig. 8-12
    for role, label, fname in (
        ("ffn_input", "FFN input", "ffn_input_distributions.png"),
        ("ffn_output", "FFN output", "ffn_output_distributions.png"),
    ):
        boxes = [col.boxes.get(col.name(i, role), []) for i in range(L)]
        add(
            F.plot_range_distributions(
                boxes, f"{label}: values per data sequence (first {n_keep})", out / fname
            ),
            f"{label} distributions per sequence and layer",
            f"Paper Fig. 8-12 style. One panel per layer; per data sequence a box of the {label} "
            "values (box: "
            "quartiles, whiskers: min and max, so the whisker span is the sequence's range).",
        )

    # Fig. 4a
    special = np.array(stats["attention"]["special_share"], dtype=float)
    sep = np.array(stats["attention"]["separator_share"], dtype=float)
    seen = ", ".join(stats["attention"]["special_tokens_seen"]) or "special tokens"
    sep_names = ", ".join(stats["attention"]["separator_tokens"]) or "separator"
    add(
        F.plot_special_share(
            special,
            sep,
            out / "attention_special_share.png",
            special_label=f"special tokens ({seen})",
            separator_label=f"separators ({sep_names})",
        ),
        "Attention mass on special tokens per layer and head",
        "Share of attention probability that each head puts on special tokens (left) and on separator tokens "
        "only (right), averaged over all real (non-padding) query tokens of the analysed sequences. "
        "Paper appendix A: heads attending to the separator act as a no-op, and the outliers "
        "help them do so.",
    )

    la, ha = st["attention_layer"], st["attention_head"]
    probs = col.first_probs[la][ha].numpy()
    add(
        F.plot_attention_map(probs, col.first_tokens, la, ha, out / f"attention_layer{la}_head{ha}.png"),
        f"Attention map, layer {la}, head {ha}",
        f"Paper Fig. 4a (as a heatmap). Attention probabilities of head {ha} in layer {la} on "
        "the first sequence "
        f"(row: query token, column: key token); this head puts "
        f"{100 * special[la, ha]:.0f}% of its attention on special tokens over all sequences.",
    )

    qk = stats["qk"]
    q = head_slice(col.first_q[la], ha, H)
    k = head_slice(col.first_k[la], ha, H)
    contrib = (q[qk["query"]] * k[qk["key"]]).numpy()
    allq = (q * k[qk["key"]]).numpy()
    add(
        F.plot_qk_contributions(
            contrib,
            allq,
            col.first_tokens,
            qk["query"],
            qk["key"],
            la,
            ha,
            out / f"qk_layer{la}_head{ha}.png",
        ),
        f"Query-key contributions, layer {la}, head {ha}",
        "Paper Fig. 4b. Top: element-wise products q_i,m · k_j,m over the head dims m for the "
        "(query i, key j) "
        f"pair with the highest score in the first sequence ('{qk['query_token']}' → '{qk['key_token']}', "
        f"score {qk['score']:.1f}, /√d_head = {qk['scaled_score']:.1f}). Bottom: the same products for every "
        "query token against that key; a vertical stripe means a few designated dims decide who "
        "attends there.",
    )
    return figs
