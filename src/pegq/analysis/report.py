"""The summary (Markdown, HTML, console) and the self-contained HTML report.

The summary is built once as a list of blocks and rendered to Markdown (``summary.md``), HTML
(``report.html``, images embedded as base64 data URIs, no external resource) and a rich console
table.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from pathlib import Path

ROLE_SHORT = {
    "ffn_input": "FFN input",
    "ffn_output": "FFN output",
    "ffn_residual_sum": "residual sum",
}


def _fmt(x, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, int):
        return str(x)
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    return f"{x:.{nd - 1}f}" if ax >= 0.01 or x == 0 else f"{x:.2e}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _layers(ls) -> str:
    ls = list(ls)
    if not ls:
        return "–"
    runs, start, prev = [], ls[0], ls[0]
    for v in ls[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(f"{start}" if start == prev else f"{start}–{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(runs)


def display_name(info: dict) -> str:
    """A short model name for titles: the last two parts of a folder path, or the hub id."""
    name = str(info.get("name") or info.get("family") or "model")
    if name.startswith(("/", "./", "../", "~")) or "\\" in name:
        parts = [p for p in re.split(r"[\\/]", name) if p]
        return "/".join(parts[-2:]) or name
    return name


def _tokens(d: dict, n: int = 5) -> str:
    return ", ".join(f"`{t}` ×{c}" for t, c in list(d.items())[:n]) or "–"


# --------------------------------------------------------------------------- summary blocks
def summary_blocks(stats: dict) -> list[tuple]:
    s = stats["summary"]
    info = stats["model"]
    st = stats["settings"]
    rec = s["recommendations"]
    blocks: list[tuple] = []
    name = info.get("name") or info.get("family")
    blocks.append(
        (
            "p",
            f"Model `{name}` ({info['family']}, {info['num_layers']} layers, d = {info['hidden_size']}, "
            f"{info['num_heads']} heads), FP32, on {st['num_sequences']} sequences "
            f"({stats['num_tokens']} real tokens, max length {st['max_length']}). "
            f"Outlier = value beyond {st['sigma']:g} standard deviations of the tensor mean.",
        )
    )

    blocks.append(("h2", "Worst layers"))
    blocks.append(
        (
            "ul",
            [
                "By range of the residual sum after the FFN: "
                + "; ".join(
                    f"layer {r['layer']} (range {_fmt(r['range'])}, {_fmt(r['min'])} … {_fmt(r['max'])})"
                    for r in s["worst_layers_by_range"]
                ),
                "By range ratio (max / median of the per-dim ranges of that sum): "
                + "; ".join(f"layer {r['layer']} ({_fmt(r['ratio'])}×)" for r in s["worst_layers_by_ratio"]),
            ],
        )
    )

    blocks.append(("h2", "Outlier dimensions"))
    if s["outlier_dims"]:
        rows = []
        for d in s["outlier_dims"]:
            rows.append(
                [
                    str(d["dim"]),
                    _layers(d["layers"]),
                    f"{_fmt(d['value'])} (layer {d.get('value_layer', '–')}, "
                    f"{ROLE_SHORT.get(d.get('value_tensor'), d.get('value_tensor', ''))})",
                    ", ".join(ROLE_SHORT[r] for r in d["tensors"]),
                    _pct(d["max_fraction"]),
                    _tokens(d["tokens"], 4)
                    + (
                        f" ({ROLE_SHORT[d['tokens_in']]})"
                        if d.get("tokens_in") not in (None, "ffn_residual_sum")
                        else ""
                    ),
                ]
            )
        blocks.append(
            (
                "table",
                [
                    "dim",
                    "layers",
                    "most extreme value",
                    "in",
                    "max share of tokens",
                    "tokens (residual sum unless noted; over layers)",
                ],
                rows,
            )
        )
    else:
        blocks.append(("p", "No embedding dim is a 6-sigma outlier in at least 1% of the tokens."))

    blocks.append(("h2", "Tokens involved"))
    blocks.append(
        (
            "p",
            f"Tokens carrying residual-sum outliers (occurrences summed over layers): "
            f"{_tokens(s['tokens'], 8)}; {_pct(s['special_token_share_of_outlier_tokens'])} of "
            "them are special tokens.",
        )
    )

    a = s["attention"]
    att = stats["attention"]
    blocks.append(("h2", "Attention on special tokens"))
    top = "; ".join(
        f"layer {h['layer']} head {h['head']}: {_pct(h['special_share'])} "
        f"(separator {_pct(h['separator_share'])})"
        for h in a["top_heads"]
    )
    qk = s["qk"]
    dims_txt = ", ".join(f"{m['dim']} ({_pct(m['share_of_score'])})" for m in qk["top_dims"][:3])
    blocks.append(
        (
            "ul",
            [
                f"Mean share of attention probability on special tokens "
                f"({', '.join('`' + t + '`' for t in att['special_tokens_seen']) or 'none seen'}) over all "
                f"{a['num_heads_total']} heads: {_pct(a['mean_special_share'])}; on separators "
                f"({', '.join('`' + t + '`' for t in att['separator_tokens'])}) only: "
                f"{_pct(a['mean_separator_share'])}.",
                f"{a['heads_over_half_on_special']} of {a['num_heads_total']} heads put more "
                "than half of their "
                "attention on special tokens.",
                f"Top heads: {top}.",
                f"Layer {qk['layer']}, head {qk['head']}, first sequence: the highest q·k score is query "
                f"`{qk['query_token']}` → key `{qk['key_token']}` ({_fmt(qk['score'])}); head "
                f"dims {dims_txt} "
                "carry most of it.",
            ],
        )
    )

    mp, peg = rec["mp_ptq"], rec["peg"]
    blocks.append(("h2", "What to try"))
    blocks.append(
        (
            "ul",
            [
                f"**MP-PTQ** (paper §4, Table 4): keep the residual sum after the FFN at 16 bits in layer(s) "
                f"{_layers(mp['layers'])}: `{mp['cli']}`. If that is not enough, also the FFN "
                "input and output: " + " ".join(f'`--override "{o}"`' for o in mp["overrides_ffn_io"]) + ".",
                f"**PEG-PTQ** (paper §4, Table 5): preset `{peg['preset']}` with K = {peg['K']} groups of "
                f"{peg['group_size']} dims and range-based permutation on FFN input, output and "
                f"sum: `{peg['cli']}`. "
                f"{peg['why'][0].upper() + peg['why'][1:]}.",
            ],
        )
    )
    return blocks


_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")


def _inline_html(text: str) -> str:
    out, pos = [], 0
    for m in _CODE.finditer(text):
        out.append(_BOLD.sub(r"<strong>\1</strong>", html.escape(text[pos : m.start()])))
        out.append(f"<code>{html.escape(m.group(1))}</code>")
        pos = m.end()
    out.append(_BOLD.sub(r"<strong>\1</strong>", html.escape(text[pos:])))
    return "".join(out)


def blocks_markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h2":
            lines += [f"## {b[1]}", ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in b[1]] + [""]
        elif kind == "table":
            head, rows = b[1], b[2]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "|".join("---" for _ in head) + "|")
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
            lines.append("")
    return "\n".join(lines)


def blocks_html(blocks: list[tuple]) -> str:
    parts: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h2":
            parts.append(f"<h3>{html.escape(b[1])}</h3>")
        elif kind == "p":
            parts.append(f"<p>{_inline_html(b[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in b[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    return "\n".join(parts)


def summary_markdown(stats: dict, figures: list[dict] | None = None) -> str:
    md = "# Outlier analysis\n\n" + blocks_markdown(summary_blocks(stats))
    if figures:
        md = (
            md.rstrip("\n")
            + "\n\n## Figures\n\n"
            + "\n".join(f"- `{f['file']}`: {f['title']}" for f in figures)
            + "\n"
        )
    return md


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
main{max-width:1200px;margin:0 auto;padding:24px 32px 64px;background:#fff}
h1{font-size:1.6em;margin:.2em 0 .1em}h2{margin-top:1.6em;border-bottom:1px solid #dde;padding-bottom:.2em}
h3{margin:1.2em 0 .4em}code{background:#eef1f5;padding:1px 4px;border-radius:3px;font-size:.92em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #d5d9e0;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#eef1f5}.meta{color:#5b6575;font-size:.9em}
figure{margin:1.4em 0;padding:12px;border:1px solid #e3e6eb;border-radius:6px;background:#fff}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}figcaption{margin-top:.6em;font-size:.92em;
color:#333}figcaption b{color:#1d2430}.summary{background:#f9fafc;border:1px solid #e3e6eb;border-radius:6px;
padding:4px 20px 12px}nav ol{columns:2;font-size:.92em}
"""


def report_html(stats: dict, figures: list[dict], output_dir: str | Path) -> str:
    """The full report; ``figures`` items: ``{file, title, caption}`` with files under output_dir."""
    output_dir = Path(output_dir)
    info = stats["model"]
    name = html.escape(display_name(info))
    figs_html, toc = [], []
    for k, f in enumerate(figures, start=1):
        data = base64.b64encode((output_dir / f["file"]).read_bytes()).decode("ascii")
        anchor = f"fig{k}"
        toc.append(f'<li><a href="#{anchor}">{html.escape(f["title"])}</a></li>')
        figs_html.append(
            f'<figure id="{anchor}"><img alt="{html.escape(f["title"])}" '
            f'data-file="{html.escape(f["file"])}" '
            f'src="data:image/png;base64,{data}"><figcaption><b>Figure {k}. {html.escape(f["title"])}.</b> '
            f"{_inline_html(f['caption'])} <span "
            f'class="meta">({html.escape(f["file"])})</span></figcaption></figure>'
        )
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pegq outlier analysis: {name}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body><main>
<h1>Outlier analysis: {name}</h1>
<p class="meta">pegq, FP32 activations after Bondarenko et al. 2021, §3 and appendices A, D. Generated {when};
statistics in <code>stats.json</code>.</p>
<h2>Summary</h2>
<div class="summary">
{blocks_html(summary_blocks(stats))}
</div>
<h2>Figures</h2>
<nav><ol>{"".join(toc)}</ol></nav>
{"".join(figs_html)}
</main></body></html>
"""


# --------------------------------------------------------------------------- console
def print_console(stats: dict, console=None) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = console or Console()
    s = stats["summary"]
    table = Table(
        title=f"Outlier analysis: {display_name(stats['model'])}",
        title_justify="left",
        caption="ranges = max − min; ratio = max / median per-dim range of the residual sum; "
        "→special = mean attention on special tokens; red = keep the residual sum at 16 bits",
        caption_justify="left",
    )
    for col, just in (
        ("layer", "right"),
        ("FFN in", "right"),
        ("FFN out", "right"),
        ("res. sum", "right"),
        ("ratio", "right"),
        ("kurt.", "right"),
        ("outlier dims", "left"),
        ("→special", "right"),
    ):
        table.add_column(col, justify=just)
    flagged = set(s["recommendations"]["mp_ptq"]["layers"])
    for r in stats["layers"]:
        style = "bold red" if r["layer"] in flagged else None
        table.add_row(
            str(r["layer"]),
            _fmt(r["ffn_input_range"]),
            _fmt(r["ffn_output_range"]),
            _fmt(r["ffn_residual_sum_range"]),
            _fmt(r["range_ratio"]),
            _fmt(r["kurtosis"]),
            ",".join(map(str, r["outlier_dims"][:4])) or "–",
            _pct(r["special_share_mean"]),
            style=style,
        )
    console.print(table)
    rec = s["recommendations"]
    console.print(f"MP-PTQ: {rec['mp_ptq']['cli']}", markup=False, highlight=False)
    console.print(f"PEG-PTQ: {rec['peg']['cli']}", markup=False, highlight=False)
