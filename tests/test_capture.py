"""The torch.export front end: capture, the ATen graph's facts, and models written every which way."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strfx
from strfx.errors import TraceError
from strfx.passes.capture import capture
from strfx.passes.channel_analysis import UnionFind
from strfx.surgery import analyze, random_like


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.proj = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.stem(x)) + self.stem(x)
        return self.head(y.mean((2, 3)))


def test_capture_gives_aten_ops_with_shapes_and_parameter_names():
    model = Net().eval()
    gm = capture(model, (torch.randn(2, 3, 17, 19),))
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "aten.conv2d.default" in ops and "aten.linear.default" in ops
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"stem.0.weight", "stem.1.running_mean", "head.bias"} <= attrs
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "call_function"]
    assert all(isinstance(v, (torch.Tensor, tuple)) for v in vals)
    assert [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.name == "linear"] == [(2, 5)]


def test_analysis_changes_nothing_and_keeps_mixed_modes():
    model = Net().train()
    model.stem[1].eval()  # a frozen BatchNorm in a training model: mixed modes must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, analysis = analyze(model, (torch.randn(1, 3, 16, 16),))
    assert analysis.groups
    assert model.training and not model.stem[1].training and model.stem[0].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics untouched too


def test_deferred_union_find_matches_networkx_components():
    rng = np.random.default_rng(0)
    for n in (1, 7, 300):
        uf = UnionFind()
        ids = uf.new(n)
        g = nx.Graph()
        g.add_nodes_from(range(n))
        for _ in range(4):
            k = int(rng.integers(0, n))
            a, b = rng.integers(0, n, k), rng.integers(0, n, k)
            uf.union_arrays(ids[a], ids[b])
            g.add_edges_from(zip(a.tolist(), b.tolist()))
        chain = rng.permutation(n)[: max(n // 10, 1)]
        uf.union_all(chain)
        g.add_edges_from(zip(chain[:-1].tolist(), chain[1:].tolist()))
        roots = uf.roots()
        for comp in nx.connected_components(g):
            comp = sorted(comp)
            assert set(roots[comp].tolist()) == {comp[0]}  # one root per component: its smallest id


@pytest.mark.parametrize("mode", ["unstructured", "structured"])
def test_sparsify_and_shrink_keep_a_frozen_batchnorm_frozen(mode: str):
    model = Net().train()
    model.stem[1].eval()
    gm = strfx.sparsify(model, mode, example_inputs=(torch.randn(1, 3, 16, 16),))
    assert gm.training and gm.get_submodule("stem.0").training
    assert not gm.get_submodule("stem.1").training
    small = strfx.shrink(gm)
    assert small.training and not small.get_submodule("stem.1").training


def test_untraceable_model_is_one_line_naming_the_file():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    with pytest.raises(TraceError) as info:
        capture(Branchy(), (torch.randn(2, 4),))
    assert "test_capture.py" in str(info.value) and "\n" not in str(info.value)


def test_inputs_the_model_cannot_take_are_named_not_blamed_on_capture(capfd):
    """A model that fails eagerly on the example is not a capture problem: say so, quietly (torch logs the
    failing meta kernel's traceback at ERROR level)."""
    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * 2

    with pytest.raises(TraceError) as info:
        strfx.sparsify(Reads(), "structured", example_inputs=(torch.randn(2, 5),))
    msg = str(info.value)
    assert "Reads fails on the example inputs" in msg and "float32[2, 5]" in msg and "\n" not in msg, msg
    assert "test_capture.py" in msg and "self.fc(x) * 2" in msg, msg  # the user's line, not torch's
    assert "Traceback" not in capfd.readouterr().err


# --- models written in ways an fx tracer could not normalise (issue: keyword args, computed dims, views)
def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class KeywordCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = conv_bn(3, 8), nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        y = self.c(input=self.a(x))
        return self.fc(torch.flatten(input=y, start_dim=1))


class ComputedDim(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = conv_bn(3, 8), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(torch.cat([y, y], dim=y.dim() - 3)).mean((2, 3))


class InPlaceThroughView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 8), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        v = y.view(y.shape[0], 8, -1)
        v.add_(self.b(x).flatten(2))  # writes into y through the view: channels of y are no longer zero
        return self.c(y).mean((2, 3))


def _kill(bn: nn.BatchNorm2d, channels: list[int]) -> None:
    with torch.no_grad():
        bn.weight[channels] = 0.0
        bn.bias[channels] = 0.0


@pytest.mark.parametrize("cls,removed", [(KeywordCalls, 2), (ComputedDim, 2), (InPlaceThroughView, 0)])
def test_models_written_every_which_way_shrink_exactly(cls, removed):
    torch.manual_seed(0)
    m = cls().eval()
    _kill(m.a[1], [1, 5])
    x = torch.randn(2, 3, 4, 4)
    small = strfx.shrink(m, (x,))
    assert small.strfx_shrink["channels_removed"] == removed
    for seed in (3, 4):
        (y,) = random_like((x,), seed)
        with torch.no_grad():
            torch.testing.assert_close(small(y), m(y), rtol=1e-5, atol=1e-6)


class Stochastic(nn.Module):
    """Dropout and a drop-path written with F.dropout(training=self.training) and torch.rand."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 8), conv_bn(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.a(x)
        branch = self.b(y)
        if self.training:
            keep = (torch.rand(x.shape[0], 1, 1, 1) > 0.3).to(x.dtype)
            branch = branch * keep / 0.7
        y = y + branch
        return self.fc(F.dropout(y.mean((2, 3)), 0.5, training=self.training))


@pytest.mark.parametrize("mode", ["unstructured", "structured"])
def test_dropout_and_drop_path_still_train(mode):
    model = Stochastic().train()
    x = torch.randn(4, 3, 8, 8)
    sparse = strfx.sparsify(model, mode, example_inputs=(x,))
    sparse.train()
    torch.manual_seed(7)
    expected = model(x)
    torch.manual_seed(7)
    got = sparse(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.manual_seed(8)
    assert not torch.allclose(sparse(x), got)  # really random in train mode
    sparse.eval()
    torch.testing.assert_close(sparse(x), sparse(x))


class CachesABias(nn.Module):
    """Caches a tensor computed from a parameter in forward (timm's attention-bias caches do this)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = conv_bn(3, 8), nn.Linear(8, 3)
        self.bias_table = nn.Parameter(torch.randn(8))
        self.cache = None

    def forward(self, x):
        self.cache = self.bias_table * 2  # a non-leaf tensor left on the module
        return self.fc(self.a(x).mean((2, 3))) + self.cache[:3]


class CachesInADict(CachesABias):
    """timm's LeViT/EfficientViT keep their cache in a dict keyed by device."""

    def forward(self, x):
        self.cache = {str(x.device): self.bias_table * 2}
        return self.fc(self.a(x).mean((2, 3))) + self.cache[str(x.device)][:3]


@pytest.mark.parametrize("cls", [CachesABias, CachesInADict])
def test_models_holding_forward_caches_can_be_sparsified(cls):
    model = cls()
    model(torch.randn(2, 3, 4, 4))  # with gradients on: the cache is a non-leaf tensor (deepcopy refuses it)
    sparse = strfx.sparsify(model, "structured", example_inputs=(torch.randn(2, 3, 4, 4),))
    assert strfx.shrink(sparse).strfx_shrink["max_error"] <= 1e-4
