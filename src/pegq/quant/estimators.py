"""Range estimators (paper section 2 and appendix B.2).

Each estimator sees the tensor laid out as rows ``[C, N]`` (one row per parameter pair, see
:mod:`pegq.quant.granularity`) and returns the new per-row range ``(x_min, x_max)``, each ``[C]``.

* ``current_minmax``: the range of the current batch only (the last batch wins).
* ``running_minmax``: exponential moving average over batches,
  ``r <- m * r + (1 - m) * r_batch`` (momentum ``m = 0.9``); the first batch initialises ``r``.
  (The paper's public code overwrote the history each step; we follow the formula.)
* ``mse``: per batch, the clipping range minimising ``||x - q(x)||^2``, searched over a grid of
  shrink factors of the batch min-max range, vectorised over rows; over several batches the
  per-batch optima are averaged (running mean).
"""

from __future__ import annotations

import torch

from .functional import fake_quant, grid, qparams_from_range

ESTIMATORS = ("current_minmax", "running_minmax", "mse")
# Accept the paper's spelling too.
ALIASES = {
    "minmax": "current_minmax",
    "min-max": "current_minmax",
    "current": "current_minmax",
    "current-minmax": "current_minmax",
    "running": "running_minmax",
    "running-minmax": "running_minmax",
    "ema": "running_minmax",
}


def canonical_estimator(name: str) -> str:
    n = ALIASES.get(name, name)
    if n not in ESTIMATORS:
        raise ValueError(
            f"unknown range estimator {name!r}; allowed: {', '.join(ESTIMATORS)} "
            f"(aliases: {', '.join(sorted(ALIASES))})"
        )
    return n


def batch_minmax(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.aminmax(rows, dim=1)


def mse_range(
    rows: torch.Tensor,
    bits: int,
    symmetric: bool,
    num_candidates: int = 100,
    chunk_elems: int = 2**24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping range minimising the squared quantization error.

    Candidates are ``alpha * [min, max]`` for ``alpha`` in ``(0, 1]`` (``num_candidates`` evenly
    spaced values, ``alpha = 1`` being min-max itself, so the result is never worse than min-max
    on this batch). Evaluated exactly (true round-and-clip error), vectorised over rows, in chunks
    of candidates that keep the temporary below ``chunk_elems`` elements.
    """
    rows = rows.detach().float()
    lo, hi = batch_minmax(rows)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    qmin, qmax = grid(bits, symmetric)
    alphas = torch.linspace(1.0 / num_candidates, 1.0, num_candidates, device=rows.device)
    C, N = rows.shape
    best_loss = torch.full((C,), float("inf"), device=rows.device)
    best_alpha = torch.ones(C, device=rows.device)
    per_chunk = max(1, chunk_elems // max(1, rows.numel()))
    for start in range(0, num_candidates, per_chunk):
        a = alphas[start : start + per_chunk]  # [A]
        cmin = a[:, None] * lo[None, :]  # [A, C]
        cmax = a[:, None] * hi[None, :]
        s, z = qparams_from_range(cmin, cmax, bits, symmetric)
        xq = fake_quant(rows[None], s[..., None], z[..., None], qmin, qmax)
        loss = (xq - rows[None]).pow_(2).sum(-1)  # [A, C]
        chunk_best, idx = loss.min(0)
        better = chunk_best < best_loss
        best_loss = torch.where(better, chunk_best, best_loss)
        best_alpha = torch.where(better, a[idx], best_alpha)
    return best_alpha * lo, best_alpha * hi


class RangeEstimator:
    """Stateful per-quantizer estimator: call :meth:`update` once per batch."""

    def __init__(self, kind: str, momentum: float = 0.9, mse_candidates: int = 100):
        self.kind = canonical_estimator(kind)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"running min-max momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.mse_candidates = mse_candidates
        self.batches = 0

    def reset(self) -> None:
        self.batches = 0

    @torch.no_grad()
    def update(
        self,
        rows: torch.Tensor,
        prev_min: torch.Tensor | None,
        prev_max: torch.Tensor | None,
        bits: int,
        symmetric: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "mse":
            bmin, bmax = mse_range(rows, bits, symmetric, self.mse_candidates)
        else:
            bmin, bmax = batch_minmax(rows.detach().float())
        first = self.batches == 0 or prev_min is None
        self.batches += 1
        if first or self.kind == "current_minmax":
            return bmin, bmax
        if self.kind == "running_minmax":
            m = self.momentum
            return m * prev_min + (1 - m) * bmin, m * prev_max + (1 - m) * bmax
        # mse: running mean of per-batch optima
        n = self.batches
        return prev_min + (bmin - prev_min) / n, prev_max + (bmax - prev_max) / n
