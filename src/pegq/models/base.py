"""The quantized-model wrapper shared by every architecture family.

:class:`QuantizedModel` wraps a Hugging Face encoder *in place*: nothing of transformers' modeling code is
copied where a hook or a wrapper does the job.

* **Weights** -- every ``nn.Linear`` weight and every embedding table gets a :class:`~pegq.quant.Quantizer`
  registered with :func:`torch.nn.utils.parametrize.register_parametrization`, so that reading
  ``module.weight`` yields the fake-quantized weight while gradients still reach the original FP32
  parameter (QAT). Biases and LayerNorm parameters stay FP32.
* **Activations** -- a quantizer sits at every activation of the paper's Figure 1. Most are forward hooks
  (module output) or forward pre-hooks (module input, e.g. the residual sum arriving at a LayerNorm). The
  softmax input/output go through the custom attention function ``"pegq"``
  (:mod:`pegq.models.attention`). The few tensors without a module boundary (e.g. word + token-type
  embeddings) are reached through small adapter forwards installed on the instance (never on the class).

All quantizers start **off** (``bits=None``): a freshly wrapped model computes what the original does.
:meth:`QuantizedModel.unwrap` removes every hook, adapter forward and parametrization and hands back the
plain model with its original FP32 weight tensors.

Where each quantizer sits is documented per family in ``bert.py``, ``roberta.py``, ``mpnet.py``,
``distilbert.py`` and ``mobilebert.py``; names follow ``docs/architecture.md``.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from pegq.quant import Quantizer

ACTIVATION = "activation"
WEIGHT = "weight"
_ESCAPE = "__"


def _escape(name: str) -> str:
    return name.replace(".", _ESCAPE)


# --------------------------------------------------------------------------- hook objects
# Hooks are small callable objects (not closures) so that ``copy.deepcopy`` of a wrapped model re-points
# them at the copy.


class _OutputHook:
    """Forward hook: quantize the module's (tensor) output."""

    def __init__(self, qm: QuantizedModel, name: str):
        self.qm, self.name = qm, name

    def __call__(self, module, args, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"{self.name}: expected a tensor output from {type(module).__name__}")
        return self.qm.act(self.name, output)


class _InputHook:
    """Forward pre-hook: quantize the module's first positional input."""

    def __init__(self, qm: QuantizedModel, name: str):
        self.qm, self.name = qm, name

    def __call__(self, module, args):
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"{self.name}: expected a tensor as first input of {type(module).__name__}")
        return (self.qm.act(self.name, args[0]), *args[1:])


class _AdapterForward:
    """Replacement ``forward`` installed on one module instance: ``fn(module, qm, *args, **kwargs)``."""

    def __init__(self, fn: Callable, module: nn.Module, qm: QuantizedModel):
        self.fn, self.module, self.qm = fn, module, qm

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, self.qm, *args, **kwargs)


class AttentionPoints:
    """Attached to an attention module as ``module._pegq_attn``; used by the ``"pegq"`` attention function
    (and the MPNet adapter) to find the softmax input/output quantizers of that module."""

    def __init__(self, qm: QuantizedModel, scores: str, probs: str):
        self.qm, self.scores_name, self.probs_name = qm, scores, probs

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.qm.act(self.scores_name, x)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.qm.act(self.probs_name, x)

    def active(self) -> bool:
        """True when either quantizer is on or a :meth:`QuantizedModel.capture` wants its input."""
        qm, s, p = self.qm, self.scores_name, self.probs_name
        if qm._qdict[s].enabled or qm._qdict[p].enabled:
            return True
        return any(s in store or p in store for store in qm._captures)

    @property
    def original_implementation(self) -> str | None:
        """The model's attention implementation before wrapping (e.g. ``"sdpa"``)."""
        return self.qm._orig_attn_impl


ATTN_ATTR = "_pegq_attn"


# --------------------------------------------------------------------------- the wrapper


class QuantizedModel(nn.Module):
    """A Hugging Face encoder with a (initially disabled) quantizer at every weight and activation.

    Built by :func:`pegq.models.wrap`; adapters call the ``add_*`` methods in forward order.

    Attributes:
        model: the wrapped HF model (modified in place until :meth:`unwrap`).
        family: architecture family (``"bert"``, ``"roberta"``, ...).
        num_layers: number of encoder layers (read from the model).
        hidden_size: model width (``config.hidden_size``).
    """

    def __init__(self, model: nn.Module, family: str, num_layers: int, hidden_size: int):
        super().__init__()
        self.model = model
        self.family = family
        self.num_layers = int(num_layers)
        self.hidden_size = int(hidden_size)
        # every quantizer, under its escaped name (ModuleDict keys cannot hold '.'); weight quantizers are
        # also held by their parametrization
        self.quantizer_modules = nn.ModuleDict()
        self._qdict: dict[str, Quantizer] = {}
        self._kinds: dict[str, str] = {}
        self._weight_owner: dict[str, nn.Module] = {}
        self._ffn_names: dict[int, dict[str, str]] = {}
        self._handles: list = []
        # undo actions as plain data (not closures) so that deepcopy re-points them at the copy
        self._undo: list[tuple] = []
        self._captures: list[dict[str, list[torch.Tensor]]] = []
        self._orig_attn_impl: str | None = None
        self._unwrapped = False

    # ------------------------------------------------------------------ building (used by adapters)
    def _new(self, name: str, kind: str) -> Quantizer:
        if name in self._qdict:
            raise ValueError(f"duplicate quantizer name {name!r}")
        if _ESCAPE in name or not name or name.startswith(".") or name.endswith("."):
            raise ValueError(f"bad quantizer name {name!r}")
        q = Quantizer(name, bits=None)
        self.quantizer_modules[_escape(name)] = q
        self._qdict[name] = q
        self._kinds[name] = kind
        return q

    def add_weight(self, name: str, module: nn.Module, attr: str = "weight") -> Quantizer:
        """Quantize ``module.<attr>`` through a parametrization; ``name`` must end with ``.weight``."""
        if not name.endswith(".weight"):
            raise ValueError(f"weight quantizer names end with '.weight', got {name!r}")
        if parametrize.is_parametrized(module, attr):
            raise ValueError(f"{name}: {type(module).__name__}.{attr} is already parametrized")
        q = self._new(name, WEIGHT)
        parametrize.register_parametrization(module, attr, q)
        self._weight_owner[name] = module
        self._undo.append(("parametrization", module, attr))
        return q

    def add_linear(self, name: str, linear: nn.Linear, *, output: bool = True) -> None:
        """A Linear's weight (``name + '.weight'``) and, if ``output``, its output (``name``)."""
        self.add_weight(name + ".weight", linear)
        if output:
            self.add_output(name, linear)

    def add_output(self, name: str, module: nn.Module) -> Quantizer:
        """Quantize ``module``'s output (forward hook)."""
        q = self._new(name, ACTIVATION)
        self._handles.append(module.register_forward_hook(_OutputHook(self, name)))
        return q

    def add_input(self, name: str, module: nn.Module) -> Quantizer:
        """Quantize ``module``'s first input (forward pre-hook), e.g. the residual sum of a LayerNorm."""
        q = self._new(name, ACTIVATION)
        self._handles.append(module.register_forward_pre_hook(_InputHook(self, name)))
        return q

    def add_point(self, name: str) -> Quantizer:
        """An activation quantizer applied explicitly by an adapter forward via :meth:`act`."""
        return self._new(name, ACTIVATION)

    def add_attention(self, prefix: str, attn_module: nn.Module) -> None:
        """``prefix + 'scores'`` / ``prefix + 'probs'``: softmax input/output of ``attn_module``, applied by
        the ``"pegq"`` attention function or a family adapter that reads ``attn_module._pegq_attn``."""
        scores, probs = prefix + "scores", prefix + "probs"
        self.add_point(scores)
        self.add_point(probs)
        object.__setattr__(attn_module, ATTN_ATTR, AttentionPoints(self, scores, probs))
        self._undo.append(("instance_attr", attn_module, ATTN_ATTR))

    def override_forward(self, module: nn.Module, fn: Callable) -> None:
        """Install ``fn(module, qm, *args, **kwargs)`` as ``module.forward`` on this instance only."""
        if "forward" in module.__dict__:
            raise ValueError(f"{type(module).__name__} already has an instance-level forward")
        object.__setattr__(module, "forward", _AdapterForward(fn, module, self))
        self._undo.append(("instance_attr", module, "forward"))

    def use_attention_implementation(self, config, name: str = "pegq") -> None:
        """Route attention through the registered function ``name``; restored on :meth:`unwrap`."""
        from .attention import register_attention  # noqa: F401  (makes sure "pegq" is registered)

        register_attention()
        old = config._attn_implementation
        self._orig_attn_impl = old
        config._attn_implementation = name
        self._undo.append(("attn_implementation", config, old))

    def set_ffn_names(self, i: int, ffn_input: str, ffn_output: str, residual_sum: str) -> None:
        for n in (ffn_input, ffn_output, residual_sum):
            if n not in self._qdict:
                raise ValueError(f"unknown quantizer {n!r}")
        self._ffn_names[i] = {"input": ffn_input, "output": ffn_output, "residual_sum": residual_sum}

    # ------------------------------------------------------------------ running
    def act(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Record ``x`` for active :meth:`capture` contexts, then apply quantizer ``name``."""
        for store in self._captures:
            if name in store:
                store[name].append(x.detach().to(device="cpu", dtype=torch.float32, copy=True))
        return self._qdict[name](x)

    def forward(self, *args, **kwargs):
        """Exactly what the wrapped HF model returns."""
        if self._unwrapped:
            raise RuntimeError("this QuantizedModel was unwrapped; use the returned HF model instead")
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ inspection
    @property
    def quantizers(self) -> dict[str, Quantizer]:
        """``name -> Quantizer`` in forward order (a fresh plain dict)."""
        return dict(self._qdict)

    def kind(self, name: str) -> str:
        """``"weight"`` or ``"activation"``."""
        return self._kinds[name]

    def activation_quantizers(self) -> dict[str, Quantizer]:
        return {n: q for n, q in self._qdict.items() if self._kinds[n] == ACTIVATION}

    def weight_quantizers(self) -> dict[str, Quantizer]:
        return {n: q for n, q in self._qdict.items() if self._kinds[n] == WEIGHT}

    def weight_shape(self, name: str) -> tuple[int, ...]:
        """Shape of the FP32 tensor behind weight quantizer ``name``."""
        module = self._weight_owner[name]
        return tuple(module.parametrizations.weight.original.shape)

    def select(
        self, patterns: str | Iterable[str] | None = None, kind: str | None = None
    ) -> dict[str, Quantizer]:
        """Quantizers whose name matches any glob in ``patterns`` (all if None), optionally of one kind.

        A pattern that matches no quantizer (of that kind) raises ``ValueError``.
        """
        if kind not in (None, WEIGHT, ACTIVATION):
            raise ValueError(f"kind must be 'weight', 'activation' or None, got {kind!r}")
        pool = [n for n in self._qdict if kind is None or self._kinds[n] == kind]
        if patterns is None:
            return {n: self._qdict[n] for n in pool}
        if isinstance(patterns, str):
            patterns = [patterns]
        patterns = list(patterns)
        chosen = set()
        for p in patterns:
            hits = [n for n in pool if fnmatch.fnmatchcase(n, p)]
            if not hits:
                what = f"{kind} quantizer" if kind else "quantizer"
                raise ValueError(
                    f"pattern {p!r} matches no {what} of this {self.family} model; "
                    f"names look like {pool[0]!r} ... {pool[-1]!r} (see `pegq list-quantizers`)"
                )
            chosen.update(hits)
        return {n: self._qdict[n] for n in pool if n in chosen}

    def apply(
        self,
        fn: Callable[[str, Quantizer], Any],
        patterns: str | Iterable[str] | None = None,
        kind: str | None = None,
    ) -> None:
        """Call ``fn(name, quantizer)`` for every selected quantizer (see :meth:`select`)."""
        for n, q in self.select(patterns, kind).items():
            fn(n, q)

    def ffn_names(self, i: int) -> dict[str, str]:
        """Layer ``i``'s FFN tensors: ``{"input": ..attn.layernorm, "output": ..ffn.output,
        "residual_sum": ..ffn.residual_sum}`` (what PEG's shared permutation spans)."""
        if not 0 <= i < self.num_layers:
            raise ValueError(f"layer index {i} out of range; this model has layers 0..{self.num_layers - 1}")
        return dict(self._ffn_names[i])

    @contextlib.contextmanager
    def capture(self, patterns: str | Iterable[str] | None = None) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Record (detached, CPU, float32 copies of) the tensors arriving at the matching activation
        quantizer points on every forward inside the block, whether or not the quantizer is on.

        Yields ``name -> list of tensors`` (one entry per forward call; pre-quantization values).
        ``patterns``: glob(s) over activation quantizer names, all of them if None.
        """
        store: dict[str, list[torch.Tensor]] = {n: [] for n in self.select(patterns, ACTIVATION)}
        self._captures.append(store)
        try:
            yield store
        finally:
            self._captures.remove(store)

    @staticmethod
    def cached_weights():
        """Context manager: compute each fake-quantized weight once for the whole block instead of on
        every forward (``torch.nn.utils.parametrize.cached``). Only for frozen weight quantizers, e.g.
        an evaluation loop; inside it, weight ranges are not re-estimated."""
        return parametrize.cached()

    # ------------------------------------------------------------------ unwrapping
    def unwrap(self) -> nn.Module:
        """Remove every hook, adapter forward and parametrization; return the plain HF model with its
        original FP32 weight tensors (the same ``Parameter`` objects) and its original attention
        implementation. This wrapper is unusable afterwards. Unwrap before ``save_pretrained``."""
        if self._unwrapped:
            raise RuntimeError("already unwrapped")
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for action, obj, arg in reversed(self._undo):
            if action == "parametrization":
                if parametrize.is_parametrized(obj, arg):
                    _own_parametrized_class(obj)
                    parametrize.remove_parametrizations(obj, arg, leave_parametrized=False)
            elif action == "instance_attr":
                obj.__dict__.pop(arg, None)
            elif action == "attn_implementation":
                obj._attn_implementation = arg
        self._undo.clear()
        model = self.model
        self._unwrapped = True
        del self.model
        self._captures.clear()
        return model

    def extra_repr(self) -> str:
        a, w = len(self.activation_quantizers()), len(self.weight_quantizers())
        return (
            f"family={self.family}, layers={self.num_layers}, "
            f"activation_quantizers={a}, weight_quantizers={w}"
        )


def _own_parametrized_class(module: nn.Module) -> None:
    """Give ``module`` a private copy of its parametrized class before removing a parametrization.

    ``remove_parametrizations`` deletes the property from ``module.__class__``; after ``copy.deepcopy`` that
    class is shared by the original and the copy, so unwrapping one would break the other.
    """
    cls = module.__class__
    ns = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, ns)


# --------------------------------------------------------------------------- reporting


def quantizer_spec(q: Quantizer) -> dict:
    """JSON-able settings of a quantizer."""
    if hasattr(q, "spec"):
        return dict(q.spec())
    return {
        "bits": q.bits,
        "symmetric": q.symmetric,
        "granularity": q.granularity.to_dict(),
        "estimator": q.estimator.kind,
    }


def settings_text(q: Quantizer) -> str:
    """Short human form, e.g. ``"8b asym tensor current_minmax"`` or ``"off"``."""
    if not q.enabled:
        return "off"
    g = q.granularity
    g = g.describe() if hasattr(g, "describe") else str(g)
    est = getattr(q.estimator, "kind", q.estimator)
    return f"{q.bits}b {'sym' if q.symmetric else 'asym'} {g} {est}"


def describe_quantizers(qm: QuantizedModel) -> list[dict]:
    """One row per quantizer, in forward order (used by ``pegq list-quantizers``).

    Each row: ``name``, ``kind`` (``"weight"``/``"activation"``), ``shape`` (the weight's shape, None for
    activations, whose shape depends on the input), ``settings`` (short text, ``"off"`` when disabled),
    ``spec`` (the JSON-able settings dict) and ``state`` (``estimating``/``frozen``/``learning``).
    """
    rows = []
    for name, q in qm.quantizers.items():
        kind = qm.kind(name)
        state = getattr(q, "state", None)
        rows.append(
            {
                "name": name,
                "kind": kind,
                "shape": qm.weight_shape(name) if kind == WEIGHT else None,
                "settings": settings_text(q),
                "spec": quantizer_spec(q),
                "state": getattr(state, "value", state),
            }
        )
    return rows


# --------------------------------------------------------------------------- helpers for adapters


def apply_mask(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Apply a 4-D attention mask to (already quantized) scores.

    ``bool`` masks (True = attend, what ``sdpa_mask`` builds) become ``finfo.min`` where False; float masks
    are additive (0 / ``finfo.min`` or -inf, what ``eager_mask`` and user-made 4-D masks hold); integer
    masks are read as 1 = attend.
    """
    if attention_mask is None:
        return scores
    kv = scores.shape[-1]
    if attention_mask.shape[-1] != kv:
        attention_mask = attention_mask[..., :kv]
    if attention_mask.dtype == torch.bool:
        return scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    if attention_mask.is_floating_point():
        return scores + attention_mask.to(scores.dtype)
    return scores.masked_fill(attention_mask == 0, torch.finfo(scores.dtype).min)


def check_encoder_only(config) -> None:
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError(
            f"{config.model_type} configured as a decoder / with cross-attention is not supported; "
            f"pegq quantizes bidirectional encoders"
        )
