"""The pruning baselines in benchmarks/baselines.py: a wrong mask or schedule would flatter STR."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from baselines import (  # noqa: E402
    RewindSchedule,
    global_magnitude_masks,
    gmp_sparsity,
    iterative_densities,
    slimming_keep,
    uniform_magnitude_masks,
)


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # layers of very different scale: a global threshold must treat them differently
    return {"a": torch.randn(50, 20, generator=g), "b": 0.1 * torch.randn(300, generator=g)}


def test_global_masks_hit_sparsity_and_keep_the_largest() -> None:
    w = _weights()
    masks = global_magnitude_masks(w, 0.9)
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((m == 0).sum()) for m in masks.values())
    assert pruned == round(0.9 * total)
    kept = torch.cat([w[n][masks[n] == 1].abs() for n in w])
    dropped = torch.cat([w[n][masks[n] == 0].abs() for n in w])
    assert kept.min() >= dropped.max()
    # the small-scale layer loses more than the large one: a non-uniform budget
    assert (masks["b"] == 0).float().mean() > (masks["a"] == 0).float().mean()


def test_uniform_masks_prune_every_layer_alike() -> None:
    masks = uniform_magnitude_masks(_weights(), 0.75)
    for n, m in masks.items():
        assert int((m == 0).sum()) == round(0.75 * m.numel()), n
    w = _weights()["a"]
    m = masks["a"]
    assert w[m == 1].abs().min() >= w[m == 0].abs().max()


def test_masks_reject_bad_sparsity() -> None:
    with pytest.raises(ValueError):
        global_magnitude_masks(_weights(), 1.0)
    with pytest.raises(ValueError):
        uniform_magnitude_masks(_weights(), -0.1)


def test_gmp_schedule_is_cubic_and_monotone() -> None:
    vals = [gmp_sparsity(t, 0.9, 100, 1100) for t in range(0, 1300, 10)]
    assert vals[0] == 0.0 and vals[-1] == 0.9
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    # half-way the cubic has done 1 - 0.5^3 = 87.5 % of the work
    assert gmp_sparsity(600, 0.9, 100, 1100) == pytest.approx(0.9 * 0.875)
    with pytest.raises(ValueError):
        gmp_sparsity(5, 0.9, 10, 10)


def test_iterative_densities_end_at_target_with_equal_ratios() -> None:
    sp = iterative_densities(0.99, 3)
    assert sp[-1] == pytest.approx(0.99)
    d = [1 - s for s in sp]
    assert d[0] == pytest.approx(d[1] / d[0]) and d[1] / d[0] == pytest.approx(d[2] / d[1])


def test_slimming_keep_uses_one_global_threshold_and_keeps_one() -> None:
    gammas = {"l1": torch.tensor([0.01, 0.02, 0.03]), "l2": torch.tensor([0.5, -0.9, 0.04, 0.8])}
    keep = slimming_keep(gammas, 4 / 7)
    assert keep["l2"].tolist() == [True, True, False, True]
    assert keep["l1"].tolist() == [False, False, True]  # emptied by the threshold, largest revived


def test_rewind_schedule_spends_the_budget_and_rewinds_the_learning_rate() -> None:
    total, peak = 300, 0.05
    start = RewindSchedule()  # search a third of the budget from init, retrain with a fresh cosine
    assert start.steps(total) == (0, 100)
    assert start.search_lr_at(0, total, peak) == peak and start.search_lr_at(100, total, peak) == 0.0
    assert start.retrain_lr_at(0, total, peak) == peak
    late = RewindSchedule(rewind_at=0.3, ramp_start=0.3, ramp_end=0.45, search_end=0.5,
                          search_lr="global", retrain_lr="continue")
    rewind, stop = late.steps(total)
    assert (rewind, stop) == (90, 150)
    # the search follows the run's one cosine; retraining starts where the rewound weights were on it
    assert late.search_lr_at(90, total, peak) == pytest.approx(0.5 * peak * (1 + math.cos(0.3 * math.pi)))
    assert late.retrain_lr_at(0, total, peak) == pytest.approx(late.search_lr_at(90, total, peak))
    lrs = [late.retrain_lr_at(k, total, peak) for k in range(total - stop)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 1e-3 * peak
    with pytest.raises(ValueError, match="rewind_at"):
        RewindSchedule(rewind_at=0.5, ramp_start=0.3)
