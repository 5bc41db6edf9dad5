"""Run the FP32 model over the analysis sequences and accumulate the statistics incrementally.

Two passes over the sequences, batch by batch (nothing grows with the number of sequences except one
float per token and tensor for the per-token-range summaries):

1. moments (min/max/mean/std/kurtosis), per-dim min/max, per-token ranges, per-sequence box
   statistics of the first ten sequences, attention mass on special tokens per head, and the first
   sequence's attention probabilities and Q/K projections (for the attention figures);
2. with every tensor's mean and std from pass 1: the 6-sigma outliers per embedding dim, the tokens
   that carry them, and the outlier maps of the first ten sequences (Fig. 2b / 5-7).
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .stats import (
    DEFAULT_SIGMA,
    DimRanges,
    Moments,
    OutlierCounts,
    attention_mass_on,
    box_stats,
    special_token_mask,
)

#: activation quantizer points recorded per layer (suffix of ``encoder.layer.{i}.``) -> role; the FFN
#: input / output / residual sum come from ``qm.ffn_names(i)`` where the model provides it (MobileBERT's
#: FFN input is the last stacked FFN's LayerNorm, not ``attn.layernorm``)
POINTS: dict[str, str] = {
    "attn.query": "query",
    "attn.key": "key",
    "attn.probs": "probs",
    "attn.residual_sum": "attn_residual_sum",
    "attn.layernorm": "ffn_input",
    "ffn.output": "ffn_output",
    "ffn.residual_sum": "ffn_residual_sum",
    "ffn.layernorm": "ffn_layernorm",
}
#: roles in report order
ROLES = (
    "query",
    "key",
    "probs",
    "attn_residual_sum",
    "ffn_input",
    "ffn_output",
    "ffn_residual_sum",
    "ffn_layernorm",
)
#: roles without which the analysis cannot run
REQUIRED_ROLES = ("query", "key", "probs", "ffn_input", "ffn_output", "ffn_residual_sum")
#: human-readable names of the roles
ROLE_LABELS: dict[str, str] = {
    "query": "query projection Q",
    "key": "key projection K",
    "probs": "softmax output (attention probabilities)",
    "attn_residual_sum": "residual sum after attention",
    "ffn_input": "FFN input",
    "ffn_output": "FFN output",
    "ffn_residual_sum": "residual sum after the FFN",
    "ffn_layernorm": "FFN LayerNorm output (layer output)",
}
#: [B, T, d] roles that get ranges and 6-sigma outlier statistics
HIDDEN_ROLES = (
    "query",
    "key",
    "attn_residual_sum",
    "ffn_input",
    "ffn_output",
    "ffn_residual_sum",
    "ffn_layernorm",
)
#: roles whose first sequences are kept for the figures (maps and box plots)
FIGURE_ROLES = ("ffn_input", "ffn_output")


def point_name(layer: int, point: str) -> str:
    return f"encoder.layer.{layer}.{point}"


def layer_roles(qm: Any, i: int) -> dict[str, str]:
    """``role -> activation quantizer name`` for layer ``i`` of a wrapped model (only names it has)."""
    roles = {role: point_name(i, point) for point, role in POINTS.items()}
    ffn = getattr(qm, "ffn_names", None)
    if callable(ffn):
        try:
            names = ffn(i)
        except (KeyError, AttributeError):
            names = {}
        for key, role in (
            ("input", "ffn_input"),
            ("output", "ffn_output"),
            ("residual_sum", "ffn_residual_sum"),
        ):
            if names.get(key):
                roles[role] = names[key]
    acts = getattr(qm, "activation_quantizers", None)
    if callable(acts):
        have = set(acts())
        missing = [r for r in REQUIRED_ROLES if roles[r] not in have]
        if missing:
            raise ValueError(
                f"layer {i} of this {getattr(qm, 'family', 'model')} has no activation point for "
                + ", ".join(f"{r} ({roles[r]})" for r in missing)
            )
        roles = {r: n for r, n in roles.items() if n in have}
    return {r: roles[r] for r in ROLES if r in roles}


# --------------------------------------------------------------------------- model / input plumbing
def hf_config(qm: Any) -> Any:
    for obj in (qm, getattr(qm, "model", None), getattr(qm, "hf_model", None), getattr(qm, "module", None)):
        cfg = getattr(obj, "config", None) if obj is not None else None
        if cfg is not None and hasattr(cfg, "num_attention_heads"):
            return cfg
    return None


def model_info(qm: Any) -> dict:
    cfg = hf_config(qm)
    num_layers = getattr(qm, "num_layers", None) or getattr(cfg, "num_hidden_layers", None)
    hidden = getattr(qm, "hidden_size", None) or getattr(cfg, "hidden_size", None)
    heads = getattr(qm, "num_heads", None) or getattr(cfg, "num_attention_heads", None)
    family = getattr(qm, "family", None) or getattr(cfg, "model_type", None) or type(qm).__name__
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or ""
    return {
        "family": str(getattr(family, "name", family)),
        "name": str(name),
        "num_layers": int(num_layers) if num_layers is not None else None,
        "hidden_size": int(hidden) if hidden is not None else None,
        "num_heads": int(heads) if heads is not None else None,
        "type_vocab_size": getattr(cfg, "type_vocab_size", None),
    }


def resolve_model(model_dir_or_qm: Any, tokenizer: Any) -> tuple[Any, Any]:
    """Return ``(qm, tokenizer)`` for a folder, a Hugging Face model or an already wrapped model."""
    obj = model_dir_or_qm
    if isinstance(obj, (str, Path)):
        from pegq.models import load_model  # noqa: PLC0415 (optional at import time)

        loaded = load_model(str(obj), for_classification=False)
        if isinstance(loaded, tuple):
            model, tok = loaded[0], (loaded[1] if len(loaded) > 1 else None)
        else:
            model, tok = loaded, None
        tokenizer = tokenizer or tok
        if tokenizer is None:
            from transformers import AutoTokenizer  # noqa: PLC0415

            tokenizer = AutoTokenizer.from_pretrained(str(obj))
        obj = model
    if not hasattr(obj, "capture"):
        from pegq.models import wrap  # noqa: PLC0415

        obj = wrap(obj)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed when the model is not given as a folder")
    return obj, tokenizer


def accepted_inputs(qm: Any) -> set[str] | None:
    """Input names the underlying model's ``forward`` takes explicitly (None = cannot tell).

    DistilBERT and MPNet take no ``token_type_ids``; passing them would fail or leak into ``**kwargs``.
    """
    model = getattr(qm, "model", None) or qm
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return None
    names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names if "input_ids" in names else None


def _device_of(qm: Any) -> torch.device:
    try:
        return next(iter(qm.parameters())).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def iter_batches(
    tokenizer: Any,
    sentences: Sequence[str | tuple[str, str]],
    batch_size: int,
    max_length: int,
    type_vocab_size: int | None = None,
    accepted: set[str] | None = None,
) -> Iterator[tuple[dict, list[list[str]]]]:
    """Tokenised batches (padded to the longest sequence) and their token strings by position
    (``''`` at padding)."""
    for start in range(0, len(sentences), batch_size):
        encs = []
        for s in sentences[start : start + batch_size]:
            if isinstance(s, (tuple, list)):
                if len(s) != 2:
                    raise ValueError(f"a sentence pair must have two texts, got {len(s)}: {s!r}")
                e = tokenizer(str(s[0]), str(s[1]), truncation=True, max_length=max_length)
            else:
                e = tokenizer(str(s), truncation=True, max_length=max_length)
            encs.append(
                {k: v for k, v in e.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            )
        enc = tokenizer.pad(encs, padding=True, return_tensors="pt")
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        if "token_type_ids" in batch and (
            (type_vocab_size is not None and type_vocab_size <= 1)
            or (accepted is not None and "token_type_ids" not in accepted)
        ):
            del batch["token_type_ids"]
        strings = [
            [t if keep else "" for t, keep in zip(tokenizer.convert_ids_to_tokens(ids), m, strict=True)]
            for ids, m in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True)
        ]
        yield batch, strings


def _tensor(store: dict, name: str) -> torch.Tensor:
    if name not in store:
        raise KeyError(
            f"the model recorded no tensor for {name!r}; recorded: {sorted(store)[:8]}..."
            " (is this quantizer point supported by the model's adapter?)"
        )
    v = store[name]
    if isinstance(v, (list, tuple)):
        v = v[0] if len(v) == 1 else torch.cat(list(v), dim=0)
    return v.detach().float().cpu()


# --------------------------------------------------------------------------- accumulated results
@dataclass
class Collected:
    info: dict
    num_sequences: int
    roles: list[dict[str, str]] = field(default_factory=list)  # per layer: role -> tensor name
    num_tokens: int = 0
    sigma: float = DEFAULT_SIGMA
    moments: dict[str, Moments] = field(default_factory=dict)
    dims: dict[str, DimRanges] = field(default_factory=dict)
    tok_ranges: dict[str, list[np.ndarray]] = field(default_factory=dict)  # name -> per-batch arrays
    tok_range_strings: list[str] = field(default_factory=list)  # token string per recorded range
    boxes: dict[str, list[dict]] = field(default_factory=dict)  # name -> box stats per first sequences
    outliers: dict[str, OutlierCounts] = field(default_factory=dict)
    maps: dict[str, list[np.ndarray]] = field(default_factory=dict)  # name -> bool [T_s, d] per seq
    map_lengths: list[int] = field(default_factory=list)
    special_sum: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H]
    sep_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    query_count: int = 0
    special_tokens: list[str] = field(default_factory=list)
    separator_tokens: list[str] = field(default_factory=list)
    special_token_counts: Counter = field(default_factory=Counter)
    first_tokens: list[str] = field(default_factory=list)
    first_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H, T, T]
    first_q: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [T, d]
    first_k: dict[int, torch.Tensor] = field(default_factory=dict)
    first_tok_ranges: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [T]

    def name(self, layer: int, role: str) -> str:
        return self.roles[layer][role]

    def role_of(self, name: str) -> tuple[int, str]:
        for i, roles in enumerate(self.roles):
            for role, n in roles.items():
                if n == name:
                    return i, role
        raise KeyError(name)

    def token_range_array(self, name: str) -> np.ndarray:
        parts = self.tok_ranges.get(name, [])
        return np.concatenate(parts) if parts else np.zeros(0)


def special_and_separator_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Special ids except padding (padding is masked anyway) and the separator ids ([SEP], </s>)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    special = sorted({int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i != pad})
    sep = sorted(
        {
            int(i)
            for i in (getattr(tokenizer, "sep_token_id", None), getattr(tokenizer, "eos_token_id", None))
            if i is not None and i != pad
        }
    )
    return special, sep


@contextlib.contextmanager
def fp32_inference(qm: Any) -> Iterator[None]:
    """Eval mode and every quantizer of a wrapped model passed through (its settings and ranges kept),
    restored afterwards: the analysis is about the FP32 model."""
    quantizers = getattr(qm, "quantizers", None)
    quantizers = dict(quantizers) if isinstance(quantizers, dict) else {}
    saved_bits = {n: q.bits for n, q in quantizers.items()}
    was_training = getattr(qm, "training", False)
    try:
        for q in quantizers.values():
            q.bits = None
        if hasattr(qm, "eval"):
            qm.eval()
        yield
    finally:
        for n, q in quantizers.items():
            q.bits = saved_bits[n]
        if was_training and hasattr(qm, "train"):
            qm.train()


def collect(
    qm: Any,
    tokenizer: Any,
    sentences: Sequence[str | tuple[str, str]],
    *,
    batch_size: int = 8,
    max_length: int = 128,
    sigma: float = DEFAULT_SIGMA,
    keep_sequences: int = 10,
    progress: bool = False,
) -> Collected:
    """Both passes over ``sentences`` with the FP32 model (see the module docstring)."""
    with fp32_inference(qm):
        return _collect(
            qm,
            tokenizer,
            sentences,
            batch_size=batch_size,
            max_length=max_length,
            sigma=sigma,
            keep_sequences=keep_sequences,
            progress=progress,
        )


def _collect(
    qm: Any,
    tokenizer: Any,
    sentences: Sequence[str | tuple[str, str]],
    *,
    batch_size: int = 8,
    max_length: int = 128,
    sigma: float = DEFAULT_SIGMA,
    keep_sequences: int = 10,
    progress: bool = False,
) -> Collected:
    info = model_info(qm)
    L = info["num_layers"]
    if not L:
        raise ValueError("cannot tell how many encoder layers the model has (qm.num_layers)")
    col = Collected(info=info, num_sequences=len(sentences), sigma=sigma)
    special_ids, sep_ids = special_and_separator_ids(tokenizer)
    col.special_tokens = tokenizer.convert_ids_to_tokens(special_ids) if special_ids else []
    col.separator_tokens = tokenizer.convert_ids_to_tokens(sep_ids) if sep_ids else []
    device = _device_of(qm)
    col.roles = [layer_roles(qm, i) for i in range(L)]
    hidden = [r[role] for r in col.roles for role in HIDDEN_ROLES if role in r]
    hidden = list(dict.fromkeys(hidden))  # a tensor can serve two roles; record it once
    figure_names = {r[role] for r in col.roles for role in FIGURE_ROLES}
    probs_names = [r["probs"] for r in col.roles]
    tvs = info.get("type_vocab_size")
    accepted = accepted_inputs(qm)

    def forward(batch: dict, names: list[str]) -> dict:
        b = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad(), qm.capture(names) as store:
            qm(**b)
        return {n: _tensor(store, n) for n in names}

    def batches(desc: str):
        it = iter_batches(tokenizer, sentences, batch_size, max_length, tvs, accepted)
        if progress:
            from tqdm.auto import tqdm  # noqa: PLC0415

            it = tqdm(it, total=-(-len(sentences) // batch_size), desc=desc, leave=False)
        return it

    # ---------------------------------------------------------------- pass 1
    seq_index = 0
    for batch, strings in batches("analysis pass 1/2"):
        mask = batch["attention_mask"].bool()
        B = mask.shape[0]
        out = forward(batch, hidden + probs_names)
        col.num_tokens += int(mask.sum())
        col.tok_range_strings.extend(
            s
            for row, m in zip(strings, mask.tolist(), strict=True)
            for s, keep in zip(row, m, strict=True)
            if keep
        )
        ids = batch["input_ids"]
        for s in tokenizer.convert_ids_to_tokens(ids[mask & special_token_mask(ids, special_ids)].tolist()):
            col.special_token_counts[s] += 1
        lengths = mask.sum(dim=1).tolist()
        starts = np.cumsum([0, *lengths])
        for name in hidden:
            v = out[name][mask]  # [N, d]: the real tokens of the batch, row-major
            col.moments.setdefault(name, Moments()).update(v)
            col.dims.setdefault(name, DimRanges()).update(v)
            tr = (v.amax(dim=-1) - v.amin(dim=-1)).numpy().astype(np.float32)
            col.tok_ranges.setdefault(name, []).append(tr)
            if seq_index == 0:
                col.first_tok_ranges[name] = tr[: lengths[0]]
            if name in figure_names:
                for b in range(min(B, keep_sequences - seq_index)):
                    rows = v[starts[b] : starts[b + 1]]
                    col.boxes.setdefault(name, []).append(box_stats(rows, label=str(seq_index + b + 1)))
        key_special = special_token_mask(ids, special_ids)
        key_sep = special_token_mask(ids, sep_ids)
        for i in range(L):
            p = out[col.roles[i]["probs"]]
            s_sum, n_q = attention_mass_on(p, key_special, mask)
            sep_sum, _ = attention_mass_on(p, key_sep, mask)
            col.special_sum[i] = col.special_sum.get(i, 0) + s_sum
            col.sep_sum[i] = col.sep_sum.get(i, 0) + sep_sum
            if seq_index == 0:
                T0 = int(mask[0].sum())
                idx = mask[0].nonzero().flatten()
                col.first_probs[i] = p[0][:, idx][:, :, idx].clone()
                col.first_q[i] = out[col.roles[i]["query"]][0][idx].clone()
                col.first_k[i] = out[col.roles[i]["key"]][0][idx].clone()
                assert col.first_probs[i].shape[-1] == T0
        col.query_count += n_q
        if seq_index == 0:
            col.first_tokens = [s for s, keep in zip(strings[0], mask[0].tolist(), strict=True) if keep]
        seq_index += B
        del out

    # ---------------------------------------------------------------- pass 2 (needs mean/std)
    seq_index = 0
    for batch, strings in batches("analysis pass 2/2"):
        mask = batch["attention_mask"].bool()
        B = mask.shape[0]
        out = forward(batch, hidden)
        for name in hidden:
            m = col.moments[name]
            oc = col.outliers.setdefault(name, OutlierCounts(d=out[name].shape[-1]))
            om = oc.update(out[name], m.mean, m.std, mask, strings, sigma)
            if name in figure_names:
                for b in range(B):
                    if seq_index + b < keep_sequences:
                        col.maps.setdefault(name, []).append(om[b][mask[b]].numpy())
        for b in range(B):
            if seq_index + b < keep_sequences:
                col.map_lengths.append(int(mask[b].sum()))
        seq_index += B
        del out
    return col
