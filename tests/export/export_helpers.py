"""Helpers shared by the export tests."""

import torch

import pegq


def ffn_overrides(qm, token: str) -> list[str]:
    """``<name>=<token>`` for the FFN input, output and residual sum of every layer (``ffn_names``)."""
    return [f"{n}={token}" for i in range(qm.num_layers) for n in qm.ffn_names(i).values()]


def peg_tiny(family: str, head: bool = True, k: int = 4, seed: int = 0, extra: list[str] | None = None,
             peg: list[str] | None = None, token: str | None = None):
    """A tiny random model of ``family`` with PEG K=k (permuted; or the override ``token``, e.g. peg2po4)
    on its FFN tensors (``ffn_names``, or the glob patterns ``peg``), calibrated."""
    from models_helpers import pad_id_of, padded_batch, tiny_model

    from pegq.models import wrap

    m = tiny_model(family, head, seed=seed)
    qm = wrap(m)
    token = token or f"peg{k}p"
    pegs = [f"{p}={token}" for p in peg] if peg else ffn_overrides(qm, token)
    qm = pegq.quantize(qm, "w8a8", overrides=pegs + list(extra or []))
    pad = pad_id_of(m)
    pegq.calibrate(qm, [padded_batch(pad, seed=1), padded_batch(pad, seed=2)], progress=False)
    return qm, padded_batch(pad, seed=3)


def main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
