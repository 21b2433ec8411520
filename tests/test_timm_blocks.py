"""timm building blocks that once got a wrong cut (issue 10): an SE block after BatchNormAct2d
(efficientnetv2_rw_t, fbnetv3_b). Small models from timm's own layers; the full models are in the zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import strfx
import strfx._torchvision  # noqa: F401 - lets timm import torchvision on CPU-only wheels
from strfx.testing import kill_channels, randomize_
from strfx.verify import compare_outputs, verification_inputs

timm_layers = pytest.importorskip("timm.layers")
blocks = pytest.importorskip("timm.models._efficientnet_blocks")


class SEAfterBNAct(nn.Module):
    def __init__(self, gate: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = timm_layers.BatchNormAct2d(16, act_layer=nn.SiLU)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = timm_layers.BatchNormAct2d(16, act_layer=nn.SiLU)
        gate_layer = nn.Sigmoid if gate == "sigmoid" else nn.Hardsigmoid
        self.se = blocks.SqueezeExcite(16, rd_ratio=0.25, gate_layer=gate_layer)
        self.pw = nn.Conv2d(16, 8, 1, bias=False)
        self.bn3 = timm_layers.BatchNormAct2d(8, apply_act=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.bn2(self.dw(self.bn1(self.stem(x))))
        return self.fc(self.bn3(self.pw(self.se(y))).mean((2, 3)))


@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_se_after_batchnormact_shrinks_exactly(gate):
    torch.manual_seed(0)
    model = randomize_(SEAfterBNAct(gate)).eval()
    x = torch.randn(2, 3, 8, 8)
    s = strfx.sparsify(model, "structured", example_inputs=(x,))
    counts = kill_channels(s, 0.5, example_inputs=(x,))
    assert counts["channels"] > 0
    small = strfx.shrink(s, (x,))
    rep = small.strfx_shrink
    assert rep["channels_removed"] == counts["channels"]
    assert rep["max_error64"] is not None and rep["max_error64"] <= 1e-9
    with torch.no_grad():
        s.eval()
        for inp in verification_inputs((x,), seed=2):
            assert compare_outputs(small(*inp.inputs), s(*inp.inputs)).ok(1e-5), inp.kind
