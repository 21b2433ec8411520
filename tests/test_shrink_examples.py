"""strfx.shrink end to end on the example models, with channels killed through STR."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import strfx
from strfx.loader import load_model
from strfx.modules import channel_carriers
from strfx.surgery import random_like
from strfx.testing import kill_channels, random_cnn, randomize_

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _no_strfx(m: nn.Module) -> bool:
    return not any(type(mod).__module__.startswith("strfx.") for mod in m.modules()) and not any(
        hasattr(mod, "parametrizations") for mod in m.modules())


@pytest.mark.parametrize("name", ["resnet20", "custom_residual", "lenet5"])
@pytest.mark.parametrize("seed", [0, 1])
def test_examples_shrink_after_killing_channels(name, seed):
    loaded = load_model(str(EXAMPLES / f"{name}.py"))
    randomize_(loaded.model, seed)
    gm = strfx.sparsify(loaded.model, "structured", example_inputs=loaded.example_inputs)
    counts = kill_channels(gm, (0.3, 0.5), seed=seed)
    assert counts["channels"] > 0
    small = strfx.shrink(gm)
    rep = small.strfx_shrink
    assert rep["params_after"] < rep["params_before"]
    assert rep["channels_removed"] >= counts["channels"] * 0.5
    assert _no_strfx(small)
    with torch.no_grad():
        gm.eval(), small.eval()
        x = random_like(loaded.example_inputs, 99)
        torch.testing.assert_close(small(*x), gm(*x), rtol=1e-4, atol=1e-5)


def test_kill_channels_zeroes_str_parameters_and_leaves_one_alive():
    loaded = load_model(str(EXAMPLES / "resnet20.py"))
    gm = strfx.sparsify(loaded.model, "structured", example_inputs=loaded.example_inputs)
    kill_channels(gm, 0.99, seed=0)
    carriers = channel_carriers(gm).values()
    for c in carriers:
        assert (c.value() != 0).any()
    assert any(c.kind == "bn" and (c.value() == 0).any() for c in carriers)


def test_unstructured_removes_whole_zero_filters_only():
    loaded = load_model(str(EXAMPLES / "lenet5.py"))
    gm = strfx.sparsify(loaded.model, "unstructured", example_inputs=loaded.example_inputs)
    conv1 = gm.get_submodule("conv1")
    with torch.no_grad():
        # lenet5's convs have biases: a dead filter also needs a zero bias to output exact zeros
        conv1.parametrizations.weight.original[[2, 7, 11]] = 0.0
        conv1.bias[[2, 7, 11]] = 0.0
        conv1.parametrizations.weight.original[3, 0, 0, 0] = 0.0  # a single zero weight stays
    small = strfx.shrink(gm)
    assert small.get_submodule("conv1").out_channels == 17
    assert small.get_submodule("conv2").in_channels == 17
    assert (small.get_submodule("conv1").weight == 0).sum() == 1
    assert small.strfx_shrink["weight_sparsity"] > 0
    assert _no_strfx(small)


def test_shrunk_model_state_dict_reloads_with_weights_only(tmp_path):
    m, x = random_cnn(3)
    gm = strfx.sparsify(m, "structured", example_inputs=x)
    kill_channels(gm, 0.4, seed=3)
    small = strfx.shrink(gm)
    torch.save(small.state_dict(), tmp_path / "w.pt")
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert set(state) == set(small.state_dict())


def test_structured_report_shrunk_flops_are_the_shrunk_models():
    from torch.utils.flop_counter import FlopCounterMode

    loaded = load_model(str(EXAMPLES / "resnet20.py"))
    gm = strfx.sparsify(loaded.model, "structured", example_inputs=loaded.example_inputs)
    assert strfx.report(gm).shrunk_flops == strfx.report(gm).dense_flops
    kill_channels(gm, 0.5, seed=0)
    rep = strfx.report(gm)
    assert strfx.report(gm, shrunk_flops=False).shrunk_flops is None
    small = strfx.shrink(gm).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        small(*loaded.example_inputs)
    assert rep.shrunk_flops == counter.get_total_flops() < rep.dense_flops


@pytest.mark.parametrize("mode", ["structured", "unstructured"])
def test_shrink_leaves_the_input_model_untouched_and_shares_nothing(mode):
    model, x = random_cnn(5)
    gm = strfx.sparsify(model, mode, example_inputs=x)
    if mode == "structured":
        kill_channels(gm, 0.5, seed=5)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    small = strfx.shrink(gm)
    after = gm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ours = {t.data_ptr() for t in [*gm.parameters(), *gm.buffers()] if t.numel()}
    assert not any(t.data_ptr() in ours for t in [*small.parameters(), *small.buffers()] if t.numel())


def test_kill_channels_round_to_keeps_widths_multiples_of_eight() -> None:
    lm = load_model(str(EXAMPLES / "resnet20.py"))
    gm = strfx.sparsify(lm.model, "structured", example_inputs=lm.example_inputs)
    counts = kill_channels(gm, 0.6, seed=1, round_to=8)
    assert counts["channels"] > 0
    small = strfx.shrink(gm)
    widths = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths
    assert sum(widths) < sum(m.out_channels for m in lm.model.modules() if isinstance(m, nn.Conv2d))
