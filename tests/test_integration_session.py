"""strfx.integrations.STRSession in a plain PyTorch loop (no extra needed): what both callbacks are built on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import strfx
from strfx.errors import StrfxError
from strfx.integrations import STRSession, str_optimizer

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return strfx.sparsify(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)),
                          "unstructured", example_inputs=(X,))


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_plain_loop_lands_the_target_with_sgd_and_adamw(kind: str) -> None:
    model = _model()
    opt = str_optimizer(model, lr=0.05 if kind == "sgd" else 3e-3, optimizer=kind)
    session = STRSession(target_sparsity=0.3)
    session.attach(model)
    session.start(opt, total_steps=128)
    assert session.controller is not None and session.controller.momentum == (0.875 if kind == "sgd" else 0.0)
    g = torch.Generator().manual_seed(0)
    logged = []
    for step in range(1, 129):
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        logged.append(session.after_step(opt, step))
    assert abs(session.meter() - 0.3) <= 0.03
    assert logged[-1] is not None and set(logged[-1]) == {"strfx/sparsity", "strfx/target_now", "strfx/threshold_decay"}
    assert session.after_step(opt, 128) is None  # the same step twice (gradient accumulation) updates once


def test_session_refuses_what_it_cannot_steer() -> None:
    with pytest.raises(StrfxError, match="between 0 and 1"):
        STRSession(target_sparsity=50)
    model = _model()
    session = STRSession(target_sparsity=0.5)
    session.attach(model)
    from strfx.api import param_groups

    with pytest.raises(StrfxError, match="needs SGD or AdamW .* not Adam"):
        session.start(torch.optim.Adam(param_groups(model), lr=1e-3), total_steps=10)
    with pytest.raises(StrfxError, match="no 'thresholds' parameter group"):
        session.start(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)
    with pytest.raises(StrfxError, match="number of optimizer steps in advance"):
        session.start(str_optimizer(model, lr=0.1), total_steps=float("inf"))  # type: ignore[arg-type]


def test_rewind_ramp_keeps_the_weights_from_before_the_thresholds_rise() -> None:
    torch.manual_seed(0)
    model = strfx.sparsify(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)),
                           "structured", example_inputs=(X,))
    opt = str_optimizer(model, lr=0.05)
    assert STRSession(0.5, rewind="ramp").controller_config.ramp_start == 0.6  # rewind's default: unpushed to 60 %
    session = STRSession(target_sparsity=0.5, rewind="ramp", controller={"ramp_start": 0.05, "ramp_end": 0.6})
    session.attach(model)
    session.start(opt, total_steps=100)
    assert session.rewind_step == 5 and session.rewind_state is None  # controller.ramp_start 0.05 of 100 steps
    g = torch.Generator().manual_seed(0)
    for step in range(1, 101):
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        session.after_step(opt, step)
        if step == 5:
            after_5 = {k: v.clone() for k, v in model.state_dict().items()}
    assert session.rewind_state is not None
    for key, value in after_5.items():
        torch.testing.assert_close(session.rewind_state[key], value, rtol=0, atol=0)
    small = session.rewound()
    dead = int((model[1].weight.abs().sum(1) == 0).sum())  # hidden units STR killed in the trained model
    assert small.strfx_rewind["dead"] == dead > 0 and small[1].out_features == 32 - dead
    assert small.strfx_shrink["max_error64"] < 1e-12
    alive = model[1].weight.abs().sum(1) != 0
    early = session.rewind_state["1.parametrizations.weight.original"][alive]
    scale = small[1].weight / early  # each kept row: the early row times its (early) importance, one number per row
    torch.testing.assert_close(scale, scale[:, :1].expand_as(scale))


def test_rewind_needs_a_target_for_ramp_and_a_kept_state() -> None:
    with pytest.raises(StrfxError, match="rewind='ramp' rewinds to where"):
        STRSession(rewind="ramp")
    session = STRSession(target_sparsity=0.5)
    session.attach(_model())
    with pytest.raises(StrfxError, match="no earlier weights kept"):
        session.rewound()
