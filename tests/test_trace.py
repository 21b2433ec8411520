"""Shape recording runs on meta tensors, falls back honestly, and analysis leaves the model alone."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

from strfx.config import TraceConfig
from strfx.passes.channel_analysis import UnionFind
from strfx.passes.trace import record_shapes, trace
from strfx.surgery import analyze


class Spy(nn.Module):
    """A leaf that remembers which device its inputs were on."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[str] = []
        self.proj = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.devices.append(x.device.type)
        return self.proj(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.spy = Spy()
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.spy(self.stem(x)) + self.stem(x)
        return self.head(y.mean((2, 3)))


def _shapes(gm: torch.fx.GraphModule) -> dict[str, tuple[int, ...]]:
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if hasattr(n.meta.get("tensor_meta"), "shape")}


def test_shapes_are_recorded_on_meta_tensors_and_match_a_real_run():
    from torch.fx.passes.shape_prop import ShapeProp

    model = Net().eval()
    x = torch.randn(2, 3, 17, 19)
    gm = trace(model, config=TraceConfig(leaf_modules=["Spy"]))
    model.spy.devices.clear()
    record_shapes(gm, (x,))
    assert model.spy.devices == ["meta"]  # no real forward pass
    assert all(p.device.type == "cpu" for p in model.parameters())  # weights restored
    real = trace(model, config=TraceConfig(leaf_modules=["Spy"]))
    ShapeProp(real).propagate(x)
    assert _shapes(gm) == _shapes(real) and len(_shapes(gm)) > 8


class MakesACpuConstant(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, 1)  # a CPU tensor mixed with x


def test_graphs_meta_tensors_cannot_run_fall_back_to_fake_tensors():
    gm = trace(nn.Sequential(nn.Conv1d(2, 4, 3), MakesACpuConstant(), nn.Conv1d(4, 3, 1)))
    record_shapes(gm, (torch.randn(1, 2, 10),))
    assert list(_shapes(gm).values())[-1] == (1, 3, 8)


def test_analysis_shares_the_models_modules_but_changes_nothing():
    model = Net().train()
    model.stem[1].eval()  # a frozen BatchNorm in a training model: mixed modes must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    gm, analysis = analyze(model, (torch.randn(1, 3, 16, 16),))
    assert analysis.groups
    assert model.training and not model.stem[1].training and model.stem[0].training
    assert [id(p) for p in model.parameters()] == params
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
    import strfx

    model = Net().train()
    model.stem[1].eval()
    gm = strfx.sparsify(model, mode, example_inputs=(torch.randn(1, 3, 16, 16),))
    assert gm.training and gm.get_submodule("stem.0").training
    assert not gm.get_submodule("stem.1").training
    small = strfx.shrink(gm)
    assert small.training and not small.get_submodule("stem.1").training


class HalfReLU(nn.ReLU):
    """A subclass of a shape-preserving module that does change the shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[:, : x.shape[1] // 2]


def test_shape_shortcuts_apply_to_exact_module_types_only():
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), HalfReLU()),
               config=TraceConfig(leaf_modules=["HalfReLU"]))
    record_shapes(gm, (torch.randn(2, 3, 8, 8),))
    assert list(_shapes(gm).values())[-1] == (2, 2, 6, 6)
