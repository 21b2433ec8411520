"""Constant channels (BatchNorm γ = 0, β ≠ 0): folded into consumer biases where exact, else kept with a reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strfx
from strfx.verify import max_rel_error, verification_inputs

SLIMMED = [1, 4, 6]


class Slimmed(nn.Module):
    """Network slimming leaves BatchNorm channels with γ = 0 and β ≠ 0: each outputs the constant β."""

    def __init__(self, kernel: int = 1, padding: int = 0, head: str = "conv") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, kernel, padding=padding)
        self.fc = nn.Linear(8, 3)
        self.head = head
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1), self.bn.running_var.uniform_(0.5, 2)
            self.bn.bias.uniform_(0.2, 1.0)  # β > 0: relu keeps the constant
            self.bn.weight[SLIMMED] = 0

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        if self.head == "linear":
            return self.fc(y.mean((2, 3)))
        return F.relu(self.c2(y)).mean((2, 3))


def _check(model: nn.Module, x: torch.Tensor) -> dict:
    small = strfx.shrink(model, (x,))
    with torch.no_grad():
        for s in verification_inputs((x,), seed=4):
            assert max_rel_error(small(*s.inputs), model(*s.inputs)) <= 1e-5, s.kind
    return small.strfx_shrink


@pytest.mark.parametrize("kernel,head", [(1, "conv"), (3, "conv"), (1, "linear")])
def test_constant_channels_fold_into_the_consumer_bias(kernel, head):
    model = Slimmed(kernel, 0, head).eval()
    x = torch.randn(2, 3, 8, 8)
    rep = _check(model, x)
    assert rep["channels_removed"] == 3 and rep["constant_channels_folded"] == 3
    assert rep["max_error64"] is not None and rep["max_error64"] <= 1e-12
    assert rep["constant_channels_kept"] == []


def test_constant_channels_fold_into_the_eager_model():
    model = Slimmed(1, 0).eval()
    small = strfx.shrink(model, (torch.randn(2, 3, 8, 8),))
    assert small.strfx_shrink["result"] == "eager"
    assert small.bn.num_features == 5 and small.c2.in_channels == 5
    assert not torch.equal(small.c2.bias, model.c2.bias)  # the constants now live in the bias


def test_zero_padding_keeps_constant_channels_and_says_why():
    model = Slimmed(3, 1).eval()
    rep = _check(model, torch.randn(2, 3, 8, 8))
    assert rep["channels_removed"] == 0
    assert len(rep["constant_channels_kept"]) == 1
    assert "3 constant channel(s) kept" in rep["constant_channels_kept"][0] and "zero-pads" in rep["constant_channels_kept"][0]


def test_constant_through_a_non_zero_preserving_activation_is_folded():
    """sigmoid(β) is a constant too: the op is evaluated on the constants."""

    class M(Slimmed):
        def forward(self, x):
            return self.c2(torch.sigmoid(self.bn(self.c1(x)))).mean((2, 3))

    rep = _check(M(1, 0).eval(), torch.randn(2, 3, 8, 8))
    assert rep["constant_channels_folded"] == 3


def test_constant_summed_over_channels_is_kept():
    class M(Slimmed):
        def forward(self, x):
            y = F.relu(self.bn(self.c1(x)))
            return self.c2(y).mean((2, 3)) + y.sum(1).mean((1, 2))[:, None]

    rep = _check(M(1, 0).eval(), torch.randn(2, 3, 8, 8))
    assert rep["channels_removed"] == 0 and "sum over channels" in rep["constant_channels_kept"][0]


def test_conv_without_bias_gets_one_to_absorb_constant_channels():
    """A conv before a BatchNorm has no bias: strfx gives it one (zero, then the folded constants)."""

    class M(Slimmed):
        def __init__(self) -> None:
            super().__init__()
            self.c2 = nn.Conv2d(8, 6, 1, bias=False)

    model = M().eval()
    small = strfx.shrink(model, (torch.randn(2, 3, 8, 8),))
    rep = small.strfx_shrink
    assert rep["channels_removed"] == 3 and rep["constant_channels_folded"] == 3 and rep["result"] == "eager"
    assert rep["max_error64"] is not None and rep["max_error64"] <= 1e-12
    assert small.c2.in_channels == 5 and small.c2.bias is not None and model.c2.bias is None  # the user's untouched
    with torch.no_grad():
        for s in verification_inputs((torch.randn(2, 3, 8, 8),), seed=4):
            assert max_rel_error(small(*s.inputs), model(*s.inputs)) <= 1e-5, s.kind
    # `strfx inspect --groups` names the bias as strfx's, not as one of the user's parameters
    from strfx.inspect import channel_groups

    members = [m for row in channel_groups(model, (torch.randn(2, 3, 8, 8),)) for m in row.members]
    assert [m for m in members if m.startswith("c2.bias")] == \
        ["c2.bias (parameter strfx adds: a zero bias that absorbs constant channels)"]


def test_a_layer_whose_forward_ignores_its_bias_keeps_constant_channels():
    """A bias slot the forward never reads cannot absorb anything: the channels stay, and no bias is left behind."""

    class NoBiasConv(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, self.weight)

    class M(Slimmed):
        def __init__(self) -> None:
            super().__init__()
            self.c2 = NoBiasConv(8, 6, 1, bias=False)

    small = strfx.shrink(M().eval(), (torch.randn(2, 3, 8, 8),))
    rep = small.strfx_shrink
    assert rep["channels_removed"] == 0 and "no bias" in rep["constant_channels_kept"][0]
    assert small.c2.bias is None


def test_sparsify_then_shrink_keeps_the_function_of_a_slimmed_model():
    model = Slimmed(1, 0).eval()
    x = torch.randn(2, 3, 8, 8)
    s = strfx.sparsify(model, "structured", example_inputs=(x,))
    with torch.no_grad():
        s.eval()
        assert max_rel_error(s(x), model(x)) <= 1e-6
    rep = _check(s, x)
    assert rep["constant_channels_folded"] == 3


class StarReLU(nn.Module):
    """caformer's s·relu(x)² + b: a zeroed channel becomes the constant b, not 0."""

    def __init__(self) -> None:
        super().__init__()
        self.scale, self.bias = nn.Parameter(torch.tensor(0.8)), nn.Parameter(torch.tensor(-0.4))

    def forward(self, x):
        return self.scale * F.relu(x) ** 2 + self.bias


class StarMLP(nn.Module):
    def __init__(self, fc2_bias: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.fc2 = nn.Linear(6, 16), StarReLU(), nn.Linear(16, 6, bias=fc2_bias)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(x + self.fc2(self.act(self.fc1(x))))


@pytest.mark.parametrize("fc2_bias", [True, False])
def test_kill_channels_counts_only_what_shrink_removes(fc2_bias):
    from strfx.testing import kill_channels

    x = torch.randn(3, 5, 6)
    s = strfx.sparsify(StarMLP(fc2_bias).eval(), "structured", example_inputs=(x,))
    counts = kill_channels(s, 0.5, example_inputs=(x,))
    assert counts["zeroed"] > 0
    small = strfx.shrink(s, (x,))
    rep = small.strfx_shrink
    assert rep["channels_removed"] == counts["channels"]
    # the constant b folds into fc2's bias (a bias-less fc2 is given one): every zeroed hidden channel goes
    assert counts["channels"] == counts["zeroed"] and rep["constant_channels_folded"] == counts["zeroed"]
    assert rep["constant_channels_kept"] == [] and small.fc2.bias is not None


def test_all_zero_filter_with_bias_is_a_constant_channel():
    """A filter that reads nothing outputs its bias everywhere; tanh(bias) is still a constant."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
            self.fc = nn.Linear(4, 6)
            with torch.no_grad():
                self.c1.weight[[0, 5]] = 0

        def forward(self, x):
            return self.fc(F.relu(self.c2(torch.tanh(self.c1(x)))).mean((2, 3)))

    rep = _check(M().eval(), torch.randn(2, 3, 8, 8))
    assert rep["constant_channels_folded"] == 2 and rep["channels_removed"] == 2


def test_reflection_padding_keeps_the_constant_so_it_folds():
    """padding_mode='reflect' pads with the channel's own values: the conv after it can absorb it."""

    class M(Slimmed):
        def __init__(self) -> None:
            super().__init__()
            self.c2 = nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect")

    rep = _check(M().eval(), torch.randn(2, 3, 8, 8))
    assert rep["constant_channels_folded"] == 3 and rep["constant_channels_kept"] == []
