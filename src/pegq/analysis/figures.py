"""The paper's figures, drawn with matplotlib's Agg backend from plain arrays (no model needed).

Figures are built as :class:`matplotlib.figure.Figure` on an Agg canvas, without pyplot, so the
user's interactive backend and pyplot's figure list are never touched.

Every function takes the data and an output path, writes one PNG and returns the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
MAX_TOKEN_LABELS = 80
_OUTLIER_COLOR = "#3a3a3a"  # paper: dark grey = outlier


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=DPI, facecolor="white")
    tmp.replace(path)
    return path


def _subplots(nrows: int = 1, ncols: int = 1, figsize=(8, 6), **kw):
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kw)


def _token_ticks(ax, tokens: Sequence[str], axis: str = "x", fontsize: float | None = None) -> None:
    """Token strings as tick labels (every n-th if there are too many)."""
    n = len(tokens)
    step = max(1, int(np.ceil(n / MAX_TOKEN_LABELS)))
    pos = np.arange(0, n, step)
    labels = [_short(tokens[i]) for i in pos]
    fs = fontsize or (8 if n <= 40 else 6.5)
    if axis == "x":
        ax.set_xticks(pos)
        ax.set_xticklabels(labels, rotation=90, fontsize=fs)
    else:
        ax.set_yticks(pos)
        ax.set_yticklabels(labels, fontsize=fs)


def _short(s: str, n: int = 14) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


# --------------------------------------------------------------------------- Fig. 2a
def plot_token_ranges(
    ffn_input: np.ndarray, ffn_output: np.ndarray, tokens: Sequence[str], layer: int, path: str | Path
) -> Path:
    """Per-token ranges (max - min over the embedding dim) of FFN input (top) and output (bottom)
    for one sequence; separate y scales, as in the paper's Fig. 2a."""
    n = len(tokens)
    fig, axes = _subplots(2, 1, figsize=(max(8.0, 0.22 * n + 2), 6.4), sharex=True)
    x = np.arange(n)
    for ax, vals, what, color in (
        (axes[0], ffn_input, "FFN input", "#4c72b0"),
        (axes[1], ffn_output, "FFN output", "#c44e52"),
    ):
        ax.bar(x, vals, color=color, width=0.8)
        ax.set_ylabel("range (max − min)")
        top = int(np.argmax(vals)) if len(vals) else 0
        ax.set_title(
            f"{what}, layer {layer}: per-token range (largest {float(np.max(vals)):.1f} at '{tokens[top]}')"
            if len(vals)
            else what,
            fontsize=10,
        )
        ax.grid(axis="y", alpha=0.3)
    _token_ticks(axes[1], tokens)
    axes[1].set_xlabel("token of the first sequence (note the different y scales)")
    return _save(fig, path)


# --------------------------------------------------------------------------- Fig. 2b / 5-7
def plot_outlier_map(
    maps: dict[str, np.ndarray],
    seq_lengths: Sequence[int],
    layer: int,
    path: str | Path,
    sigma: float = 6.0,
    top_dims: dict[str, Sequence[int]] | None = None,
) -> Path:
    """Dark cells where ``|x - mean| > sigma * std`` of the tensor; x = embedding dim,
    y = the tokens of the first sequences, stacked (one row per panel: FFN input, FFN output)."""
    names = list(maps)
    d = maps[names[0]].shape[1] if maps[names[0]].size else 1
    width = max(11.0, d / 95 + 2.5)  # >= ~1 pixel per embedding dim
    rows_px = max(int(sum(seq_lengths)), 1)
    panel_h = float(np.clip(rows_px / 90, 2.2, 5.0))
    fig, axes = _subplots(len(names), 1, figsize=(width, panel_h * len(names) + 0.8), squeeze=False)
    bounds = np.cumsum([0, *seq_lengths])
    for ax, name in zip(axes[:, 0], names, strict=True):
        m = maps[name]
        # markers rather than image pixels: a single outlier cell (e.g. one [CLS] token in one dim)
        # must stay visible however many tokens and dims share the panel
        ys, xs = np.nonzero(m)
        row_px = panel_h * DPI * 0.75 / rows_px
        side_px = float(np.clip(row_px, 4.0, 7.0))
        ax.scatter(xs, ys, s=(side_px * 72 / DPI) ** 2, marker="s", c=_OUTLIER_COLOR, linewidths=0)
        ax.set_xlim(-0.5, d - 0.5)
        ax.set_ylim(rows_px - 0.5, -0.5)
        for b in bounds[1:-1]:
            ax.axhline(b - 0.5, color="#9ecae1", lw=0.6)
        centers = (bounds[:-1] + bounds[1:]) / 2 - 0.5
        ax.set_yticks(centers)
        ax.set_yticklabels([f"seq {i + 1}" for i in range(len(seq_lengths))], fontsize=7)
        ax.set_ylabel("tokens (sequences stacked)")
        ax.set_xlabel("embedding dimension")
        n_out = int(m.any(axis=0).sum())
        dims = sorted(list((top_dims or {}).get(name, []))[:6])
        level, last, levels = 0, None, []
        for j in dims:  # stagger labels of neighbouring dims so they do not overlap
            level = level + 1 if last is not None and j - last < max(d / 30, 1) else 0
            levels.append(level)
            last = j
        for j, lv in zip(dims, levels, strict=True):
            ax.annotate(
                str(j),
                xy=(j, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(0, 3 + 10 * lv),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
                color="#b2182b",
                arrowprops={"arrowstyle": "-", "color": "#b2182b", "lw": 0.8, "shrinkA": 0, "shrinkB": 0},
            )
        ax.set_title(
            f"layer {layer}, {name}: {n_out} dim{'s' if n_out != 1 else ''} with values beyond "
            f"{sigma:g} std of the tensor mean (dark)",
            fontsize=10,
            pad=6 + ((14 + 10 * max(levels)) if dims else 0),
        )
    return _save(fig, path)


# --------------------------------------------------------------------------- Fig. 8-12
def plot_range_distributions(
    boxes: Sequence[Sequence[dict]], title: str, path: str | Path, layers: Sequence[int] | None = None
) -> Path:
    """One panel per layer: per data sequence, a box of the tensor's values (whiskers = min/max,
    so the whisker span is the sequence's range), as in the paper's Fig. 8-12."""
    L = len(boxes)
    layers = list(layers) if layers is not None else list(range(L))
    ncols = min(L, 4) if L > 1 else 1
    nrows = int(np.ceil(L / ncols))
    fig, axes = _subplots(nrows, ncols, figsize=(3.6 * ncols + 0.5, 2.9 * nrows + 0.8), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= L:
            ax.axis("off")
            continue
        stats = list(boxes[k])
        if stats:
            ax.bxp(
                stats,
                showfliers=False,
                patch_artist=True,
                boxprops={"facecolor": "#c6dbef", "edgecolor": "#2171b5"},
                medianprops={"color": "#08306b"},
                whiskerprops={"color": "#2171b5"},
                capprops={"color": "#2171b5"},
            )
        ax.set_title(f"layer {layers[k]}", fontsize=10)
        ax.set_xlabel("data sequence", fontsize=8)
        ax.set_ylabel("value (whiskers: min/max)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_layer_ranges(rows: Sequence[dict], path: str | Path) -> Path:
    """Per layer: ranges of FFN input, FFN output and the residual sum (log scale), and the
    residual sum's per-dim range ratio max/median."""
    layers = [r["layer"] for r in rows]
    keys = (
        ("ffn_input_range", "FFN input", "#4c72b0"),
        ("ffn_output_range", "FFN output", "#c44e52"),
        ("ffn_residual_sum_range", "residual sum after FFN", "#55a868"),
    )
    x = np.arange(len(layers))
    w = 0.27
    fig, (ax, ax2) = _subplots(1, 2, figsize=(12, 4.2))
    for k, (key, label, color) in enumerate(keys):
        ax.bar(x + (k - 1) * w, [r[key] for r in rows], width=w, label=label, color=color)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([str(i) for i in layers])
    ax.set_xlabel("encoder layer")
    ax.set_ylabel("range max − min (log scale)")
    ax.set_title("Dynamic range per layer", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax2.bar(x, [r["range_ratio"] for r in rows], color="#8172b2")
    ax2.set_xticks(x)
    ax2.set_xticklabels([str(i) for i in layers])
    ax2.set_xlabel("encoder layer")
    ax2.set_ylabel("max / median of per-dim ranges")
    ax2.set_title("Residual sum after FFN: how far the widest dims stand out", fontsize=10)
    ax2.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- Fig. 4
def plot_attention_map(
    probs: np.ndarray, tokens: Sequence[str], layer: int, head: int, path: str | Path
) -> Path:
    """Attention probabilities of one head for the first sequence (rows: query, columns: key)."""
    n = len(tokens)
    size = float(np.clip(0.2 * n + 3, 6, 16))
    fig, ax = _subplots(figsize=(size + 1.2, size))
    im = ax.imshow(probs, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    _token_ticks(ax, tokens, "x")
    _token_ticks(ax, tokens, "y")
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    ax.set_title(f"Attention probabilities, layer {layer}, head {head} (first sequence)", fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label("attention probability")
    return _save(fig, path)


def plot_special_share(
    special: np.ndarray,
    separator: np.ndarray,
    path: str | Path,
    special_label: str = "special tokens",
    separator_label: str = "separator",
) -> Path:
    """Layers x heads heatmaps of the attention mass on special tokens and on separators only."""
    L, H = special.shape
    fig, axes = _subplots(1, 2, figsize=(max(10.0, 0.62 * H * 2 + 3), 0.5 * L + 2.2))
    for ax, data, what in ((axes[0], special, special_label), (axes[1], separator, separator_label)):
        im = ax.imshow(data, cmap="magma_r", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"Attention mass on {what}", fontsize=10)
        if L * H <= 400:
            for i in range(L):
                for h in range(H):
                    v = data[i, h]
                    ax.text(
                        h,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="white" if v > 0.55 else "black",
                    )
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cb.set_label("share of attention probability\n(mean over real query tokens)", fontsize=8)
    return _save(fig, path)


def plot_qk_contributions(
    contributions: np.ndarray,
    all_queries: np.ndarray,
    tokens: Sequence[str],
    query: int,
    key: int,
    layer: int,
    head: int,
    path: str | Path,
) -> Path:
    """Element-wise ``q_i * k_j`` for the top-scoring (query i, key j) pair (bars), and for every
    query against that key j (heatmap: a vertical stripe = a few head dims decide the score)."""
    dh = len(contributions)
    n = len(tokens)
    fig, (ax1, ax2) = _subplots(
        2,
        1,
        figsize=(max(9.0, dh * 0.16 + 3), 3.2 + float(np.clip(0.16 * n, 2.5, 10))),
        gridspec_kw={"height_ratios": [1, float(np.clip(0.05 * n, 1.0, 3.0))]},
    )
    colors = np.where(contributions >= 0, "#d6604d", "#4393c3")
    ax1.bar(np.arange(dh), contributions, color=colors)
    ax1.axhline(0, color="black", lw=0.6)
    ax1.set_xlim(-0.5, dh - 0.5)
    ax1.set_xlabel("head dimension")
    ax1.set_ylabel("q_i · k_j term")
    ax1.set_title(
        f"Layer {layer}, head {head}: element-wise q·k for the top pair: query '{tokens[query]}' (#{query}) "
        f"→ key '{tokens[key]}' (#{key}), score {float(contributions.sum()):.1f}",
        fontsize=10,
    )
    ax1.grid(axis="y", alpha=0.3)
    lim = float(np.max(np.abs(all_queries))) or 1.0
    im = ax2.imshow(all_queries, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    _token_ticks(ax2, tokens, "y")
    ax2.set_xlabel("head dimension")
    ax2.set_ylabel("query token")
    ax2.set_title(f"q_i ⊙ k_j for every query i against key '{tokens[key]}' (#{key})", fontsize=10)
    cb = fig.colorbar(im, ax=ax2, fraction=0.03, pad=0.02)
    cb.set_label("q_i,m · k_j,m (red +, blue −)")
    return _save(fig, path)
