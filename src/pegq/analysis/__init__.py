"""Outlier analysis of FP32 transformer activations (Bondarenko et al. 2021, section 3, appendices A, D).

Why per-tensor 8-bit quantization of a BERT-like encoder fails: the residual sum after the FFN has a
dynamic range far wider than the FFN input, because a few designated embedding dims carry structured
outliers on a few tokens (often [CLS], [SEP], '.'), and these outliers help attention heads put most
of their probability mass on special tokens. This module measures all of that on a model and a few
sentences, draws the paper's figures, and says which of the paper's fixes to try.

Usage::

    from pegq.analysis import run_analysis

    stats = run_analysis("path/to/model", None, sentences, "runs/analysis", num_sequences=64)
    # or: run_analysis(pegq.models.wrap(hf_model), tokenizer, sentences, "out")

Signature::

    run_analysis(model_dir_or_qm, tokenizer=None, sentences=(), output_dir="analysis",
                 num_sequences=64, layer=None, head=None, max_length=128, *, batch_size=8,
                 sigma=6.0, keep_sequences=10, overwrite=True, console=True, progress=False) -> dict

``model_dir_or_qm`` is a model folder (loaded with :func:`pegq.models.load_model`; the tokenizer comes
with it), a Hugging Face model (wrapped with :func:`pegq.models.wrap`) or a wrapped
:class:`~pegq.models.QuantizedModel`; a wrapped model's quantizers are passed through during the
analysis and restored afterwards (settings and ranges kept), as is its train/eval mode.
``sentences`` are strings or ``(text_a, text_b)`` pairs; the first ``num_sequences`` are run through
the FP32 model in batches of ``batch_size``, truncated to ``max_length`` tokens. ``layer`` picks the
layer of the per-token-range figure (default: the largest residual-sum range) and of the attention
figures (default: the layer and head with the most attention on special tokens); ``head`` the head.
The return value is the ``stats.json`` document plus ``files`` (the paths written); a rich table of
the per-layer numbers and the suggested overrides is printed unless ``console=False``.
Padding never enters a statistic. Two passes: the first collects moments, ranges and attention
statistics; the second counts the 6-sigma outliers against the tensor mean and std from the first.
Memory stays bounded: only running aggregates are kept, plus the first ten sequences' FFN input and
output (for the figures) and the first sequence's attention probabilities and Q/K projections.

Recorded per encoder layer ``i`` (names as the activation quantizers, ``encoder.layer.{i}.``):
``attn.query`` / ``attn.key`` (Q/K projections), ``attn.probs`` (softmax output),
``attn.residual_sum``, ``attn.layernorm`` (= FFN input), ``ffn.output``, ``ffn.residual_sum``
(the paper's problem tensor), ``ffn.layernorm``.

Outputs in ``output_dir``:

``stats.json`` (written atomically)
    ``summary`` (worst layers, outlier dims, tokens, attention, recommendations), ``layers`` (one row
    per layer), ``attention`` (layers x heads share of attention on special tokens and on separators
    only, averaged over real query tokens), ``qk`` (top query/key pair of the chosen head), and
    ``tensors``: per tensor ``min``/``max``/``range``/``mean``/``std``/``kurtosis`` (Fisher),
    ``token_ranges`` (summary of per-token max - min over the embedding dim), ``dim_ranges`` (per-dim
    ranges, their max / median ratio, top dims) and ``outliers`` (dims whose values lie beyond
    ``sigma`` = 6 standard deviations from the tensor mean: per dim how many tokens and which token
    strings, and how many tokens carry any outlier).
PNG figures
    ``layer_ranges.png`` (ranges per layer), ``token_ranges_layer{L}.png`` (Fig. 2a),
    ``outliers_layer{i}.png`` for every layer (Fig. 2b, 5-7), ``ffn_input_distributions.png`` and
    ``ffn_output_distributions.png`` (Fig. 8-12), ``attention_special_share.png`` (layers x heads),
    ``attention_layer{l}_head{h}.png`` (Fig. 4a), ``qk_layer{l}_head{h}.png`` (Fig. 4b).
``summary.md``
    The summary in Markdown.
``report.html``
    One self-contained page (images embedded as data URIs): the summary first, then every figure
    with its caption.

The summary's "what to try" gives the MP-PTQ overrides (the residual sum after the FFN at 16 bits in
the worst layers, e.g. ``--override "encoder.layer.4.ffn.residual_sum=a16"``, then FFN input and
output) and the PEG-PTQ setting (preset ``peg-ptq``; the smallest K >= 3 dividing d for which every
layer's outlier dims fit into one group after range-based permutation).

The statistics are pure functions in :mod:`pegq.analysis.stats` (``kurtosis``, ``Moments``,
``token_ranges``, ``dim_ranges``, ``outlier_mask``, ``outlier_dims``, ``OutlierCounts``,
``attention_share``, ``top_qk_pair``, ``suggest_peg_groups``), the figures plain functions of arrays
in :mod:`pegq.analysis.figures`.
"""

from .clipping import clipping_report, clipping_table
from .run import make_figures, run_analysis
from .stats import (
    DEFAULT_SIGMA,
    DimRanges,
    Moments,
    OutlierCounts,
    attention_mass_on,
    attention_share,
    dim_ranges,
    head_slice,
    kurtosis,
    outlier_dims,
    outlier_mask,
    special_token_mask,
    suggest_peg_groups,
    token_ranges,
    top_qk_pair,
)

__all__ = [
    "DEFAULT_SIGMA",
    "DimRanges",
    "Moments",
    "OutlierCounts",
    "attention_mass_on",
    "attention_share",
    "clipping_report",
    "clipping_table",
    "dim_ranges",
    "head_slice",
    "kurtosis",
    "make_figures",
    "outlier_dims",
    "outlier_mask",
    "run_analysis",
    "special_token_mask",
    "suggest_peg_groups",
    "token_ranges",
    "top_qk_pair",
]
