"""Models that once got a wrong rule (issue 10): each must shrink exactly or be refused clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strfx
from strfx.errors import StrfxError
from strfx.verify import compare_outputs, verification_inputs


def dead_conv(cin: int, cout: int, dead=(1, 3)) -> nn.Conv2d:
    c = nn.Conv2d(cin, cout, 3, padding=1)
    with torch.no_grad():
        c.weight[list(dead)] = 0
        c.bias[list(dead)] = 0
    return c


class LayerNormDynamicShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.d = dead_conv(3, 8), dead_conv(8, 8)

    def forward(self, x):
        y = self.d(F.relu(self.c(x)))
        return F.layer_norm(y, y.shape[1:])


class DivideByWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.d = dead_conv(3, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.c(x))
        return self.d(y / y.shape[1])


class UnflattenAfterLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.u, self.c = nn.Linear(12, 32), nn.Unflatten(1, (8, 2, 2)), nn.Conv2d(8, 4, 1)
        with torch.no_grad():  # channels 0 and 2 of the unflattened map are dead
            for c in (0, 2):
                self.fc.weight[4 * c:4 * c + 4] = 0
                self.fc.bias[4 * c:4 * c + 4] = 0

    def forward(self, x):
        return self.c(self.u(self.fc(x)))


class ExpandConstantSizes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.d = dead_conv(3, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.c(x))
        return self.d(y.mean((2, 3), keepdim=True).expand(2, 8, 6, 6) * y)


class SharedConv(nn.Module):
    """One conv applied to the raw input and to its own output."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.d = dead_conv(3, 3, dead=(1,)), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.d(self.c(F.relu(self.c(x))) + self.c(x))


class SharedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(6, 6), nn.Linear(6, 2)
        with torch.no_grad():
            self.fc.weight[2] = 0
            self.fc.bias[2] = 0

    def forward(self, x):
        return self.out(self.fc(F.relu(self.fc(x))) + self.fc(x))


class SharedNorm(nn.Module):
    """One BatchNorm applied to the raw input and to a feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.bn, self.d = dead_conv(3, 3, dead=(1,)), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.bn.weight[1] = 0
            self.bn.bias[1] = 0

    def forward(self, x):
        return self.d(self.bn(self.c(x)) + self.bn(x))


class SharedScale(nn.Module):
    """One per-channel scale applied to the raw input and to a feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.d = dead_conv(3, 3, dead=(1,)), nn.Conv2d(3, 4, 1)
        self.g = nn.Parameter(torch.rand(1, 3, 1, 1) + 0.5)

    def forward(self, x):
        return self.d(self.c(x) * self.g + x * self.g)


class PadChannelDim(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.p, self.d = dead_conv(3, 8), nn.ConstantPad3d((0, 0, 0, 0, 1, 0), 0.0), nn.Conv2d(9, 4, 1)

    def forward(self, x):
        return self.d(self.p(F.relu(self.c(x))))


class MutatesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.d = dead_conv(3, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x.mul_(2)
        return self.d(F.relu(self.c(x)))


class ShapeOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.d = dead_conv(3, 8), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.d(F.relu(self.c(x)))
        return y.sum((2, 3)), y.shape[1]


IMAGE = (2, 3, 6, 6)
CASES = [
    (LayerNormDynamicShape, IMAGE, 2), (DivideByWidth, IMAGE, 2), (UnflattenAfterLinear, (2, 12), 2),
    (ExpandConstantSizes, IMAGE, 2), (SharedConv, IMAGE, 0), (SharedLinear, (2, 6), 0), (SharedNorm, IMAGE, 0),
    (SharedScale, IMAGE, 0), (PadChannelDim, IMAGE, None), (MutatesInput, IMAGE, 2), (ShapeOutput, IMAGE, 2),
]


@pytest.mark.parametrize("cls,shape,removed", CASES, ids=[c[0].__name__ for c in CASES])
def test_edge_model_shrinks_exactly_or_is_refused(cls, shape, removed):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(*shape)
    try:
        small = strfx.shrink(model, (x.clone(),))
    except StrfxError as err:  # a refusal is allowed only where no exact cut is expected
        assert removed is None, f"refused: {err}"
        assert "\n" not in str(err).strip()
        return
    rep = small.strfx_shrink
    if removed is not None:
        assert rep["channels_removed"] == removed
    assert rep["max_error64"] is not None and rep["max_error64"] <= 1e-9
    with torch.no_grad():  # independent check on the whole output pytree, fresh inputs
        for s in verification_inputs((x,), seed=5):
            cmp = compare_outputs(small(*[t.clone() for t in s.inputs]), model(*[t.clone() for t in s.inputs]))
            assert cmp.ok(1e-5), (s.kind, cmp)
