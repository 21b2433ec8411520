"""The STR math against direct formulas: values and gradients (to weights and to s)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import copy

from strfx.modules import STRUnit, STRWeight, UnitScale, soft_threshold, soft_threshold_inverse, str_norm_


def test_soft_threshold_values_match_formula() -> None:
    torch.manual_seed(0)
    w = torch.randn(1000)
    w[:10] = 0.0
    s = torch.tensor([-1.0])
    g = 1 / (1 + torch.exp(-s))  # sigmoid written out
    expected = torch.where(w.abs() > g, w - torch.sign(w) * g, torch.zeros_like(w))
    got = soft_threshold(w, s)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    assert (got[w.abs() <= g] == 0).all() and (got[w.abs() > g] != 0).all()


def test_soft_threshold_gradients_match_analytic() -> None:
    torch.manual_seed(1)
    w = torch.randn(500, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([-0.7], dtype=torch.float64, requires_grad=True)
    r = torch.randn(500, dtype=torch.float64)  # upstream gradient
    gw, gs = torch.autograd.grad((soft_threshold(w, s) * r).sum(), (w, s))
    g = torch.sigmoid(s.detach())
    alive = (w.detach().abs() > g).double()
    torch.testing.assert_close(gw, r * alive)
    dg_ds = g * (1 - g)
    torch.testing.assert_close(gs, (-(torch.sign(w.detach()) * alive * r).sum() * dg_ds).reshape(1))
    assert torch.autograd.gradcheck(lambda a, b: soft_threshold(a, b), (w[:20], s))


@pytest.mark.parametrize("s_shape", [(1,), (6, 1, 1, 1), (6,)])
def test_fused_threshold_gradients_match_the_textbook_formula(s_shape: tuple[int, ...]) -> None:
    """The hand-written backward against autograd through sign(w)·relu(|w| - g(s)), any s shape."""
    torch.manual_seed(3)
    shape = (6,) if s_shape == (6,) else (6, 4, 3, 3)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    s = (torch.randn(s_shape, dtype=torch.float64) - 0.5).requires_grad_()
    r = torch.randn(shape, dtype=torch.float64)
    got = torch.autograd.grad((soft_threshold(w, s) * r).sum(), (w, s))
    textbook = torch.sign(w) * torch.relu(w.abs() - torch.sigmoid(s))
    want = torch.autograd.grad((textbook * r).sum(), (w, s))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # the inference path (no autograd.Function) computes the same values
        torch.testing.assert_close(soft_threshold(w, s), textbook.detach(), rtol=0, atol=0)


def test_inverse_round_trips_and_keeps_zeros() -> None:
    y = torch.tensor([0.0, 1e-9, -0.3, 2.0])
    s = torch.tensor([-3.0])
    torch.testing.assert_close(soft_threshold(soft_threshold_inverse(y, s), s), y, rtol=1e-6, atol=1e-7)
    assert soft_threshold_inverse(y, s)[0] == 0


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_parametrization_is_exact_and_learns(per_channel: bool) -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 8, 3)
    w0 = conv.weight.detach().clone()
    x = torch.randn(2, 3, 8, 8)
    y0 = conv(x)
    parametrize.register_parametrization(conv, "weight", STRWeight(conv.weight, -4.0, per_channel=per_channel))
    torch.testing.assert_close(conv.weight, w0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(conv(x), y0, rtol=1e-5, atol=1e-6)
    s = conv.parametrizations.weight[0].s
    assert s.shape == ((8, 1, 1, 1) if per_channel else (1,))
    conv(x).square().sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def _bn_with_odd_channels() -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -0.45, 0.0, 1e-6, 2.0, 0.3]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.7, -0.4, 0.0, -1.0]))
        bn.running_mean.copy_(torch.randn(6))
        bn.running_var.copy_(torch.rand(6) + 0.5)
    return bn


def _str_bn(bn: nn.BatchNorm2d, s_init: float) -> nn.BatchNorm2d:
    return str_norm_(copy.deepcopy(bn), s_init)


@pytest.mark.parametrize("training", [False, True])
def test_str_batchnorm_equals_batchnorm(training: bool) -> None:
    torch.manual_seed(3)
    bn = _bn_with_odd_channels().train(training)
    sbn = _str_bn(bn, -15.0).train(training)
    x = torch.randn(4, 6, 5, 5)
    torch.testing.assert_close(sbn(x), bn(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sbn.running_mean, bn.running_mean)
    torch.testing.assert_close(sbn.running_var, bn.running_var)
    assert int(sbn.num_batches_tracked) == int(bn.num_batches_tracked)
    assert type(sbn).__mro__[1] is nn.BatchNorm2d  # still the user's BatchNorm, parametrized


def test_str_batchnorm_dead_channel_is_exactly_zero() -> None:
    bn = _bn_with_odd_channels().eval()
    sbn = _str_bn(bn, -15.0).eval()
    strw, shift = sbn.parametrizations.weight[0], sbn.parametrizations.bias[0]
    with torch.no_grad():
        strw.s.fill_(0.0)  # g(s) = 0.5: |γ| ≤ 0.5 dies
    y = sbn(torch.randn(3, 6, 4, 4))
    gamma = sbn.weight
    dead = (gamma == 0) & (shift.offset == 0)
    # channels 2 and 3 (γ = 0 and tiny γ) keep their β as a constant offset instead of dividing by γ
    assert dead.tolist() == [False, True, False, False, False, True]
    assert (y[:, dead] == 0).all()
    torch.testing.assert_close(y[:, 2], torch.full_like(y[:, 2], 0.7))
    torch.testing.assert_close(y[:, 3], torch.full_like(y[:, 3], -0.4))


def test_importance_vector_is_identity_at_init_and_zero_when_dead() -> None:
    lin = nn.Linear(4, 5)
    x = torch.randn(2, 7, 4)
    expected = lin(x)
    unit = STRUnit(5, s_init=-15.0)
    for name in ("weight", "bias"):
        parametrize.register_parametrization(lin, name, UnitScale(unit, torch.arange(5), 0))
    assert torch.equal(lin(x), expected)
    with torch.no_grad():
        unit.weight[1] = 0.0
    assert (lin(x)[..., 1] == 0).all() and (lin(x)[..., 0] == expected[..., 0]).all()


def test_str_batchnorm_matches_the_formula() -> None:
    """STR-BN as parametrizations is γ'(x̂ + β̂) + β₀: values and gradients (also to s)."""
    torch.manual_seed(0)
    bn = _bn_with_odd_channels().double()
    sbn = _str_bn(bn, -3.0).double().train()
    strw, shift = sbn.parametrizations.weight[0], sbn.parametrizations.bias[0]
    raw_gamma, raw_shift = sbn.parametrizations.weight.original, sbn.parametrizations.bias.original
    with torch.no_grad():
        raw_gamma[1] = 0.01  # below g(s): a dead channel
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    x_hat = torch.nn.functional.batch_norm(x, None, None, None, None, True, 0.0, sbn.eps)
    view = (1, -1, 1, 1)
    ref = soft_threshold(raw_gamma, strw.s).view(view) * (x_hat + raw_shift.view(view)) + shift.offset.view(view)
    out = sbn(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    params = (x, raw_gamma, raw_shift, strw.s)
    for a, b in zip(torch.autograd.grad((out * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert torch.equal(out[:, 1], shift.offset[1].expand_as(out[:, 1]))  # dead channel outputs exactly β₀
