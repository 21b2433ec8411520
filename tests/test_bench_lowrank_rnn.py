"""benchmarks/lowrank_rnn.py's own logic: the fixed-rank baseline must have exactly low-rank STR's shrunk
parameter count, and the SVD baseline must truncate the LSTM input projection exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lowrank_rnn import LSTMClassifier, builder, n_params, reinit, truncate  # noqa: E402

import strfx  # noqa: E402
from strfx.lowrank import FactoredRNN, lowrank_parametrizations  # noqa: E402


def _kill_ranks(model: nn.Module, keep: int) -> None:
    """Leave ``keep`` singular values above each threshold (as training with σ decay would)."""
    with torch.no_grad():
        for mod, tname, _ in lowrank_parametrizations(model).values():
            sigma = getattr(mod.parametrizations, tname).original1
            sigma[keep:] = -1.0


def test_fixed_rank_lstm_has_strs_shrunk_parameters_and_fresh_weights():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 28, 28)
    lr = strfx.sparsify(LSTMClassifier(16), "lowrank", example_inputs=(x,),
                        config={"lowrank": {"orthogonality": "none"}})
    _kill_ranks(lr, 3)
    small = strfx.shrink(lr, (x,))
    assert isinstance(small.lstm, FactoredRNN) and small.lstm.rnn.input_size == 3
    fixed = reinit(small, LSTMClassifier(16))
    assert n_params(fixed) == n_params(small) < n_params(LSTMClassifier(16))
    assert [type(m) for m in fixed.modules()] == [type(m) for m in small.modules()]
    assert not torch.equal(fixed.lstm.proj.weight, small.lstm.proj.weight)
    assert fixed(x).shape == (3, 10)


def test_fixed_rank_fastgrnn_keeps_the_cells_own_init():
    torch.manual_seed(0)
    build = builder("fastgrnn")
    small = truncate(build(), {"cell.W.weight": 4, "cell.U.weight": 5})
    with torch.no_grad():
        small.cell.bias_z.zero_()  # as if trained
    fixed = reinit(small, build())
    assert isinstance(fixed.cell.W, nn.Sequential) and isinstance(fixed.cell.U, nn.Sequential)
    assert n_params(fixed) == n_params(small) == n_params(build()) - (28 * 64 - 4 * 92) - (64 * 64 - 5 * 128)
    assert torch.equal(fixed.cell.bias_z, torch.ones(64))  # the cell's init, not the trained value


@pytest.mark.parametrize("rank", [3, 5])
def test_truncate_lstm_input_projection_is_exact_at_its_rank(rank):
    torch.manual_seed(0)
    model = LSTMClassifier(8).double()
    with torch.no_grad():
        model.lstm.weight_ih_l0.copy_(torch.randn(32, 3, dtype=torch.double) @ torch.randn(3, 28, dtype=torch.double))
    x = torch.randn(4, 1, 28, 28, dtype=torch.double)
    ref = model(x)
    cut = truncate(model, {"lstm.weight_ih_l0": rank})
    assert isinstance(cut.lstm, FactoredRNN) and cut.lstm.rnn.input_size == rank
    assert (cut(x) - ref).abs().max() < 1e-10


def test_truncate_rank_zero_linear_is_the_zero_map_plus_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    bias = model[0].bias.detach().clone()
    cut = truncate(model, {"0.weight": 0})  # in place
    assert n_params(cut) == 4 and torch.equal(cut(torch.randn(3, 6)), bias.expand(3, 4))
