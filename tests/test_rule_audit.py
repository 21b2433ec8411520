"""Rule audit: every channel rule's claims, checked against the op itself on random inputs.

Each case is a tiny model: a source layer whose output channels 1, 4 and 6 are exactly zero (zero
filters, zero bias), then the op under test, then a consumer. The analysis of its captured ATen graph
claims, per node, which channels are exactly zero; the audit runs the graph node by node on random,
large-magnitude and non-negative inputs and checks (a) that every position claimed zero *is* exactly
zero in every node's real output, and (b) that ``strfx.shrink`` (which cuts whatever the analysis
proves dead, and verifies in float32 and float64) succeeds and matches the model on fresh inputs.
A rule that claims too much fails (a); a rule whose cut is wrong fails (b).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import strfx
from strfx.passes.capture import capture
from strfx.passes.channel_analysis import TInfo, analyze_channels
from strfx.verify import max_rel_error, verification_inputs

DEAD = (1, 5, 6)  # 1 and 5 pair up under a 2×4 channel shuffle
C = 8


class Fn(nn.Module):
    """A module around a function of (module, x), so ops can carry their own parameters."""

    def __init__(self, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], **params: Any) -> None:
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            if isinstance(v, nn.Module):
                self.add_module(k, v)
            else:
                self.register_parameter(k, nn.Parameter(v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


class Probe(nn.Module):
    """source (dead channels DEAD) → op → consumer that mixes channels (so dead ones can go)."""

    def __init__(self, op: nn.Module, source: str = "conv", spatial: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        if source == "conv":
            self.src = nn.Conv2d(3, C, 3, padding=1)
            x = torch.randn(2, 3, spatial, spatial)
        elif source == "linear":
            self.src = nn.Linear(5, C)
            x = torch.randn(2, 7, 5)
        elif source == "bn":  # network slimming: γ = 0, β ≠ 0 makes channels DEAD the constant β
            self.src = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C))
            x = torch.randn(2, 3, spatial, spatial)
        elif source == "embedding":
            self.src = nn.Embedding(10, C)
            x = torch.randint(0, 10, (2, 7))
        with torch.no_grad():
            w = self.src[1].weight if source == "bn" else self.src.weight
            if source == "bn":
                bn = self.src[1]
                bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
                w[list(DEAD)] = 0
            elif source == "embedding":
                w[:, list(DEAD)] = 0
            else:
                w[list(DEAD)] = 0
                self.src.bias[list(DEAD)] = 0
        self.op = op
        with torch.no_grad():
            y = op(self.src(x))
        self.example = x
        self.rank = y.dim()
        self.head = nn.Linear(y[0].numel(), 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.op(self.src(x)).flatten(1))


def _claims(gm: fx.GraphModule, analysis: Any) -> dict[str, list[tuple[int, int, np.ndarray, np.ndarray]]]:
    """node name -> [(output index, dim, indices claimed constant, their values)]; zero is the constant 0."""
    out: dict[str, list[tuple[int, int, np.ndarray, np.ndarray]]] = {}
    for node in gm.graph.nodes:
        value = analysis.values.get(node.name)
        infos = [value] if isinstance(value, TInfo) else list(value) if isinstance(value, tuple) else []
        for k, info in enumerate(infos):
            if not isinstance(info, TInfo):
                continue
            for d in info.labels:
                const = info.const_of(d)
                known = np.isfinite(const) | info.zero[d]
                if known.any():
                    idx = np.nonzero(known)[0]
                    out.setdefault(node.name, []).append((k, d, idx, np.where(info.zero[d], 0.0, const)[idx]))
    return out


def _run_nodes(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> dict[str, Any]:
    env: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            env[n.name] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*[t.clone() if isinstance(t, torch.Tensor) else t for t in inputs])
    return env


def audit(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Check the analysis' zero claims on real values and that shrink is exact; returns the report."""
    model.eval()
    gm = capture(model, (x,))
    analysis = analyze_channels(gm)
    claims = _claims(gm, analysis)
    assert claims, "the source's dead channels should be claimed zero somewhere"
    for s in verification_inputs((x,), seed=3):
        env = _run_nodes(gm, s.inputs)
        for name, facts in claims.items():
            value = env[name]
            for k, d, idx, vals in facts:
                t = value[k] if isinstance(value, (tuple, list)) else value
                got = t.index_select(d, torch.as_tensor(idx)).movedim(d, -1).to(torch.float64)
                want = torch.as_tensor(vals).expand_as(got)
                zero = want == 0
                assert bool((got[zero] == 0).all()), (
                    f"{name} claims channels {idx.tolist()} of dim {d} zero, but on the {s.kind} they are not")
                torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=lambda m: (
                    f"{name} claims channels {idx.tolist()} of dim {d} are the constants {vals.tolist()}, "
                    f"but on the {s.kind} they are not: {m}"))
    if analysis.dead_channels() == 0:
        return {"channels_removed": 0}  # nothing is cut: the model itself is the result
    small = strfx.shrink(model, (x,))
    with torch.no_grad():
        for s in verification_inputs((x,), seed=9):
            assert max_rel_error(small(*s.inputs), model(*s.inputs)) <= 1e-5, s.kind
    return small.strfx_shrink


def P(fn: Callable[..., torch.Tensor], **params: Any) -> nn.Module:
    return Fn(fn, **params)


def _nz(*shape: int) -> torch.Tensor:
    """A parameter with no zero entries."""
    return torch.rand(*shape) + 0.5


_bias_some_zero = torch.rand(1, C, 1, 1) + 0.5
_bias_some_zero[0, [1, 5], 0, 0] = 0  # channel 6 gets a non-zero bias: not zero after the add

# (id, op module, source, expect at least one channel removed)
CASES: list[tuple[str, Callable[[], nn.Module], str, bool]] = [
    # pointwise unary
    ("relu", lambda: P(lambda m, x: F.relu(x)), "conv", True),
    ("gelu", lambda: P(lambda m, x: F.gelu(x)), "conv", True),
    ("silu", lambda: P(lambda m, x: F.silu(x)), "conv", True),
    ("sigmoid", lambda: P(lambda m, x: torch.sigmoid(x)), "conv", False),
    ("exp", lambda: P(lambda m, x: torch.exp(x)), "conv", False),
    ("cos", lambda: P(lambda m, x: torch.cos(x)), "conv", False),
    ("hardtanh_0.5_2", lambda: P(lambda m, x: F.hardtanh(x, 0.5, 2.0)), "conv", False),
    ("hardtanh_-2_-0.5", lambda: P(lambda m, x: F.hardtanh(x, -2.0, -0.5)), "conv", False),
    ("hardtanh_kw", lambda: nn.Hardtanh(min_val=0.25, max_val=3.0), "conv", False),
    ("relu6", lambda: nn.ReLU6(), "conv", True),
    ("threshold_nonzero_value", lambda: nn.Threshold(0.5, 2.0), "conv", False),
    ("threshold_zero_value", lambda: nn.Threshold(0.1, 0.0), "conv", True),
    ("clamp_min_pos", lambda: P(lambda m, x: torch.clamp(x, min=0.3)), "conv", False),
    ("clamp_sym", lambda: P(lambda m, x: torch.clamp(x, -1.0, 1.0)), "conv", True),
    ("leaky_relu", lambda: nn.LeakyReLU(0.1), "conv", True),
    ("elu", lambda: nn.ELU(), "conv", True),
    ("softplus", lambda: nn.Softplus(), "conv", False),
    ("abs_neg_square", lambda: P(lambda m, x: -(x.abs() ** 2)), "conv", True),
    ("add_const", lambda: P(lambda m, x: x + 1.0), "conv", False),
    ("mul_div_const", lambda: P(lambda m, x: x * 3.0 / 7.0), "conv", True),
    ("starrelu", lambda: P(lambda m, x: m.s * F.relu(x) ** 2 + m.b, s=torch.tensor(0.8), b=torch.tensor(0.3)), "conv", False),
    # with parameters
    ("add_param_some_zero", lambda: P(lambda m, x: x + m.b, b=_bias_some_zero.clone()), "conv", True),
    ("mul_param", lambda: P(lambda m, x: x * m.g, g=_nz(1, C, 1, 1)), "conv", True),
    ("div_param", lambda: P(lambda m, x: x / m.g, g=_nz(1, C, 1, 1)), "conv", True),
    ("multiply_divide_aliases", lambda: P(lambda m, x: torch.divide(torch.multiply(x, m.g), m.g.abs() + 1),
                                          g=_nz(1, C, 1, 1)), "conv", True),
    ("negative_arctan_aliases", lambda: P(lambda m, x: torch.arctan(x.negative()).absolute()), "conv", True),
    ("subtract_alias", lambda: P(lambda m, x: torch.subtract(x, 0.5)), "conv", False),
    ("greater_alias", lambda: P(lambda m, x: x * torch.greater(x, 0.0)), "conv", True),
    ("sub_rsub", lambda: P(lambda m, x: 1.0 - (1.0 - x)), "conv", False),
    ("where_zero_else", lambda: P(lambda m, x: torch.where(x > 0, x, 0.0)), "conv", True),
    ("where_zeros_like", lambda: P(lambda m, x: torch.where(x > 0, x, torch.zeros_like(x))), "conv", False),
    ("where_one_else", lambda: P(lambda m, x: torch.where(x > 0, x, torch.ones_like(x))), "conv", False),
    ("where_scalar", lambda: P(lambda m, x: torch.where(x > 0, x, 0.5)), "conv", False),
    ("residual_mul", lambda: P(lambda m, x: x * torch.sigmoid(x) + x), "conv", True),
    # cat / stack / split / slice / select
    ("cat_channels", lambda: P(lambda m, x: torch.cat([x, F.relu(x)], 1)), "conv", True),
    ("cat_spatial", lambda: P(lambda m, x: torch.cat([x, x * 2], 2)), "conv", True),
    ("stack", lambda: P(lambda m, x: torch.stack([x, x], 0).sum(0)), "conv", True),
    ("split_channels", lambda: P(lambda m, x: torch.cat(torch.split(x, [3, 5], 1)[::-1], 1)), "conv", True),
    ("chunk", lambda: P(lambda m, x: x.chunk(2, 1)[0] * x.chunk(2, 1)[1]), "conv", True),
    ("slice_spatial", lambda: P(lambda m, x: x[:, :, 1:4]), "conv", True),
    ("slice_channels", lambda: P(lambda m, x: x[:, 2:7]), "conv", False),
    ("select_spatial", lambda: P(lambda m, x: x[:, :, 2]), "conv", True),
    # reshapes
    ("flatten_linear", lambda: P(lambda m, x: x.flatten(1)), "conv", True),
    ("view_unflatten", lambda: P(lambda m, x: x.view(x.shape[0], 2, 4, 6, 6).transpose(1, 2).reshape(-1, 8, 6, 6)), "conv", True),
    ("unflatten", lambda: P(lambda m, x: x.flatten(2).unflatten(2, (6, 6))), "conv", True),
    ("permute_channels_last", lambda: P(lambda m, x: x.permute(0, 2, 3, 1)), "conv", True),
    ("transpose", lambda: P(lambda m, x: x.transpose(1, 3).transpose(1, 3)), "conv", True),
    ("expand", lambda: P(lambda m, x: x.mean((2, 3), keepdim=True).expand(-1, -1, 6, 6)), "conv", True),
    ("expand_const_sizes", lambda: P(lambda m, x: x.mean((2, 3), keepdim=True).expand(2, 8, 6, 6)), "conv", True),
    # reductions
    ("sum_spatial", lambda: P(lambda m, x: x.sum((2, 3))), "conv", True),
    ("mean_spatial", lambda: P(lambda m, x: x.mean(-1)), "conv", True),
    ("amax_spatial", lambda: P(lambda m, x: x.amax((2, 3))), "conv", True),
    ("sum_channels", lambda: P(lambda m, x: x.sum(1, keepdim=True)), "conv", True),
    ("softmax_spatial", lambda: P(lambda m, x: x.flatten(2).softmax(-1)), "conv", False),
    # weight layers
    ("conv_grouped", lambda: nn.Conv2d(C, 4, 3, padding=1, groups=2), "conv", False),
    ("conv_depthwise", lambda: nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False), "conv", True),
    ("conv_depthwise_bias", lambda: nn.Conv2d(C, 2 * C, 3, padding=1, groups=C), "conv", False),
    ("conv_transposed", lambda: nn.ConvTranspose2d(C, 5, 2, stride=2), "conv", True),
    ("conv_transposed_grouped", lambda: nn.ConvTranspose2d(C, 4, 2, stride=2, groups=2), "conv", False),
    ("linear_pooled", lambda: P(lambda m, x: m.fc(x.mean((2, 3))), fc=nn.Linear(C, 6)), "conv", True),
    ("matmul_param", lambda: P(lambda m, x: x.permute(0, 2, 3, 1) @ m.w, w=_nz(C, 5)), "conv", True),
    ("addmm_param", lambda: P(lambda m, x: torch.addmm(m.b, x.mean((2, 3)), m.w), w=_nz(C, 5), b=_nz(5)), "conv", True),
    ("linear_3d", lambda: nn.Linear(C, 6), "linear", True),
    ("embedding", lambda: nn.Linear(C, 6), "embedding", True),
    # norms and per-channel ops
    ("batch_norm", lambda: nn.BatchNorm2d(C), "conv", False),
    ("instance_norm", lambda: nn.InstanceNorm2d(C, affine=True), "conv", False),
    ("instance_norm_running", lambda: nn.InstanceNorm2d(C, affine=False, track_running_stats=True), "conv", False),
    ("group_norm", lambda: nn.GroupNorm(4, C), "conv", False),
    ("layer_norm_last", lambda: nn.LayerNorm(C), "linear", False),
    ("layer_norm_spatial", lambda: nn.LayerNorm([6, 6], bias=False), "conv", True),
    ("rms_norm_spatial", lambda: nn.RMSNorm([6]), "conv", True),
    ("prelu", lambda: nn.PReLU(C), "conv", True),
    ("prelu_shared", lambda: nn.PReLU(), "conv", True),
    # spatial
    ("max_pool", lambda: nn.MaxPool2d(2), "conv", True),
    ("avg_pool", lambda: nn.AvgPool2d(3, 1, 1), "conv", True),
    ("adaptive_avg", lambda: nn.AdaptiveAvgPool2d(2), "conv", True),
    ("adaptive_max", lambda: nn.AdaptiveMaxPool2d(3), "conv", True),
    ("upsample_nearest", lambda: nn.Upsample(scale_factor=2), "conv", True),
    ("upsample_bilinear", lambda: nn.Upsample(scale_factor=2, mode="bilinear"), "conv", True),
    ("zero_pad", lambda: nn.ZeroPad2d(1), "conv", True),
    ("constant_pad_one", lambda: nn.ConstantPad2d(1, 1.0), "conv", False),
    ("reflect_pad", lambda: nn.ReflectionPad2d(1), "conv", True),
    ("pad_channel_dim", lambda: nn.ConstantPad3d((0, 0, 0, 0, 1, 0), 0.0), "conv", False),
    ("pad_channel_dim_value", lambda: P(lambda m, x: F.pad(x, (0, 0, 0, 0, 2, 1), value=0.5)), "conv", False),
]


# cases re-run with constant channels (BatchNorm γ = 0, β ≠ 0) instead of zero ones
CONSTANT_CASES = ["relu", "gelu", "sigmoid", "hardtanh_0.5_2", "threshold_nonzero_value", "clamp_min_pos",
                  "starrelu", "add_param_some_zero", "mul_param", "div_param", "where_scalar", "residual_mul",
                  "cat_channels", "split_channels", "chunk", "slice_spatial", "flatten_linear", "view_unflatten",
                  "permute_channels_last", "expand", "sum_spatial", "mean_spatial", "amax_spatial", "sum_channels",
                  "conv_grouped", "conv_depthwise", "conv_transposed", "linear_pooled", "matmul_param", "addmm_param",
                  "batch_norm", "instance_norm_running", "group_norm", "layer_norm_spatial", "prelu", "max_pool",
                  "avg_pool", "adaptive_avg", "adaptive_max", "upsample_nearest", "upsample_bilinear", "zero_pad", "constant_pad_one", "reflect_pad",
                  "pad_channel_dim"]
BY_ID = {c[0]: c for c in CASES}


@pytest.mark.parametrize("name", CONSTANT_CASES)
def test_rule_constant_claims_hold_on_real_values(name):
    _, make, source, _ = BY_ID[name]
    model = Probe(make(), "bn")
    audit(model, model.example)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule_claims_hold_on_real_values(case):
    _, make, source, expect_removed = case
    model = Probe(make(), source)
    rep = audit(model, model.example)
    if expect_removed:
        assert rep["channels_removed"] > 0, rep
