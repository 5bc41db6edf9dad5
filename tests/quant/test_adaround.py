"""AdaRound (pegq.quant.adaround): the rounding function, the closed-form gradient, a lower layer
reconstruction error than round-to-nearest, the frozen rounding inside the Quantizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pegq.quant import PerChannel, Quantizer, QuantState, fake_quant
from pegq.quant.adaround import (
    AdaRoundConfig,
    _SoftRoundStep,
    beta_at,
    fake_quant_fixed_rounding,
    init_v,
    nearest_offset,
    optimize_rounding,
    rectified_sigmoid,
    round_regularizer,
    soft_quant,
)


def _layer(out_f=24, in_f=48, rows=1500, seed=0):
    """A Linear layer with correlated inputs (where the best rounding is not the nearest one)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.1
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(rows, in_f, generator=g) @ (torch.eye(in_f) + 2 * mix)
    b = torch.randn(out_f, generator=g) * 0.01
    return w, b, x, F.linear(x, w, b)


def test_rectified_sigmoid_and_init():
    v = torch.linspace(-20, 20, 101)
    h = rectified_sigmoid(v)
    assert h.min() == 0 and h.max() == 1 and torch.all(h[1:] >= h[:-1])
    w = torch.randn(8, 8)
    s = torch.tensor(0.05)
    # at V's initial value the soft weight is the weight itself (inside the grid)
    wq = soft_quant(w, init_v(w, s), s, None, -128, 127)
    assert torch.allclose(wq, w, atol=1e-5)


def test_closed_form_gradient_matches_autograd():
    w, _, x, t = _layer(8, 16, 64)
    s = (w.abs().max() / 7).reshape(())
    v0 = init_v(w, s) + 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    for zero, (qmin, qmax), beta in [(None, (-8, 7), None), (None, (-8, 7), 12.0),
                                     (torch.tensor(7.0), (0, 15), 3.0)]:
        v = v0.clone().requires_grad_(True)
        wq = soft_quant(w, v, s, zero, qmin, qmax)
        loss = (F.linear(x, wq) - t).pow(2).sum(-1).mean()
        if beta is not None:
            loss = loss + 0.01 * round_regularizer(v, beta)
        loss.backward()
        step = _SoftRoundStep(w, s, zero, qmin, qmax)
        wq2 = step.forward(v0.clone())
        assert torch.equal(wq2.detach(), wq.detach())
        (F.linear(x, wq2) - t).pow(2).sum(-1).mean().backward()
        g = step.grad_v(wq2.grad, beta, 0.01)
        assert torch.allclose(g, v.grad, rtol=1e-4, atol=1e-7)


def test_beta_schedule():
    cfg = AdaRoundConfig(iters=100)
    assert beta_at(0, cfg) is None and beta_at(19, cfg) is None  # 20% warm-up without regulariser
    assert beta_at(20, cfg) == pytest.approx(20.0)
    assert beta_at(99, cfg) == pytest.approx(2.0, abs=0.3)
    assert beta_at(60, cfg) < beta_at(40, cfg)


@pytest.mark.parametrize("per_channel", [False, True])
def test_adaround_beats_round_to_nearest(per_channel):
    w, b, x, t = _layer()
    if per_channel:
        s = (w.abs().amax(1, keepdim=True) / 7).clamp_min(1e-8)
    else:
        s = (w.abs().max() / 7).reshape(())
    offset, info = optimize_rounding(w, s, None, -8, 7, x, t, b, AdaRoundConfig(iters=400, batch_rows=256, lr=1e-2),
                                     keep_better=False)
    assert info["mse_adaround"] < 0.8 * info["mse_nearest"], info
    assert info["kept"] == "adaround" and 0 < info["flipped_vs_nearest"] < 0.5
    assert info["not_binary"] < 0.5  # the regulariser pushes h(V) to 0/1 (all of it starts inside)
    assert offset.dtype == torch.uint8 and set(offset.unique().tolist()) <= {0, 1}
    # the hard weights are grid points, each the floor or the ceiling of W/s
    wq = fake_quant_fixed_rounding(w, s, None, -8, 7, offset)
    k = wq / s
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert torch.all((k.round() - torch.floor(w / s)).abs() <= 1)
    # and reconstruct better than round-to-nearest, measured independently
    wn = fake_quant(w, s, None, -8, 7)
    assert F.mse_loss(F.linear(x, wq, b), t) < F.mse_loss(F.linear(x, wn, b), t)


def test_keep_better_falls_back_to_nearest():
    w, b, x, t = _layer(rows=300)
    s = (w.abs().max() / 7).reshape(())
    # a learning rate this large wrecks the optimisation: the safeguard keeps round-to-nearest
    offset, info = optimize_rounding(w, s, None, -8, 7, x, t, b, AdaRoundConfig(iters=30, lr=50.0, warmup=0.0))
    if info["mse_adaround"] > info["mse_nearest"]:
        assert info["kept"] == "nearest" and torch.equal(offset, nearest_offset(w, s))


def test_nearest_offset_reproduces_round_to_nearest():
    w = torch.randn(64, 32)
    for s, z, lo, hi in [(torch.tensor(0.02), None, -8, 7), (torch.tensor(0.01), torch.tensor(3.0), 0, 15)]:
        assert torch.equal(fake_quant_fixed_rounding(w, s, z, lo, hi, nearest_offset(w, s)),
                           fake_quant(w, s, z, lo, hi))


def test_quantizer_applies_frozen_rounding_and_saves_it():
    w, b, x, t = _layer(16, 32, 400)
    q = Quantizer("encoder.layer.0.attn.query.weight", bits=4, symmetric=True, granularity=PerChannel(0))
    q(w)
    q.freeze()
    rtn = q(w)
    s = q.granularity.broadcast(q.scale, w)
    offset, info = optimize_rounding(w, s, None, q.qmin, q.qmax, x, t, b, AdaRoundConfig(iters=150))
    q.round_offset = offset
    ada = q(w)
    assert not torch.equal(ada, rtn) and q.state == QuantState.FROZEN
    assert torch.equal(ada, fake_quant_fixed_rounding(w, s, None, q.qmin, q.qmax, offset))
    # saved and loaded with the quantizer's state
    q2 = Quantizer("encoder.layer.0.attn.query.weight", bits=4, symmetric=True, granularity=PerChannel(0))
    q2.load_state_dict(q.state_dict())
    q2.freeze()
    assert torch.equal(q2(w), ada)
    # a tensor of another shape is refused with a clear message; re-estimating drops the offsets
    with pytest.raises(ValueError, match="offsets have shape"):
        q(w[:, :8].contiguous())
    q.estimate()
    assert q.round_offset is None
    q2.reset()
    assert q2.round_offset is None


@pytest.mark.parametrize("kw", [dict(iters=0), dict(batch_rows=0), dict(warmup=1.0), dict(lr=0.0),
                                dict(beta_start=1.0, beta_end=2.0)])
def test_bad_config(kw):
    with pytest.raises(ValueError, match="AdaRound"):
        AdaRoundConfig(**kw)


def test_bad_data():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="same N"):
        optimize_rounding(w, torch.tensor(0.1), None, -8, 7, torch.randn(10, 8), torch.randn(9, 4))
