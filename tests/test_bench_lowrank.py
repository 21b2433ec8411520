"""benchmarks/lowrank.py's baselines: a wrong truncation or parameter match would flatter low-rank STR."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lowrank as bench  # noqa: E402


def _lenet5() -> nn.Module:
    torch.manual_seed(0)
    return bench.load_arch("lenet5")().double()


def test_truncate_is_the_truncated_svd_of_every_layer_conv_included() -> None:
    model = _lenet5()
    ranks = {"conv1": 3, "conv2": 7, "fc1": 20, "fc2": 2}
    expected = bench.copy.deepcopy(model)
    with torch.no_grad():  # each weight replaced by its rank-r SVD approximation, in place
        for name, r in ranks.items():
            w = expected.get_submodule(name).weight
            u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
            w.copy_(((u[:, :r] * s[:r]) @ vh[:r]).reshape(w.shape))
    small = bench._truncate(bench.copy.deepcopy(model), ranks)
    assert isinstance(small.conv2, nn.Sequential) and small.conv2[0].out_channels == 7
    assert small.conv2[1].kernel_size == (1, 1) and small.fc1[0].out_features == 20
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    assert torch.allclose(small(x), expected(x), atol=1e-10, rtol=1e-9)
    assert bench._params_at(model, ranks) == bench.n_params(small)


def test_params_at_keeps_layers_where_factoring_does_not_pay() -> None:
    model = _lenet5()
    ranks = {"conv1": 20, "conv2": 46, "fc1": 400, "fc2": 10}  # all above their break-even ranks
    assert bench._params_at(model, ranks) == bench.n_params(model)
    assert bench.n_params(bench._truncate(bench.copy.deepcopy(model), ranks)) == bench.n_params(model)


def test_uniform_and_energy_ranks_match_the_parameter_target_from_below() -> None:
    model = _lenet5()
    target = 60_000
    for ranks in (bench._uniform_ranks(model, target), bench._energy_ranks(model, target)):
        got = bench._params_at(model, ranks)
        assert got <= target and got > 0.9 * target, (ranks, got)
    uni = bench._uniform_ranks(model, target)
    fracs = [uni[n] / f for n, f in bench._full_ranks(model).items() if uni[n] > 1]
    assert max(fracs) - min(fracs) < 0.1  # one fraction of full rank for every layer (up to rounding)


def test_aggregate_is_mean_and_sample_std_per_matched_run() -> None:
    runs = [{"method": "lrstr-qr", "knob": 5e-3, "error": e, "params": p, "seed": s,
             "ranks": {"fc1.weight": [r, 300]}} for s, (e, p, r) in enumerate([(2.0, 100, 10), (4.0, 300, 30)])]
    runs += [{"method": "svd-energy", "knob": 5e-3, "matched": "lrstr-qr", "error": 3.0, "params": 90, "seed": s,
              "ranks": {"fc1": 9}} for s in (0, 1)]
    rows = bench.aggregate(runs)
    lr = next(r for r in rows if r["method"] == "lrstr-qr")
    assert (lr["n"], lr["error_mean"], lr["params_mean"], lr["ranks_mean"]) == (2, 3.0, 200.0, {"fc1.weight": 20})
    assert abs(lr["error_std"] - 2 ** 0.5) < 1e-12
    table = bench.markdown_table(rows)
    assert "| lrstr-qr | 0.005 | 200 ± 141 | 20 | **3.00 ± 1.41** | 3.00 ± 0.00 (9) |" in table
