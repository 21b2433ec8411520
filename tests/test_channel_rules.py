"""One test family per channel rule: groups found, dead channels removed, result exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strfx
import strfx.modules
import strfx.surgery
from strfx.errors import StrfxError, VerificationError
from strfx.surgery import analyze, random_like


def sub(m: nn.Module, name: str) -> nn.Module:
    return m.get_submodule(name)


@torch.no_grad()
def kill_bn(bn: nn.BatchNorm2d | nn.GroupNorm, channels: list[int]) -> None:
    for c in channels:
        bn.weight[c] = 0.0
        bn.bias[c] = 0.0


@torch.no_grad()
def shrink_checked(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """strfx.shrink plus an independent equality check on fresh inputs."""
    model.eval()
    small = strfx.shrink(model, (x,))
    for seed in (11, 12):
        (y,) = random_like((x,), seed)
        torch.testing.assert_close(small(y), model(y), rtol=1e-4, atol=1e-5)
    return small


def conv_bn(cin: int, cout: int, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU())


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 8), conv_bn(8, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.b(self.a(x)).mean((2, 3)))


def test_conv_bn_chain_removes_dead_filters():
    m = Chain().eval()
    kill_bn(m.a[1], [1, 5])
    small = shrink_checked(m, torch.randn(2, 3, 8, 8))
    assert sub(small, "a.0").out_channels == 6 and sub(small, "a.1").num_features == 6 and sub(small, "b.0").in_channels == 6
    assert sub(small, "b.0").out_channels == 6  # nothing dead there
    assert small.strfx_shrink["channels_removed"] == 2


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.b1, self.b2 = conv_bn(3, 8), conv_bn(8, 8), conv_bn(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.b2(self.b1(x))
        return self.fc(x.mean((2, 3)))


def test_residual_add_couples_both_branches():
    x = torch.randn(2, 3, 8, 8)
    m = Residual().eval()
    kill_bn(m.b2[1], [2])  # dead in one branch only: the sum is not zero
    small = shrink_checked(m, x)
    assert sub(small, "stem.0").out_channels == 8 and sub(small, "b2.0").out_channels == 8
    kill_bn(m.stem[1], [2])
    small = shrink_checked(m, x)
    assert sub(small, "stem.0").out_channels == 7 and sub(small, "b2.0").out_channels == 7 and sub(small, "b1.0").in_channels == 7
    _, analysis = analyze(m, (x,))
    stream = [g for g in analysis.groups if any(s.startswith("stem.0") for s in g.members)][0]
    assert any(s.startswith("b2.0") for s in stream.members) and stream.channels == 8


class Grouped(nn.Module):
    def __init__(self, groups: int, mult: int = 1) -> None:
        super().__init__()
        self.a = conv_bn(3, 8)
        self.g = nn.Sequential(nn.Conv2d(8, 8 * mult, 3, padding=1, groups=groups, bias=False),
                               nn.BatchNorm2d(8 * mult), nn.ReLU())
        self.fc = nn.Linear(8 * mult, 3)

    def forward(self, x):
        return self.fc(self.g(self.a(x)).mean((2, 3)))


def test_depthwise_conv_removes_whole_groups():
    m = Grouped(groups=8).eval()
    kill_bn(m.a[1], [0, 3])
    kill_bn(m.g[1], [0, 3])
    small = shrink_checked(m, torch.randn(2, 3, 8, 8))
    assert sub(small, "g.0").groups == 6 and sub(small, "g.0").in_channels == 6 and sub(small, "g.0").out_channels == 6


def test_depthwise_multiplier_couples_input_with_its_outputs():
    m = Grouped(groups=8, mult=2).eval()
    kill_bn(m.a[1], [1])
    kill_bn(m.g[1], [2, 3])  # the two outputs of input channel 1
    small = shrink_checked(m, torch.randn(2, 3, 8, 8))
    assert (sub(small, "g.0").groups, sub(small, "g.0").in_channels, sub(small, "g.0").out_channels) == (7, 7, 14)


def test_grouped_conv_keeps_groups_valid():
    m = Grouped(groups=2).eval()
    kill_bn(m.a[1], [1, 5])  # position 1 in both groups of 4
    kill_bn(m.g[1], [0, 4])
    small = shrink_checked(m, torch.randn(2, 3, 8, 8))
    g = sub(small, "g.0")
    assert (g.groups, g.in_channels, g.out_channels) == (2, 6, 6)
    m2 = Grouped(groups=2).eval()
    kill_bn(m2.a[1], [1])  # only one group loses it: the structure forbids the cut
    small2 = shrink_checked(m2, torch.randn(2, 3, 8, 8))
    assert sub(small2, "g.0").in_channels == 8


class FlatHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(3, 5)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(self.a(x), 2), 1))


def test_flatten_linear_removes_hw_features_per_channel():
    m = FlatHead().eval()
    kill_bn(m.a[1], [0, 3])
    small = shrink_checked(m, torch.randn(2, 3, 8, 8))
    assert sub(small, "fc").in_features == 3 * 16


class GN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(4, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.gn(self.conv(x))).mean((2, 3)))


def test_groupnorm_removes_whole_groups_only():
    x = torch.randn(2, 3, 8, 8)
    m = GN().eval()
    kill_bn(m.gn, [2])
    assert sub(shrink_checked(m, x), "gn").num_channels == 8
    kill_bn(m.gn, [3])
    small = shrink_checked(m, x)
    assert (sub(small, "gn").num_groups, sub(small, "gn").num_channels, sub(small, "conv").out_channels) == (3, 6, 6)


class ChannelsLast(nn.Module):
    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.a = conv_bn(3, 8)
        self.norm = nn.LayerNorm(8) if norm else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.a(x)
        z = self.fc2(F.gelu(self.fc1(self.norm(y.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.head((y + z).mean((2, 3)))


def test_layernorm_over_channels_needs_zero_input_and_zero_affine():
    """LayerNorm's statistics read every channel: a channel goes only where its input is zero *and*
    γ, β are zero there (else it outputs -γμ/σ + β); the cut keeps the original width as divisor."""
    x = torch.randn(2, 3, 8, 8)
    m = ChannelsLast(norm=True).eval()
    kill_bn(m.a[1], [1])
    _, analysis = analyze(m, (x,))
    stream = [g for g in analysis.groups if any(s.startswith("a.0") for s in g.members)][0]
    assert stream.prunable and stream.dead == 0  # the LayerNorm still writes there
    assert sub(shrink_checked(m, x), "a.0").out_channels == 8
    with torch.no_grad():
        m.norm.weight[1] = m.norm.bias[1] = 0.0
        m.fc2.weight[1] = m.fc2.bias[1] = 0.0  # the other writer into the stream
    small = shrink_checked(m, x)
    assert sub(small, "a.0").out_channels == 7 and small.strfx_shrink["result"] == "eager"
    assert type(small.norm) is strfx.modules.WideLayerNorm and small.norm.full_width == 8
    assert small.strfx_shrink["max_error64"] <= 1e-9


def test_channels_last_mlp_hidden_is_prunable():
    x = torch.randn(2, 3, 8, 8)
    gm = strfx.sparsify(ChannelsLast(norm=True).eval(), "structured", example_inputs=(x,))
    carriers = strfx.modules.channel_carriers(gm)
    with torch.no_grad():
        carriers["fc1"].raw[[0, 5, 9]] = 0.0
    small = strfx.shrink(gm)
    assert sub(small, "fc1").out_features == 13 and sub(small, "fc2").in_features == 13
    assert not any(type(m).__module__.startswith("strfx") for m in small.modules())
    # the residual stream (through the LayerNorm) is a unit too: STR-BN on its BatchNorm, and the
    # LayerNorm's γ/β gated (a stream channel goes when both are zero)
    assert set(carriers) == {"fc1", "a.1", "norm", "fc2.depth"}  # and the MLP branch's depth gate


class Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l, self.r = conv_bn(3, 4), conv_bn(3, 6)
        self.c = nn.Conv2d(10, 3, 1)

    def forward(self, x):
        return self.c(torch.cat([self.l(x), self.r(x)], 1)).mean((2, 3))


def test_cat_maps_offsets():
    m = Cat().eval()
    kill_bn(m.r[1], [0, 5])
    small = shrink_checked(m, torch.randn(2, 3, 8, 8))
    assert sub(small, "r.0").out_channels == 4 and sub(small, "c").in_channels == 8 and sub(small, "l.0").out_channels == 4


class Chunk(nn.Module):
    def __init__(self, shuffle: bool) -> None:
        super().__init__()
        self.shuffle = shuffle
        self.a, self.b = conv_bn(3, 8), conv_bn(4, 4)
        self.c = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x1, x2 = self.a(x).chunk(2, dim=1)
        y = torch.cat([x1, self.b(x2)], 1)
        if self.shuffle:
            b, c, h, w = y.size()
            y = y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        return self.c(y).mean((2, 3))


def test_chunk_with_uneven_cuts_becomes_split():
    m = Chunk(shuffle=False).eval()
    kill_bn(m.a[1], [1, 2, 6])
    small = shrink_checked(m, torch.randn(2, 3, 8, 8))
    # the model's own chunk(2) cannot split 5 channels 2 + 3: the cut graph is the result, and says why
    assert small.strfx_shrink["result"] == "exported" and "fails after the cut" in small.strfx_shrink["note"]
    assert small.get_parameter("a.0.weight").shape[0] == 5 and small.get_parameter("b.0.weight").shape[1] == 3
    assert "split_with_sizes" in small.code


def test_channel_shuffle_couples_through_the_permutation():
    x = torch.randn(2, 3, 8, 8)
    m = Chunk(shuffle=True).eval()
    kill_bn(m.a[1], [1])  # x1 channel 1 is shuffled next to branch channel 1
    assert sub(shrink_checked(m, x), "c").in_channels == 8
    kill_bn(m.b[1], [1])
    small = shrink_checked(m, x)
    shapes = {n: tuple(p.shape) for n, p in small.named_parameters()}
    assert shapes["c.weight"][1] == 6 and shapes["a.0.weight"][0] == 7 and shapes["b.0.weight"][0] == 3


class SE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(3, 8)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.a(x)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.head((y * s).mean((2, 3)))


def test_se_scale_couples_its_producer():
    m = SE().eval()
    kill_bn(m.a[1], [0, 7])
    small = shrink_checked(m, torch.randn(2, 3, 8, 8))
    assert sub(small, "fc2").out_channels == 6 and sub(small, "fc1").in_channels == 6 and sub(small, "head").in_features == 6


class Odd(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.a = conv_bn(3, 8)
        self.c = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.a(x)
        if self.op == "cumsum":
            y = torch.cumsum(y, 1)
        elif self.op == "mean":
            y = y - y.mean(1, keepdim=True)
        elif self.op == "softmax":
            y = torch.softmax(y, 1)
        return self.c(y).mean((2, 3))


@pytest.mark.parametrize("op,reason", [("cumsum", "unsupported op aten.cumsum.default"), ("mean", None),
                                       ("softmax", "softmax over a channel dim")])
def test_ops_mixing_channels_block_the_group(op, reason):
    """A zero channel stays: cumsum/softmax block it; ``y - mean(y)`` is not zero there (-mean), so
    the channel is live although a mean over channels itself is no obstacle."""
    x = torch.randn(2, 3, 8, 8)
    m = Odd(op).eval()
    kill_bn(m.a[1], [2])
    _, analysis = analyze(m, (x,))
    group = [g for g in analysis.groups if any(s.startswith("a.0") for s in g.members)][0]
    if reason is None:
        assert group.prunable and group.dead == 0
    else:
        assert any(reason in r for r in group.blocked_by), group.blocked_by
    assert sub(shrink_checked(m, x), "a.0").out_channels == 8
    if op == "cumsum":
        assert "aten.cumsum.default" in analysis.unknown_ops


def test_multihead_attention_input_projection_consumes_channels():
    """In the ATen graph MHA's input projection is a linear: the channels feeding it can go (the
    module checks ``embed_dim``, so the cut ATen graph is the result)."""
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.fc(x)
            return self.out(self.mha(h, h, h)[0])

    x = torch.randn(2, 5, 4)
    m = Attn().eval()
    with torch.no_grad():
        m.fc.weight[[1, 6]] = 0.0
        m.fc.bias[[1, 6]] = 0.0
    _, analysis = analyze(m, (x,))
    group = [g for g in analysis.groups if any(s.startswith("fc ") for s in g.members)][0]
    assert group.prunable and group.dead == 2
    small = shrink_checked(m, x)
    assert small.get_parameter("mha.in_proj_weight").shape == (24, 6)


def test_transposed_conv():
    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = conv_bn(3, 6)
            self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.c = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.c(torch.relu(self.bn(self.up(self.a(x))))).mean((2, 3))

    m = Up().eval()
    kill_bn(m.a[1], [1])
    kill_bn(m.bn, [0, 2])
    small = shrink_checked(m, torch.randn(2, 3, 4, 4))
    assert (sub(small, "up").in_channels, sub(small, "up").out_channels) == (5, 2)


def test_model_output_channels_are_kept():
    m = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)).eval()
    kill_bn(m[1], [1])
    small = shrink_checked(m, torch.randn(1, 3, 4, 4))
    assert sub(small, "0").out_channels == 4


def test_zero_filter_without_bias_or_norm_is_dead():
    m = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.ReLU(), nn.Conv2d(6, 2, 1), nn.Flatten(),
                      nn.Linear(2 * 4 * 4, 2)).eval()
    with torch.no_grad():
        m[0].weight[[1, 4]] = 0.0
        m[0].weight[0, 0] = 0.0  # a partly zero filter stays
    small = shrink_checked(m, torch.randn(2, 3, 6, 6))
    assert sub(small, "0").out_channels == 4 and sub(small, "2").in_channels == 4


def test_verification_failure_names_the_node(monkeypatch):
    import strfx.passes.shrink as shrink_pass

    real = shrink_pass.cut_tensor

    def broken(t, keeps):  # a wrong cut: every cut vector (BatchNorm γ, β, statistics) shifted
        out = real(t, keeps)
        return out + 1.0 if out.dim() == 1 else out

    monkeypatch.setattr(shrink_pass, "cut_tensor", broken)
    monkeypatch.setattr(strfx.surgery, "cut_tensor", broken)
    m = Chain().eval()
    kill_bn(m.a[1], [1])
    with pytest.raises(VerificationError, match=r"first diverging node: a_1_\w+ \(a\.1\.\w+\)"):
        strfx.shrink(m, (torch.randn(2, 3, 8, 8),))


def test_shrink_needs_example_inputs():
    with pytest.raises(StrfxError, match="example inputs"):
        strfx.shrink(Chain())


def test_in_place_add_updates_what_later_readers_see():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
            self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y, z = self.bn(self.a(x)), self.b(x)
            y.add_(z)  # y is no longer zero where bn's output was
            return self.c(y).mean((2, 3))

    m = InPlace().eval()
    kill_bn(m.bn, [1])
    small = shrink_checked(m, torch.randn(2, 3, 4, 4))
    assert sub(small, "c").in_channels == 4 and small.strfx_shrink["channels_removed"] == 0


def test_adding_a_broadcast_tensor_keeps_zero_channels_alive():
    class Bias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = conv_bn(3, 4), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.c(y + x[0, 0, 0]).mean((2, 3))  # a rank-1 tensor broadcast over channels

    m = Bias().eval()
    kill_bn(m.a[1], [1])
    assert sub(shrink_checked(m, torch.randn(2, 3, 4, 4)), "c").in_channels == 4


@pytest.mark.parametrize("low,removed", [(-float("inf"), 2), (0.5, 0)])
def test_clamp_by_scalar_buffers_is_judged_on_their_values(low, removed):
    """timm's Gemma4ClippableLinear clamps with ±inf buffers: zero stays zero, so dead channels go.

    With a finite lower bound above zero a dead channel becomes 0.5 everywhere: a constant, not zero
    (absorbed by the next layer's bias, so the shrunk model still agrees).
    """

    class Clipped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = conv_bn(3, 4), nn.Conv2d(4, 2, 1)
            self.register_buffer("lo", torch.tensor(low))
            self.register_buffer("hi", torch.tensor(float("inf")))

        def forward(self, x):
            return self.c(torch.clamp(self.a(x), self.lo, self.hi)).mean((2, 3))

    m = Clipped().eval()
    kill_bn(m.a[1], [1, 3])
    small = shrink_checked(m, torch.randn(2, 3, 4, 4))
    assert sub(small, "c").in_channels == 4 - removed


def test_eager_model_agreeing_in_float32_only_gives_way_to_the_cut_graph():
    """timm iFormer: F.scaled_dot_product_attention takes its default scale 1/√d from the cut q.

    The cut graph writes the original scale out; the eager class cannot. With near-uniform attention the
    eager model is within float32 tolerance (1.7e-7) but float64 shows the difference (4e-8 ≫ 1e-9):
    shrink delivers the cut graph, verified exact, and says why.
    """

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)
            self.v, self.o = nn.Linear(8, 4), nn.Linear(4, 2)

        def forward(self, x):
            y = F.scaled_dot_product_attention(self.q(x)[:, None], self.k(x)[:, None], self.v(x)[:, None])
            return self.o(y[:, 0])

    torch.manual_seed(0)
    m = Attn().eval()
    with torch.no_grad():
        m.q.weight.mul_(1e-6)  # logits ~1e-6: the scale changes the output below float32's tolerance
        m.q.weight[1] = 0.0
        m.k.weight[1] = 0.0
    small = shrink_checked(m, torch.randn(2, 5, 8))
    rep = small.strfx_shrink
    assert rep["channels_removed"] == 1 and rep["result"] == "exported"
    assert rep["note"].startswith("the eager model differs after the cut in float64") and rep["max_error64"] < 1e-12


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_layers_drop_the_columns_of_dead_input_features(rnn, bidirectional):
    """timm's Sequencer2d feeds its residual stream to LSTMs: a dead feature goes with the first layer's
    weight_ih columns (each direction); the hidden units stay, and a constant feature stays too."""

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8, bias=False), nn.Linear(4, 8)
            self.rnn = rnn(16, 5, num_layers=2, bidirectional=bidirectional, batch_first=True)
            self.fc = nn.Linear(10 if bidirectional else 5, 3)

        def forward(self, x):
            y, _ = self.rnn(torch.cat([self.a(x), self.b(x)], -1))
            return self.fc(y[:, -1])

    torch.manual_seed(0)
    m = Seq().eval()
    with torch.no_grad():
        m.a.weight[[1, 6]] = 0.0  # dead: no bias
        m.b.weight[[0, 3]] = 0.0  # constant (its bias): the recurrent layer cannot absorb it
    small = shrink_checked(m, torch.randn(2, 7, 4))
    assert small.strfx_shrink["result"] == "eager" and small.strfx_shrink["max_error64"] < 1e-12
    assert small.rnn.input_size == 14 and small.a.out_features == 6 and small.b.out_features == 8
    assert small.rnn.weight_ih_l0.shape[1] == 14 and small.rnn.weight_ih_l1.shape[1] == m.rnn.weight_ih_l1.shape[1]
    if bidirectional:
        assert small.rnn.weight_ih_l0_reverse.shape[1] == 14


@pytest.mark.parametrize("kernel,removed", [(1, 2), (3, 0)])
def test_conv_over_a_channel_labelled_length_maps_positions_when_its_kernel_is_one(kernel, removed):
    """Token mixing by a Conv1d over the tokens, hidden channels as its length (CoaT aggregates its scales
    so): with kernel 1 each hidden channel stays where it is, so dead ones go; a wider kernel mixes them."""

    class Mix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 8, bias=False)
            self.tok = nn.Conv1d(4, 4, kernel, padding=kernel // 2, bias=False)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.tok(self.a(x)).mean(1))

    torch.manual_seed(0)
    m = Mix().eval()
    with torch.no_grad():
        m.a.weight[[2, 7]] = 0.0
    small = shrink_checked(m, torch.randn(3, 4, 6))
    assert small.strfx_shrink["channels_removed"] == removed and sub(small, "head").in_features == 8 - removed


def test_conv_over_a_labelled_length_turns_a_dead_position_into_its_bias():
    """CoaT's aggregate: Conv1d(scales → 1, kernel 1) with a bias; a position dead at every scale outputs the
    bias, a constant the next Linear absorbs."""

    class Agg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 8, bias=False), nn.Linear(6, 8, bias=False)
            self.agg, self.head = nn.Conv1d(2, 1, 1), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.agg(torch.stack([self.a(x), self.b(x)], 1)).flatten(1))

    torch.manual_seed(0)
    m = Agg().eval()
    with torch.no_grad():
        m.a.weight[[1, 5]] = 0.0
        m.b.weight[[1, 5, 6]] = 0.0  # 6 stays: alive at the other scale
    small = shrink_checked(m, torch.randn(4, 6))
    assert small.strfx_shrink["channels_removed"] == 2 and small.head.in_features == 6
    assert small.strfx_shrink["max_error64"] < 1e-12


@pytest.mark.parametrize("also_summed", [False, True])
def test_a_per_channel_factor_computed_element_by_element_from_a_parameter_is_cut_with_it(also_summed):
    """timm EfficientViM: ``alpha = sigmoid(self.alpha).view(2, -1, 1, 1)``, ``y + alpha[0] * (f(y) - y)``: the
    parameter's columns follow the channels through sigmoid, view and select, so the stream stays prunable —
    unless the computed values are also read where channels are not followed (a sum over all of them)."""

    class Junction(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = conv_bn(3, 6), nn.Conv2d(6, 2, 1)
            self.f = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)  # depthwise: a dead channel stays dead
            self.alpha = nn.Parameter(torch.randn(2, 6))

        def forward(self, x):
            s = torch.sigmoid(self.alpha)
            alpha = s.view(2, -1, 1, 1)
            y = self.a(x)
            y = y + alpha[0] * (self.f(y) - y)
            out = self.c(y * alpha[1]).mean((2, 3))
            return out + s.sum() if also_summed else out

    m = Junction().eval()
    kill_bn(m.a[1], [1, 4])
    small = shrink_checked(m, torch.randn(2, 3, 5, 5))
    removed = 0 if also_summed else 2
    assert small.strfx_shrink["channels_removed"] == removed and small.strfx_shrink["max_error64"] < 1e-12
    assert small.alpha.shape == (2, 6 - removed) and sub(small, "c").in_channels == 6 - removed


def test_a_dimension_never_loses_every_channel():
    m = Chain().eval()
    kill_bn(m.a[1], list(range(8)))  # everything dead: one channel stays so the model keeps its shape
    small = shrink_checked(m, torch.randn(2, 3, 8, 8))
    assert sub(small, "a.0").out_channels == 1 and sub(small, "b.0").in_channels == 1


@pytest.mark.parametrize("act", [nn.Hardswish, nn.Hardsigmoid])
def test_activations_without_the_pointwise_tag_keep_channels_prunable(act):
    """aten.hardswish carries no torch.Tag.pointwise; it is elementwise and maps 0 to 0, so dead channels pass
    through it (hardsigmoid maps 0 to 0.5: a constant channel, folded into the next conv's bias and removed)."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act(),
                      nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    kill_bn(m[1], [1, 5])
    x = torch.randn(2, 3, 6, 6)
    _, analysis = analyze(m, (x,))
    assert not analysis.unknown_ops
    small = shrink_checked(m, x)
    assert small[0].out_channels == 6
    assert small.strfx_shrink["constant_channels_folded"] == (0 if act is nn.Hardswish else 2)


@pytest.mark.parametrize("dim,kept", [(-1, 5), (1, 8)])
def test_vector_norm_over_tokens_keeps_dead_channels_prunable(dim, kept):
    """F.normalize → aten.linalg_vector_norm: a dead channel has norm 0 over its tokens (0 / eps = 0; timm's
    EdgeNeXt/XCiT cross-covariance attention). Over channels the norm itself is fine (zeros add nothing to a
    2-norm), but F.normalize expands it back over the channel dim, which still blocks: shrink stays exact."""

    class Normalized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = conv_bn(3, 8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            z = F.normalize(y.flatten(2), dim=dim).view_as(y)
            return self.c(z).mean((2, 3))

    m = Normalized().eval()
    kill_bn(m.a[1], [0, 3, 6])
    x = torch.randn(2, 3, 6, 6)
    _, analysis = analyze(m, (x,))
    assert "aten.linalg_vector_norm.default" not in analysis.unknown_ops
    small = shrink_checked(m, x)
    assert sub(small, "a.0").out_channels == kept and sub(small, "c").in_channels == kept


@pytest.mark.parametrize("op", ["var", "std"])
def test_var_std_over_space_keep_channels_and_over_channels_block(op):
    """aten.var.dim / std (timm's norms): per channel over H×W a dead channel stays dead (var 0, 0 / √eps = 0),
    without keepdim the channel dim moves (N, C) into the linear; over channels they mix, as a LayerNorm."""

    class Stats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.fc = conv_bn(3, 8), conv_bn(8, 6), nn.Linear(8 + 6, 4)

        def forward(self, x):
            y = self.a(x)
            s = getattr(y, op)((2, 3), keepdim=True)
            y = y / (s + 1e-3)
            z = self.b(y)
            z = z / (getattr(z, op)(1, keepdim=True) + 1e-3)  # across channels
            return self.fc(torch.cat([getattr(y, op)((2, 3)), z.mean((2, 3))], 1))

    m = Stats().eval()
    kill_bn(m.a[1], [1, 4])
    kill_bn(m.b[1], [0])
    x = torch.randn(2, 3, 6, 6)
    _, analysis = analyze(m, (x,))
    assert not analysis.unknown_ops
    group = [g for g in analysis.groups if any(s.startswith("b.0") for s in g.members)][0]
    assert any(f"{op} over a channel dim" in r for r in group.blocked_by), group.blocked_by
    small = shrink_checked(m, x)
    assert sub(small, "a.0").out_channels == 6 and sub(small, "b.0").out_channels == 6
    assert sub(small, "fc").in_features == 6 + 6


@pytest.mark.parametrize("scale", ["view", "view8", "index", "computed"])
def test_layer_scale_reshaped_in_forward_is_cut_with_its_parameter(scale):
    """``x * gamma.reshape(1, -1, 1, 1)`` (timm's InceptionNeXt, MetaFormer): the ATen graph multiplies by a view
    of the parameter; the cut must reach the parameter itself, and the view's sizes (a hard-coded 8 is
    rewritten in the cut graph, which is then the result). A scale computed from it element by element
    (``gamma.exp()``) follows the cut too (a value also read where channels are not followed keeps them:
    test_a_per_channel_factor_computed_element_by_element_from_a_parameter_is_cut_with_it)."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = conv_bn(3, 8), nn.Conv2d(8, 4, 1)
            self.gamma = nn.Parameter(torch.rand(8) + 0.5)

        def forward(self, x):
            y = self.a(x)
            g = {"view": lambda: self.gamma.reshape(1, -1, 1, 1), "view8": lambda: self.gamma.view(1, 8, 1, 1),
                 "index": lambda: self.gamma[:, None, None],
                 "computed": lambda: self.gamma.exp().reshape(1, -1, 1, 1)}[scale]()
            return self.c(y * g).mean((2, 3))

    m = Scaled().eval()
    kill_bn(m.a[1], [2, 7])
    small = shrink_checked(m, torch.randn(2, 3, 6, 6))
    rep = small.strfx_shrink
    assert rep["channels_removed"] == 2
    assert rep["result"] == ("exported" if scale == "view8" else "eager")
    if rep["result"] == "eager":
        assert sub(small, "a.0").out_channels == 6 and small.gamma.shape == (6,)


class RoutedExperts(nn.Module):
    """JetMoE-style experts after a plain MLP: tokens split by per-expert counts read with ``.tolist()``,
    so each expert's input has a size only known at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.up, self.down = nn.Linear(8, 8), nn.Linear(8, 12), nn.Linear(12, 8)
        self.gate = nn.Linear(8, 2, bias=False)
        self.w1 = nn.Parameter(torch.randn(2, 16, 8))
        self.w2 = nn.Parameter(torch.randn(2, 8, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h = h + self.down(torch.relu(self.up(h)))
        expert = self.gate(h).argmax(-1)
        counts = F.one_hot(expert, 2).sum(0).tolist()
        parts = h.split(counts, dim=0)
        y = torch.cat([F.linear(torch.relu(F.linear(p, self.w1[i])), self.w2[i]) for i, p in enumerate(parts)])
        return h + y.sum(0)


def test_data_dependent_sizes_block_what_they_touch_and_the_rest_is_cut():
    """Rules read sizes; a size from ``.tolist()`` has none to read (it used to crash the split rule).
    Such an op blocks its channels with a reason naming it; the MLP before it is still cut exactly."""
    x = torch.randn(6, 8)
    m = RoutedExperts().eval()
    with torch.no_grad():
        m.up.weight[[1, 4, 7]] = 0.0
        m.up.bias[[1, 4, 7]] = -1.0  # relu(-1) = 0: dead hidden units
    _, analysis = analyze(m, (x,))
    assert any("data-dependent size" in r for g in analysis.groups for r in g.blocked_by), \
        [g.blocked_by for g in analysis.groups]
    hidden = [g for g in analysis.groups if g.channels == 12][0]
    assert hidden.prunable and hidden.dead == 3
    small = shrink_checked(m, x)
    assert small.up.out_features == 9 and small.w1.shape == (2, 16, 8)


class CatOntoEmpty(nn.Module):
    """Appending to an empty 1-D tensor, as a key/value cache does on its first step (HF FlauBERT):
    torch.cat skips 1-D empty tensors whatever the dim."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.a, self.b = conv_bn(3, 8), conv_bn(8, 6)
        self.register_buffer("cache", torch.zeros(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.cache, self.a(x)], dim=self.dim)
        return self.b(torch.cat([torch.tensor([]), y], dim=self.dim)).mean((2, 3))


@pytest.mark.parametrize("dim", [1, 2])
def test_cat_onto_an_empty_tensor_passes_channels_through(dim):
    x = torch.randn(2, 3, 8, 8)
    m = CatOntoEmpty(dim).eval()
    kill_bn(m.a[1], [0, 5])
    small = shrink_checked(m, x)
    assert sub(small, "a.0").out_channels == 6 and sub(small, "b.0").in_channels == 6
