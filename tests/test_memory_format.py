"""A cut keeps the memory format the model was written for: a channels-last model's own `.view` still works."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import strfx
from strfx.testing import kill_channels


class ChannelsLastHead(nn.Module):
    """`permute(0, 2, 3, 1).view(b, -1)` is legal only while the conv's output is channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.c1(x)))
        return self.fc(y.permute(0, 2, 3, 1).view(y.shape[0], -1))


def test_a_channels_last_model_shrinks_in_its_own_class_and_stays_channels_last() -> None:
    torch.manual_seed(0)
    model = ChannelsLastHead().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 4, 4)
    sparse = strfx.sparsify(model, "structured", example_inputs=(x,))
    assert kill_channels(sparse, 0.5, example_inputs=(x,))["channels"] == 4
    small = strfx.shrink(sparse, (x,))
    rep = small.strfx_shrink
    assert rep["result"] == "eager", rep["note"]
    assert small.c1.out_channels == 4 and small.fc.in_features == 4 * 4 * 4
    assert small.c1.weight.is_contiguous(memory_format=torch.channels_last) and not small.c1.weight.is_contiguous()
    assert rep["max_error64"] <= 1e-9


def test_views_of_the_cut_graph_become_reshapes() -> None:
    """The cut graph is functional, so a view may be a copy: a layout a kernel changes after the cut cannot
    make it fail (CPU attention picks its output layout by head size; timm's cpubone)."""
    from strfx.passes.channel_analysis import analyze_channels
    from strfx.passes.capture import capture
    from strfx.passes.shrink import shrink_graph

    torch.manual_seed(0)
    model = ChannelsLastHead().eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        model.bn.weight[:4] = 0
        model.bn.bias[:4] = 0
    x = torch.randn(2, 3, 4, 4)
    gm = capture(model, (x,))
    views = [n for n in gm.graph.nodes if n.target == torch.ops.aten.view.default]
    assert views
    shrink_graph(gm, analyze_channels(gm))
    assert not [n for n in gm.graph.nodes if n.target == torch.ops.aten.view.default]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
