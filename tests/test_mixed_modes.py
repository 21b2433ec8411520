"""Structured + low-rank in one sparsify call: channels are cut first, then each layer is factored at its rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import strfx
from strfx.cli import main
from strfx.errors import ConfigError
from strfx.lowrank import lowrank_parametrizations, ranks
from strfx.modules import channel_carriers

ROOT = Path(__file__).resolve().parents[1]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, stride=2), nn.ReLU(),
                         nn.Conv2d(32, 48, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(48 * 16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_channels_are_cut_then_every_layer_is_factored_at_its_rank_exactly(tmp_path: Path) -> None:
    model = strfx.sparsify(_net(), "structured+lowrank", example_inputs=(X,)).eval()
    assert strfx.api.sparsify_config(model).ranks
    assert len(lowrank_parametrizations(model)) == 5 and len(channel_carriers(model)) == 4
    with torch.no_grad():  # what training leaves: ranks 4 everywhere, 5 units of each channel group dead
        for mod, t, _ in lowrank_parametrizations(model).values():
            mod.parametrizations[t].original1[4:] = 0
        for carrier in channel_carriers(model).values():
            carrier.raw[1:6] = 0
    assert {r for r, _ in ranks(model).values()} == {4}

    small = strfx.shrink(model, (X,))
    rep = small.strfx_shrink
    assert rep["max_error64"] < 1e-12 and rep["result"] == "eager"  # the cut and the factoring, in float64
    assert "5 of 5 low-rank layers factored" in " ".join(rep["notes"])
    first, last = small[5][0], small[9][1]  # Linear(in, 4, bias=False) then Linear(4, out)
    assert (first.in_features, first.out_features) == ((48 - 10) * 16, 4)  # conv2's 2 groups lost 5 each
    assert (last.in_features, last.out_features) == (4, 10)
    assert small[2][0].groups == 2 and small[2][0].out_channels == 2 * 4  # a grouped conv: r filters per group
    assert rep["params_after"] < 0.1 * rep["params_before"]
    assert all(isinstance(p, nn.Parameter) for p in small.parameters()) and \
        sum(p.numel() for p in small.parameters()) == rep["params_after"]

    onnx = strfx.export(small, tmp_path / "m.onnx", (X,), reference=model, repeats=2)
    assert onnx.onnx_max_error <= onnx.tolerance


def test_ranks_need_structured_mode() -> None:
    with pytest.raises(ConfigError, match="ranks composes learned ranks with structured mode"):
        strfx.sparsify(_net(), "unstructured", example_inputs=(X,), config={"ranks": True})


def test_cli_transform_and_shrink_in_structured_plus_lowrank_mode(tmp_path: Path) -> None:
    run = CliRunner().invoke(main, ["transform", str(ROOT / "examples" / "lenet300.py"), "--mode",
                                    "structured+lowrank", "-o", str(tmp_path / "t")])
    assert run.exit_code == 0, run.output
    assert "ranks: true" in (tmp_path / "t" / "config.yaml").read_text()
    res = CliRunner().invoke(main, ["shrink", str(tmp_path / "t"), "-o", str(tmp_path / "s"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    # nothing trained, nothing cut; FLOPs are the layers' own (not the U·diag(σ')·Vᵀ that builds each weight)
    assert rep["flops_before"] == rep["flops_after"] == 2 * 2 * (784 * 300 + 300 * 100 + 100 * 10)
