"""strfx.rewind: STR's dead units kept, every other value from an earlier state; shrink stays exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import strfx
from strfx.errors import StrfxError
from strfx.modules import channel_carriers, str_weights


class Net(nn.Module):
    """conv-BN (STR-BN carrier) → conv without norm (importance vector) → linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


def _x(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _train_stand_in(model: nn.Module, kill: dict[str, list[int]]) -> None:
    """What STR training leaves: every parameter moved, thresholds raised, some units below them."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.add_(0.3 * torch.randn(p.shape, generator=g))
    carriers = channel_carriers(model)
    for name, idx in kill.items():
        carriers[name].raw[idx] = 0.5 * carriers[name].threshold().expand(len(idx))


def _sparse(mode: str) -> nn.Module:
    torch.manual_seed(0)
    return strfx.sparsify(Net().eval(), mode, example_inputs=(_x(),)).eval()


def test_structured_rewind_equals_the_start_model_with_those_units_cut() -> None:
    model = _sparse("structured")
    names = sorted(channel_carriers(model))
    kill = {names[0]: [1, 4], names[1]: [0, 2, 5]}
    start = copy.deepcopy(model.state_dict())
    _train_stand_in(model, kill)

    info = strfx.rewind(model, start)
    assert info["dead"] == 5

    reference = _sparse("structured")  # built independently: the start weights, the same units zeroed by hand
    reference.load_state_dict(start)
    with torch.no_grad():
        for name, idx in kill.items():
            channel_carriers(reference)[name].raw[idx] = 0.0
    x = _x(5, seed=3)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    for name, c in channel_carriers(model).items():  # alive units: the start values; dead ones: zero
        v, v0 = c.value(), channel_carriers(reference)[name].value()
        torch.testing.assert_close(v, v0, rtol=0, atol=0)
        assert int((v == 0).sum()) == len(kill.get(name, []))

    small = strfx.shrink(model, example_inputs=(_x(),))
    assert small.c1.out_channels == 6 and small.c2.out_channels == 3
    assert small.strfx_shrink["max_error64"] < 1e-12  # the cut, applied in float64, against the rewound model
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_unstructured_rewind_keeps_the_pruned_weights_at_zero_and_the_rest_from_the_start() -> None:
    model = _sparse("unstructured")
    start = copy.deepcopy(model.state_dict())
    with torch.no_grad():  # training moved the weights and raised c2's threshold
        for p in model.parameters():
            p.add_(0.05)
        str_weights(model)["c2.weight"].s.fill_(-2.5)
    dead = {n: m.clone() for n, m in strfx.dead_masks(model).items()}
    assert 0 < int(dead["c2.weight"].sum()) < dead["c2.weight"].numel()

    strfx.rewind(model, start)
    w = model.c2.weight
    assert bool((w[dead["c2.weight"]] == 0).all())
    reference = _sparse("unstructured")
    reference.load_state_dict(start)
    keep = ~dead["c2.weight"]
    torch.testing.assert_close(w[keep], reference.c2.weight[keep], rtol=0, atol=0)
    torch.testing.assert_close(model.c1.weight, reference.c1.weight, rtol=0, atol=0)  # nothing died there


def test_rewind_refuses_masks_of_another_model_and_low_rank() -> None:
    model = _sparse("structured")
    start = copy.deepcopy(model.state_dict())
    with pytest.raises(StrfxError, match="masks name STR tensors this model does not have"):
        strfx.rewind(model, start, masks={"nope": torch.zeros(3, dtype=torch.bool)})
    lowrank = strfx.sparsify(Net().eval(), "lowrank", example_inputs=(_x(),))
    with pytest.raises(StrfxError, match="low-rank"):
        strfx.rewind(lowrank, copy.deepcopy(lowrank.state_dict()))
