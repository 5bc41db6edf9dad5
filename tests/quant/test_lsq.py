"""LSQ for learned ranges (pegq.quant.lsq): fused gradients equal the composite's, the 1/sqrt(N*Qp)
gradient scale, and the Quantizer's LEARNING state using both."""

from __future__ import annotations

import math

import pytest
import torch

from pegq.quant import PerEmbedding, PerEmbeddingGroup, PerTensor, Quantizer, fake_quant
from pegq.quant.lsq import fake_quant_learnable, grad_scale, lsq_grad_factor


def _grads(fn, x, s, z, qmin, qmax):
    xa, sa = x.clone().requires_grad_(), s.clone().requires_grad_()
    za = None if z is None else z.clone().requires_grad_()
    y = fn(xa, sa, za, qmin, qmax)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * w).sum().backward()
    return y.detach(), xa.grad, sa.grad, None if z is None else za.grad


@pytest.mark.parametrize(
    "shape,s,z,qmin,qmax",
    [
        ((4, 30, 64), torch.tensor(0.03), None, -128, 127),
        ((4, 30, 64), torch.tensor(0.03), torch.tensor(100.3), 0, 255),
        ((4, 30, 64), torch.linspace(0.01, 0.05, 64), torch.linspace(90.0, 140.0, 64), 0, 255),
        ((64, 32), torch.linspace(0.005, 0.05, 64).reshape(64, 1), None, -8, 7),
        ((4, 30, 64), torch.tensor(0.03), torch.tensor(300.0), 0, 255),  # zero-point clipped: no z gradient
    ],
)
def test_fused_gradients_match_composite(shape, s, z, qmin, qmax):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3
    y1, x1, s1, z1 = _grads(fake_quant, x, s, z, qmin, qmax)
    y2, x2, s2, z2 = _grads(fake_quant_learnable, x, s, z, qmin, qmax)
    assert torch.equal(y1, y2)  # same values, bit for bit
    assert torch.allclose(x1, x2, atol=1e-6) and torch.equal(x1 == 0, x2 == 0)  # STE mask
    assert torch.allclose(s1, s2, rtol=1e-4, atol=1e-3)
    if z is not None:
        assert torch.allclose(z1, z2, rtol=1e-4, atol=1e-4)
    if z is not None and float(z.max()) > qmax:
        assert torch.all(z2 == 0)


def test_grad_scale_changes_only_the_gradient():
    p = torch.tensor([0.5, 2.0], requires_grad=True)
    y = grad_scale(p, 0.1)
    assert torch.equal(y, p)
    (y * torch.tensor([1.0, 3.0])).sum().backward()
    assert torch.allclose(p.grad, torch.tensor([0.1, 0.3]))
    assert lsq_grad_factor(100, 127) == pytest.approx(1 / math.sqrt(100 * 127))


@pytest.mark.parametrize("gran", [PerTensor(), PerEmbedding(), PerEmbeddingGroup(4)])
@pytest.mark.parametrize("sym", [True, False])
def test_learning_quantizer_scales_range_gradients(gran, sym):
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(0))
    grads = {}
    for lsq in (True, False):
        q = Quantizer("encoder.layer.0.ffn.output", bits=8, symmetric=sym, granularity=gran)
        q(x)
        q.learn_ranges()
        q.lsq_grad_scale = lsq
        y = q(x * 1.5)
        ((y - x) ** 2).sum().backward()
        grads[lsq] = (q.scale_param.grad.clone(), None if sym else q.zero_param.grad.clone())
    n = x.numel() // q.scale_param.numel()
    g = lsq_grad_factor(n, q.qmax)
    assert torch.allclose(grads[True][0], grads[False][0] * g, rtol=1e-5, atol=1e-12)
    if not sym:
        assert torch.allclose(grads[True][1], grads[False][1] * g, rtol=1e-5, atol=1e-12)
    # the forward value does not depend on the gradient scale, and frozen/no-grad paths agree
    with torch.no_grad():
        assert torch.equal(q(x), fake_quant(x, gran.broadcast(q.scale, x, None),
                                            None if sym else gran.broadcast(q.zero_point, x, None),
                                            q.qmin, q.qmax))
