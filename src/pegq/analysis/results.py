"""Turn the accumulated statistics into the ``stats.json`` document, including the summary and the
recommendations (which layers to keep at 16 bits for MP-PTQ, which K for PEG-PTQ)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import torch

from .collect import ROLE_LABELS, Collected
from .stats import distribution_summary, head_slice, range_ratio, suggest_peg_groups, top_qk_pair

#: the tensors whose outliers the summary and the recommendations are about (paper Fig. 2)
SUMMARY_ROLES = ("ffn_input", "ffn_output", "ffn_residual_sum")
#: a dim counts as an outlier dim of a tensor in the summary when it is a 6-sigma outlier in at
#: least this share of the real tokens (and in at least two tokens)
MIN_OUTLIER_FRACTION = 0.01
#: a layer is flagged for 16-bit residual sum when its range or range ratio is at least this share of
#: the largest one over the layers
FLAG_SHARE = 0.5
PEG_ROLES = ("ffn_input", "ffn_output", "ffn_residual_sum")


def _f(x: float, nd: int = 6) -> float | None:
    """JSON-safe float: rounded to ``nd`` significant digits, NaN/inf -> None."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{nd}g}")


def significant_dims(entry: dict) -> list[dict]:
    """The outlier dims of one tensor entry that pass the summary thresholds."""
    n = entry["outliers"]["tokens"]
    need = max(2, math.ceil(MIN_OUTLIER_FRACTION * n))
    return [d for d in entry["outliers"]["dims"] if d["count"] >= need]


def tensor_entry(col: Collected, name: str, top: int = 10) -> dict:
    layer, role = col.role_of(name)
    m = col.moments[name]
    dr = col.dims[name]
    ranges = dr.ranges
    tr = col.token_range_array(name)
    trs = {k: _f(v) if isinstance(v, float) else v for k, v in distribution_summary(tr).items()}
    if tr.size:
        trs["argmax_token"] = col.tok_range_strings[int(np.nanargmax(tr))]
    order = torch.argsort(ranges, descending=True)[:top].tolist()
    oc = col.outliers[name]
    out = oc.to_dict(top)
    for d in out["dims"]:
        j = d["dim"]
        d["fraction"] = _f(d["fraction"])
        d["min"], d["max"] = _f(dr.lo[j]), _f(dr.hi[j])
    out["fraction_tokens"] = _f(out["fraction_tokens"])
    lo_thr, hi_thr = m.mean - col.sigma * m.std, m.mean + col.sigma * m.std
    out["threshold_low"], out["threshold_high"] = _f(lo_thr), _f(hi_thr)
    return {
        "layer": layer,
        "name": name,
        "role": role,
        "description": ROLE_LABELS[role],
        **{k: _f(v) if isinstance(v, float) else v for k, v in m.to_dict().items()},
        "token_ranges": trs,
        "dim_ranges": {
            "median": _f(float(ranges.median())),
            "max": _f(float(ranges.max())),
            "argmax_dim": int(torch.argmax(ranges)),
            "ratio_max_median": _f(range_ratio(ranges)),
            "top": [
                {"dim": j, "range": _f(ranges[j]), "min": _f(dr.lo[j]), "max": _f(dr.hi[j])} for j in order
            ],
            # the full per-dim record only where PEG's range-based permutation uses it
            **({"values": [_f(v, 5) for v in ranges.tolist()]} if role in SUMMARY_ROLES else {}),
        },
        "outliers": out,
    }


def build_stats(
    col: Collected,
    *,
    layer: int | None = None,
    head: int | None = None,
    max_length: int = 128,
    sentences_preview: list | None = None,
) -> dict:
    info = col.info
    L, H = info["num_layers"], info["num_heads"]
    order = [n for roles in col.roles for n in roles.values() if n in col.moments]
    tensors = {name: tensor_entry(col, name) for name in dict.fromkeys(order)}

    def t(i: int, role: str) -> dict:
        return tensors[col.name(i, role)]

    # ------------------------------------------------------------------ per layer
    special = np.stack([(col.special_sum[i] / max(col.query_count, 1)).numpy() for i in range(L)])
    separator = np.stack([(col.sep_sum[i] / max(col.query_count, 1)).numpy() for i in range(L)])
    if H is None:
        H = special.shape[1]
    layers = []
    for i in range(L):
        rs, fi, fo = t(i, "ffn_residual_sum"), t(i, "ffn_input"), t(i, "ffn_output")
        layers.append(
            {
                "layer": i,
                "ffn_input_range": fi["range"],
                "ffn_output_range": fo["range"],
                "ffn_residual_sum_range": rs["range"],
                "ffn_residual_sum_min": rs["min"],
                "ffn_residual_sum_max": rs["max"],
                "range_ratio": rs["dim_ranges"]["ratio_max_median"],
                "ffn_input_range_ratio": fi["dim_ranges"]["ratio_max_median"],
                "ffn_output_range_ratio": fo["dim_ranges"]["ratio_max_median"],
                "kurtosis": rs["kurtosis"],
                "ffn_input_kurtosis": fi["kurtosis"],
                "ffn_output_kurtosis": fo["kurtosis"],
                "outlier_dims": [d["dim"] for d in significant_dims(rs)],
                "ffn_input_outlier_dims": [d["dim"] for d in significant_dims(fi)],
                "ffn_output_outlier_dims": [d["dim"] for d in significant_dims(fo)],
                "special_share_mean": _f(float(special[i].mean())),
                "special_share_max": _f(float(special[i].max())),
                "separator_share_mean": _f(float(separator[i].mean())),
            }
        )

    # ------------------------------------------------------------------ figure choices
    worst_range = max(layers, key=lambda r: r["ffn_residual_sum_range"] or 0.0)["layer"]
    fig_layer = worst_range if layer is None else _check_index(layer, L, "layer")
    if layer is not None:
        attn_layer = fig_layer
    elif head is not None:
        attn_layer = int(np.argmax(special[:, _check_index(head, H, "head")]))
    else:
        attn_layer = int(np.unravel_index(np.argmax(special), special.shape)[0])
    attn_head = _check_index(head, H, "head") if head is not None else int(np.argmax(special[attn_layer]))

    # ------------------------------------------------------------------ attention
    flat = [(float(special[i, h]), i, h) for i in range(L) for h in range(H)]
    flat.sort(reverse=True)
    attention = {
        "special_tokens": col.special_tokens,
        "separator_tokens": col.separator_tokens,
        "special_tokens_seen": dict(col.special_token_counts.most_common()),
        "num_query_tokens": col.query_count,
        "special_share": [[_f(v, 4) for v in row] for row in special.tolist()],
        "separator_share": [[_f(v, 4) for v in row] for row in separator.tolist()],
        "mean_special_share": _f(float(special.mean())),
        "mean_separator_share": _f(float(separator.mean())),
        "per_layer_mean_special_share": [_f(float(v)) for v in special.mean(axis=1)],
        "heads_over_half_on_special": int((special > 0.5).sum()),
        "top_heads": [
            {"layer": i, "head": h, "special_share": _f(v), "separator_share": _f(float(separator[i, h]))}
            for v, i, h in flat[:5]
        ],
    }

    # ------------------------------------------------------------------ query-key (Fig. 4b)
    qk = qk_analysis(col, attn_layer, attn_head, H)

    # ------------------------------------------------------------------ summary
    summary = build_summary(col, tensors, layers, attention, qk)
    return {
        "model": info,
        "settings": {
            "num_sequences": col.num_sequences,
            "max_length": max_length,
            "sigma": col.sigma,
            "figure_layer": fig_layer,
            "attention_layer": attn_layer,
            "attention_head": attn_head,
            "first_sequence_tokens": col.first_tokens,
            "sequences_preview": sentences_preview or [],
        },
        "num_tokens": col.num_tokens,
        "summary": summary,
        "layers": layers,
        "attention": attention,
        "qk": qk,
        "tensors": tensors,
    }


def _check_index(v: int, n: int, what: str) -> int:
    v = int(v)
    if not 0 <= v < n:
        raise ValueError(f"{what} {v} is out of range: the model has {n} {what}s (0..{n - 1})")
    return v


def qk_analysis(col: Collected, layer: int, head: int, num_heads: int) -> dict:
    q = head_slice(col.first_q[layer], head, num_heads)
    k = head_slice(col.first_k[layer], head, num_heads)
    top = top_qk_pair(q, k)
    i, j = top["query"], top["key"]
    contrib = top["contributions"]
    order = torch.argsort(contrib.abs(), descending=True)[:5].tolist()
    total = float(contrib.sum())
    probs = col.first_probs[layer][head]
    col_mass = probs.mean(dim=0)  # mean attention each key receives
    return {
        "layer": layer,
        "head": head,
        "head_dim": int(q.shape[-1]),
        "query": i,
        "key": j,
        "query_token": col.first_tokens[i],
        "key_token": col.first_tokens[j],
        "score": _f(total),
        "scaled_score": _f(total / math.sqrt(q.shape[-1])),
        "top_dims": [
            {
                "dim": m,
                "contribution": _f(float(contrib[m])),
                "share_of_score": _f(float(contrib[m]) / total) if total else None,
            }
            for m in order
        ],
        "most_attended_key": int(torch.argmax(col_mass)),
        "most_attended_key_token": col.first_tokens[int(torch.argmax(col_mass))],
        "most_attended_key_mass": _f(float(col_mass.max())),
    }


def build_summary(col: Collected, tensors: dict, layers: list[dict], attention: dict, qk: dict) -> dict:
    L = len(layers)
    by_range = sorted(layers, key=lambda r: -(r["ffn_residual_sum_range"] or 0.0))
    by_ratio = sorted(layers, key=lambda r: -(r["range_ratio"] or 0.0))

    # outlier dims across layers of FFN input / output / residual sum
    dims: dict[int, dict] = {}
    for entry in tensors.values():
        if entry["role"] not in SUMMARY_ROLES:
            continue
        for d in significant_dims(entry):
            j = d["dim"]
            rec = dims.setdefault(
                j,
                {
                    "dim": j,
                    "layers": set(),
                    "tensors": set(),
                    "max_abs_value": 0.0,
                    "value": 0.0,
                    "max_fraction": 0.0,
                    "tokens": {r: Counter() for r in SUMMARY_ROLES},
                },
            )
            rec["layers"].add(entry["layer"])
            rec["tensors"].add(entry["role"])
            for v in (d["min"], d["max"]):
                if v is not None and abs(v) > rec["max_abs_value"]:
                    rec["max_abs_value"], rec["value"] = abs(v), v
                    rec["value_layer"], rec["value_tensor"] = entry["layer"], entry["role"]
            rec["max_fraction"] = max(rec["max_fraction"], d["fraction"] or 0.0)
            rec["tokens"][entry["role"]].update(d["tokens"])
    outlier_dims = sorted(dims.values(), key=lambda r: -r["max_abs_value"])
    for rec in outlier_dims:
        rec["layers"] = sorted(rec["layers"])
        rec["tensors"] = [r for r in SUMMARY_ROLES if r in rec["tensors"]]
        rec["max_abs_value"], rec["value"] = _f(rec["max_abs_value"]), _f(rec["value"])
        rec["max_fraction"] = _f(rec["max_fraction"])
        # the tokens that carry the dim's outliers: in the residual sum if it has any there, else in the
        # FFN output, else in the FFN input (counts summed over layers, top tokens per layer)
        src = next((r for r in ("ffn_residual_sum", "ffn_output", "ffn_input") if rec["tokens"][r]), None)
        rec["tokens_in"] = src
        rec["tokens"] = dict(rec["tokens"][src].most_common(5)) if src else {}

    # tokens carrying residual-sum outliers, over all layers
    tok_any: Counter = Counter()
    for entry in tensors.values():
        if entry["role"] == "ffn_residual_sum":
            tok_any.update(entry["outliers"]["token_counts"])
    special_set = set(attention["special_tokens"])
    top_tokens = dict(tok_any.most_common(8))
    total_tok = sum(tok_any.values())
    special_tok_share = (
        sum(c for s, c in tok_any.items() if s in special_set) / total_tok if total_tok else 0.0
    )

    # ------------------------------------------------------------------ recommendations
    max_range = max(r["ffn_residual_sum_range"] or 0.0 for r in layers)
    max_ratio = max(r["range_ratio"] or 0.0 for r in layers)
    flagged = [
        r["layer"]
        for r in layers
        if (r["ffn_residual_sum_range"] or 0) >= FLAG_SHARE * max_range
        or (r["range_ratio"] or 0) >= FLAG_SHARE * max_ratio
    ]

    def names(role: str, layers_: list[int]) -> list[str]:
        if len(layers_) == L and L > 1:
            return [_layer_glob(col.name(0, role))]
        return [col.name(i, role) for i in layers_]

    sum_overrides = [f"{n}=a16" for n in names("ffn_residual_sum", flagged)]
    io_overrides = [f"{n}=a16" for role in ("ffn_input", "ffn_output") for n in names(role, flagged)]

    per_layer_k = []
    for r in layers:
        i = r["layer"]
        outs = set(r["outlier_dims"]) | set(r["ffn_input_outlier_dims"]) | set(r["ffn_output_outlier_dims"])
        rng = tensors[col.name(i, "ffn_residual_sum")]["dim_ranges"]["values"]
        sug = suggest_peg_groups([v or 0.0 for v in rng], outs)
        per_layer_k.append(
            {"layer": i, "K": sug["K"], "outlier_dims": sug["outlier_dims"], "table": sug["table"]}
        )
    K = max((p["K"] for p in per_layer_k), default=6)
    d = len(tensors[col.name(0, "ffn_residual_sum")]["dim_ranges"]["values"])
    peg_overrides = [f"{_layer_glob(col.name(0, role))}=peg{K}p" for role in PEG_ROLES]

    def cli(overrides: list[str], preset: str) -> str:
        return f"--preset {preset} " + " ".join(f'--override "{o}"' for o in overrides)

    recommendations = {
        "mp_ptq": {
            "layers": flagged,
            "overrides": sum_overrides,
            "overrides_ffn_io": io_overrides,
            "cli": cli(sum_overrides, "w8a8"),
            "cli_with_ffn_io": cli(sum_overrides + io_overrides, "w8a8"),
            "why": "the residual sum after the FFN carries the outliers (paper Table 2); 16 bits give "
            "room for both the FFN input's fine grid and the FFN output's outliers (paper Table 4)",
        },
        "peg": {
            "preset": "peg-ptq",
            "K": K,
            "group_size": d // K if d else None,
            "permutation": True,
            "overrides": peg_overrides,
            "cli": cli(peg_overrides, "peg-ptq"),
            "per_layer": per_layer_k,
            "why": f"with the range-based permutation every layer's outlier dims fit into one group of "
            f"{d // K if d else '?'} dims; the paper uses K = 6 with permutation on FFN input, "
            "output and sum",
        },
    }
    return {
        "worst_layers_by_range": [
            {
                "layer": r["layer"],
                "range": r["ffn_residual_sum_range"],
                "min": r["ffn_residual_sum_min"],
                "max": r["ffn_residual_sum_max"],
            }
            for r in by_range[:3]
        ],
        "worst_layers_by_ratio": [{"layer": r["layer"], "ratio": r["range_ratio"]} for r in by_ratio[:3]],
        "outlier_dims": outlier_dims[:12],
        "tokens": top_tokens,
        "special_token_share_of_outlier_tokens": _f(special_tok_share),
        "attention": {
            "mean_special_share": attention["mean_special_share"],
            "mean_separator_share": attention["mean_separator_share"],
            "heads_over_half_on_special": attention["heads_over_half_on_special"],
            "num_heads_total": L * len(attention["special_share"][0]) if attention["special_share"] else 0,
            "top_heads": attention["top_heads"][:3],
        },
        "qk": {k: qk[k] for k in ("layer", "head", "query_token", "key_token", "score", "top_dims")},
        "recommendations": recommendations,
    }


def _layer_glob(name: str) -> str:
    """``encoder.layer.0.ffn.output`` -> ``encoder.layer.*.ffn.output``."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "encoder" and parts[1] == "layer" and parts[2].isdigit():
        parts[2] = "*"
    return ".".join(parts)


def jsonable(obj: Any) -> Any:
    """Recursively convert tensors/arrays/sets to plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if torch.is_tensor(obj) or isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return _f(float(obj), 8)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
