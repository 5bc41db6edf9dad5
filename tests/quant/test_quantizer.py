"""The Quantizer module: states, bad input, learning, idempotence, loading."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pegq.quant import (
    PerChannel,
    PerEmbedding,
    PerEmbeddingGroup,
    PerTensor,
    Quantizer,
    QuantState,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
NAME = "encoder.layer.3.ffn.residual_sum"


def _x(shape=(2, 5, 12), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


gran_st = st.sampled_from(
    [PerTensor(), PerChannel(0), PerChannel(-1), PerEmbedding(), PerEmbeddingGroup(3),
     PerEmbeddingGroup(4, permute=True)]
)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bits", [0, 1, 17, 32, -8, 8.0, True, "eight"])
def test_bad_bits(bits):
    with pytest.raises(ValueError) as e:
        Quantizer(NAME, bits=bits)
    msg = str(e.value)
    assert NAME in msg and repr(bits) in msg and "2..16" in msg
    q = Quantizer(NAME, bits=8)
    with pytest.raises(ValueError, match="2..16"):
        q.configure(bits=bits)
    assert q.bits == 8  # unchanged after a rejected configure


@pytest.mark.parametrize("bits", [2, 16, None, "off"])
def test_good_bits(bits):
    q = Quantizer(NAME, bits=bits)
    x = _x()
    y = q(x)
    if bits in (None, "off"):
        assert q.bits is None and y is x
    else:
        assert q.bits == bits


def test_peg_k_not_dividing_d():
    q = Quantizer(NAME, granularity=PerEmbeddingGroup(5))
    with pytest.raises(ValueError) as e:
        q(_x(shape=(2, 3, 12)))
    msg = str(e.value)
    assert NAME in msg and "K=5" in msg and "d=12" in msg and "divisor of 12" in msg
    with pytest.raises(ValueError, match=f"{NAME}.*K=5.*d=12"):
        q.set_permutation(torch.randperm(12))


@pytest.mark.parametrize(
    "perm",
    [[0, 1, 1, 3], [0, 1, 2, 4], [1, 2, 3, 4], [0.0, 1.0, 2.0, 3.0], [[0, 1], [2, 3]], []],
)
def test_not_a_permutation(perm):
    q = Quantizer(NAME, granularity=PerEmbeddingGroup(2, permute=True))
    with pytest.raises(ValueError) as e:
        q.set_permutation(torch.tensor(perm))
    assert NAME in str(e.value)


def test_permutation_message_names_value_and_range():
    q = Quantizer(NAME, granularity=PerEmbeddingGroup(2, permute=True))
    with pytest.raises(ValueError) as e:
        q.set_permutation(torch.tensor([0, 1, 1, 3]))
    msg = str(e.value)
    assert "[0, 1, 1, 3]" in msg and "0..3" in msg


def test_permutation_needs_peg_and_matching_d():
    with pytest.raises(ValueError, match=f"{NAME}.*PEG"):
        Quantizer(NAME, granularity=PerEmbedding()).set_permutation(torch.arange(4))
    q = Quantizer(NAME, granularity=PerEmbeddingGroup(2, permute=True))
    q.set_permutation(torch.randperm(8))
    with pytest.raises(ValueError, match=f"{NAME}.*8 entries.*12"):
        q(_x(shape=(2, 12)))


@pytest.mark.parametrize("shape", [(0,), (0, 12), (3, 0, 12)])
def test_empty_tensor_during_estimation(shape):
    q = Quantizer(NAME, granularity=PerTensor())
    with pytest.raises(ValueError, match=f"{NAME}.*empty"):
        q(torch.empty(shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("gran", [PerTensor(), PerEmbedding(), PerEmbeddingGroup(3), PerChannel(0)])
@pytest.mark.parametrize("estimator", ["current_minmax", "running_minmax", "mse"])
def test_nonfinite_during_estimation(bad, gran, estimator):
    q = Quantizer(NAME, granularity=gran, estimator=estimator)
    x = _x()
    x[1, 2, 3] = bad
    with pytest.raises(ValueError, match=f"{NAME}: 1 NaN/inf"):
        q(x)
    assert q.x_min is None  # nothing was recorded


def test_bad_estimator_momentum_symmetric_granularity():
    with pytest.raises(ValueError, match=f"{NAME}.*'maxabs'.*allowed"):
        Quantizer(NAME, estimator="maxabs")
    with pytest.raises(ValueError, match=rf"{NAME}.*1.5.*\[0, 1\)"):
        Quantizer(NAME, estimator="running_minmax", momentum=1.5)
    with pytest.raises(ValueError, match=f"{NAME}.*symmetric"):
        Quantizer(NAME, symmetric="yes")
    with pytest.raises(ValueError, match=f"{NAME}.*granularity"):
        Quantizer(NAME, granularity="tensor")
    with pytest.raises(ValueError, match=f"{NAME}.*axis 3.*-2..1"):
        Quantizer(NAME, granularity=PerChannel(3))(torch.randn(4, 5))


def test_layout_change_after_freeze_is_an_error():
    q = Quantizer(NAME, granularity=PerEmbedding())
    q(_x(shape=(2, 12)))
    q.freeze()
    with pytest.raises(ValueError, match=f"{NAME}.*12 scale"):
        q(_x(shape=(2, 8)))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("value", [0.0, 3.0, -2.0])
@pytest.mark.parametrize("estimator", ["current_minmax", "running_minmax", "mse"])
def test_constant_tensors(sym, value, estimator):
    q = Quantizer(NAME, symmetric=sym, estimator=estimator, granularity=PerEmbedding())
    x = torch.full((3, 4), value)
    y = q(x)
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all() and torch.isfinite(y).all()
    assert torch.allclose(y, x, atol=float(q.scale.max()) / 2 + 1e-7)


# ---------------------------------------------------------------------------- behaviour
@SETTINGS
@given(gran=gran_st, bits=st.integers(2, 16), sym=st.booleans(), seed=st.integers(0, 1000))
def test_frozen_quantizer_is_idempotent(gran, bits, sym, seed):
    q = Quantizer(NAME, bits=bits, symmetric=sym, granularity=gran)
    if isinstance(gran, PerEmbeddingGroup) and gran.permute:
        q.set_permutation(torch.randperm(12, generator=torch.Generator().manual_seed(seed)))
    x = _x(seed=seed) * 3
    y = q(x)
    q.freeze()
    assert torch.equal(q(x), y)  # frozen = the range estimated from x
    assert torch.equal(q(y), y)


@SETTINGS
@given(gran=gran_st, bits=st.integers(2, 16), seed=st.integers(0, 1000))
def test_zeros_survive_asymmetric(gran, bits, seed):
    q = Quantizer(NAME, bits=bits, symmetric=False, granularity=gran)
    x = _x(seed=seed).abs() + 0.25  # all positive ...
    x[:, -2:, :] = 0.0  # ... with zero padding
    x[..., 3] = 0.0
    y = q(x)
    assert torch.all(y[:, -2:, :] == 0) and torch.all(y[..., 3] == 0)


@SETTINGS
@given(gran=gran_st, bits=st.integers(2, 16), sym=st.booleans(), seed=st.integers(0, 1000))
def test_error_within_half_step_and_on_grid(gran, bits, sym, seed):
    q = Quantizer(NAME, bits=bits, symmetric=sym, granularity=gran)
    x = _x(seed=seed)
    y = q(x)  # estimated from x: every element is inside its range
    s = gran.broadcast(q.scale, x, q.group_index)
    z = gran.broadcast(q.zero_point, x, q.group_index)
    assert torch.all((y - x).abs() <= s / 2 * (1 + 1e-5) + 1e-6)
    k = y.double() / s + z
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert k.round().min() >= q.qmin and k.round().max() <= q.qmax


@pytest.mark.parametrize("gran", [PerTensor(), PerEmbedding(), PerEmbeddingGroup(3), PerChannel(0)])
def test_ste_through_quantizer(gran):
    q = Quantizer(NAME, bits=4, granularity=gran)
    x = _x()
    q(x)
    q.freeze()
    x2 = torch.cat([x, x * 10], dim=1).requires_grad_()  # second half mostly outside the range
    q(x2).sum().backward()
    lo = gran.broadcast(q.x_min.clamp(max=0), x2, q.group_index)
    hi = gran.broadcast(q.x_max.clamp(min=0), x2, q.group_index)
    s = gran.broadcast(q.scale, x2, q.group_index)
    # clearly inside: rounding the zero-point may shift the grid's ends by up to s/2
    inside = (x2 >= lo + s) & (x2 <= hi - s)
    outside = (x2 < lo - s) | (x2 > hi + s)
    assert inside.sum() > 0 and outside.sum() > 0
    assert torch.allclose(x2.grad[inside], torch.ones(int(inside.sum())), atol=1e-6)
    assert torch.all(x2.grad[outside] == 0)


@pytest.mark.parametrize("gran", [PerTensor(), PerEmbedding(), PerEmbeddingGroup(3), PerChannel(0)])
@pytest.mark.parametrize("sym", [True, False])
def test_learning_gives_gradients_to_scale_and_zero(gran, sym):
    q = Quantizer(NAME, bits=4, symmetric=sym, granularity=gran)
    x = _x()
    y0 = q(x)
    q.learn_ranges()
    assert q.state == QuantState.LEARNING
    assert isinstance(q.scale_param, torch.nn.Parameter)
    assert {n for n, _ in q.named_parameters()} == {"scale_param", "zero_param"}
    assert torch.equal(q(x).detach(), y0)  # same grid as before
    loss = ((q(x * 1.3) - x * 1.3) ** 2).sum()
    loss.backward()
    assert q.scale_param.grad is not None and q.scale_param.grad.abs().sum() > 0
    if sym:
        assert not q.zero_param.requires_grad and q.zero_param.grad is None
    else:
        assert q.zero_param.grad is not None and q.zero_param.grad.abs().sum() > 0
    # a step changes the output
    with torch.no_grad():
        q.scale_param -= 0.1 * q.scale_param.grad.sign() * q.scale_param
    assert not torch.equal(q(x).detach(), y0)


def test_learned_scale_stays_positive():
    q = Quantizer(NAME, bits=8)
    q(_x())
    q.learn_ranges()
    with torch.no_grad():
        q.scale_param.fill_(0.0)  # e.g. after a too large step
    x = _x()
    x[0, 0, :3] = 0.0
    y = q(x)
    assert torch.isfinite(y).all() and torch.all(y[0, 0, :3] == 0)


# ---------------------------------------------------------------------------- states
def test_state_transitions():
    q = Quantizer(NAME, bits=8)
    assert q.state == QuantState.ESTIMATING
    with pytest.raises(ValueError, match=f"{NAME}.*no range"):
        q.freeze()
    with pytest.raises(ValueError, match=f"{NAME}.*calibrate"):
        q.learn_ranges()
    with pytest.raises(ValueError, match=f"{NAME}.*calibrate"):
        q.qparams()
    x = _x()
    q(x)
    r = (q.x_min.clone(), q.x_max.clone())
    q.freeze()
    assert q.state == QuantState.FROZEN
    q(x * 5)  # frozen: the range does not move
    assert torch.equal(q.x_min, r[0]) and torch.equal(q.x_max, r[1])

    q.learn_ranges()
    assert q.state == QuantState.LEARNING and q.scale_param.requires_grad
    with torch.no_grad():
        q.scale_param *= 2
    learned = q.scale_param.detach().clone()
    q.freeze()  # keeps the learned values, no longer trainable
    assert q.state == QuantState.FROZEN and not q.scale_param.requires_grad
    assert torch.equal(q.scale, learned)
    q.learn_ranges()  # back to learning with the same parameters
    assert q.scale_param.requires_grad and torch.equal(q.scale.detach(), learned)

    q.estimate()  # re-estimation: learned parameters are dropped, the estimated range is used
    assert q.state == QuantState.ESTIMATING and q.scale_param is None
    q(x * 5)
    assert float(q.x_max) == float((x * 5).max())

    q.reset()
    assert q.state == QuantState.ESTIMATING and q.x_min is None and q.scale_param is None
    assert q.num_qparams() == 0


def test_off_quantizer_is_identity_in_every_state():
    q = Quantizer(NAME, bits=None)
    x = _x()
    assert q(x) is x
    q.freeze()
    assert q(x) is x
    q.learn_ranges()
    assert q(x) is x and q.bits_per_element() == 32.0


def test_configure_resets_and_permutation_change_resets():
    q = Quantizer(NAME, granularity=PerEmbeddingGroup(3, permute=True))
    q.set_permutation(torch.arange(12))
    q(_x())
    q.freeze()
    q.set_permutation(torch.arange(12))  # same permutation: keeps the range
    assert q.state == QuantState.FROZEN
    q.set_permutation(torch.arange(12).flip(0))  # a new one invalidates it
    assert q.state == QuantState.ESTIMATING and q.x_min is None
    q(_x())
    q.configure(bits=4)
    assert q.x_min is None and q.bits == 4 and q.perm is not None
    q.configure(granularity=PerTensor())
    assert q.perm is None


def test_state_dict_roundtrip_into_fresh_quantizer():
    src = Quantizer(NAME, bits=6, granularity=PerEmbeddingGroup(3, permute=True))
    src.set_permutation(torch.randperm(12, generator=torch.Generator().manual_seed(0)))
    x = _x()
    y = src(x)
    src.freeze()
    dst = Quantizer(NAME, bits=6, granularity=PerEmbeddingGroup(3, permute=True))
    dst.load_state_dict(src.state_dict())
    dst.freeze()
    assert torch.equal(dst(x), y)

    src.learn_ranges()
    dst2 = Quantizer(NAME, bits=6, granularity=PerEmbeddingGroup(3, permute=True))
    dst2.load_state_dict(src.state_dict())
    dst2.freeze()
    assert torch.equal(dst2(x), y)


def test_zero_dim_and_half_inputs():
    q = Quantizer(NAME)
    assert q(torch.tensor(1.5)).shape == ()
    q = Quantizer(NAME, granularity=PerEmbedding())
    x = _x().half()
    y = q(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_estimating_path_equals_frozen_path():
    for gran in (PerTensor(), PerEmbedding(), PerEmbeddingGroup(4), PerChannel(1)):
        q = Quantizer(NAME, granularity=gran, estimator="mse", bits=4)
        x = _x()
        y = q(x)
        q.freeze()
        assert torch.equal(q(x), y)
        assert torch.equal(q(x.clone().requires_grad_()).detach(), y)  # autograd path too
