"""A model trained with network slimming (Liu et al. 2017), loaded into strfx and shrunk exactly.

Slimming trains with an L1 penalty on BatchNorm γ, then zeroes the γ below one global threshold; β stays, so
each pruned channel outputs the constant relu(β). `strfx transform --init` loads those weights, `strfx shrink`
removes the channels and folds the constants into the next layer's bias: the small model computes what the
slimmed model computes (float64 proof in shrink.json, float32 on fresh inputs here).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from click.testing import CliRunner

from strfx.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from baselines import slimming_keep  # noqa: E402 - slimming's own global-threshold rule

MODEL = '''
import torch
from torch import nn


class LeNetBN(nn.Module):
    """LeNet-5-style conv-BN-ReLU blocks (valid convolutions), the layout network slimming prunes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 12, 5, bias=False), nn.BatchNorm2d(12)
        self.c2, self.b2 = nn.Conv2d(12, 16, 5, bias=False), nn.BatchNorm2d(16)
        self.fc1, self.b3 = nn.Linear(16 * 2 * 2, 24, bias=False), nn.BatchNorm1d(24)
        self.fc2 = nn.Linear(24, 4)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = torch.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        return self.fc2(torch.relu(self.b3(self.fc1(torch.flatten(x, 1)))))


def build_model():
    return LeNetBN()


def example_inputs():
    return (torch.randn(2, 1, 20, 20),)
'''


def _slimming(model_file: Path, steps: int = 60, prune: float = 0.4) -> tuple[torch.nn.Module, int]:
    """Slimming's recipe in small: SGD with L1 (1e-2) on every γ, then γ = 0 below one global threshold."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slim_model", model_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build_model()
    g = torch.Generator().manual_seed(0)
    proto = torch.randn(4, 1, 20, 20, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    for _ in range(steps):
        y = torch.randint(0, 4, (32,), generator=g)
        x = proto[y] + 0.5 * torch.randn(32, 1, 20, 20, generator=g)
        loss = F.cross_entropy(model(x), y) + 1e-2 * sum(m.weight.abs().sum() for m in bns.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    keep = slimming_keep({n: m.weight for n, m in bns.items()}, prune)
    with torch.no_grad():
        for n, m in bns.items():
            m.weight[~keep[n]] = 0.0  # β untouched: the channel is the constant relu(β)
    pruned = sum(int((~k).sum()) for k in keep.values())
    return model.eval(), pruned


def test_a_slimming_trained_model_is_loaded_and_shrunk_exactly(tmp_path: Path) -> None:
    model_file = tmp_path / "lenet_bn.py"
    model_file.write_text(MODEL)
    slimmed, pruned = _slimming(model_file)
    assert pruned >= 15  # 40 % of 52 channels
    n_constant = sum(int(((m.weight == 0) & (m.bias > 0)).sum()) for m in slimmed.modules()
                     if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    assert n_constant >= 3, "the scenario needs pruned channels with relu(β) > 0 (constants to fold)"
    torch.save(slimmed.state_dict(), tmp_path / "slim.pt")

    cli = CliRunner()
    res = cli.invoke(main, ["transform", str(model_file), "--init", str(tmp_path / "slim.pt"), "--mode",
                            "structured", "-o", str(tmp_path / "run")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = cli.invoke(main, ["shrink", str(tmp_path / "run"), "-o", str(tmp_path / "small"), "--json"],
                     catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "small" / "shrink.json").read_text())
    assert rep["channels_removed"] == pruned  # every channel slimming pruned, nothing else
    assert rep["constant_channels_folded"] > 0 and rep["constant_channels_kept"] == []
    assert rep["shrink_max_error64"] is not None and rep["shrink_max_error64"] <= 1e-12
    # a pruned channel with β > 0 is the constant relu(β) (folded into the next layer's bias, which the
    # bias-less conv and linear get for it); with β ≤ 0 it is zero
    assert rep["constant_channels_folded"] == n_constant

    small = torch.export.load(tmp_path / "small" / "model.pt2").module()
    for seed in range(3):
        x = 3.0 * torch.randn(5, 1, 20, 20, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            torch.testing.assert_close(small(x), slimmed(x), rtol=1e-5, atol=1e-5)


def test_init_that_does_not_fit_is_one_line(tmp_path: Path) -> None:
    model_file = tmp_path / "lenet_bn.py"
    model_file.write_text(MODEL)
    torch.save({"c1.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    res = CliRunner().invoke(main, ["transform", str(model_file), "--init", str(tmp_path / "bad.pt"), "-o",
                                    str(tmp_path / "run")])
    assert res.exit_code != 0
    assert "--init" in res.output and "does not fit" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()
