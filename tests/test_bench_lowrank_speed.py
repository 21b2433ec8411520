"""benchmarks/lowrank_speed.py's own logic: a wrong rank plan or attention rewrite would skew its table."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lowrank_speed import QKVAttention, flops, kill_ranks, plan_ranks, rank_for  # noqa: E402

import strfx  # noqa: E402
from strfx.lowrank import ranks  # noqa: E402


def test_rank_for_rounds_up_and_clamps():
    assert rank_for(100, 0.404, 1) == 40
    assert rank_for(100, 0.404, 8) == 40 and rank_for(100, 0.41, 8) == 48
    assert rank_for(100, 0.0, 1) == 1 and rank_for(20, 0.99, 8) == 20


def test_plan_halves_the_measured_flops_and_kill_gives_those_ranks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(64 * 8 * 8, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    x = torch.randn(1, 3, 8, 8)
    dense = flops(model, x)
    lr = strfx.sparsify(model, "lowrank", example_inputs=(x,), config={"lowrank": {"orthogonality": "none"}})
    frac, rank, predicted = plan_ranks(lr, x, dense, 2.0, 1)
    assert 0 < frac < 1 and abs(dense / predicted - 2.0) < 0.15
    kill_ranks(lr, rank)
    assert {k: r for k, (r, _) in ranks(lr).items()} == rank
    small = strfx.shrink(lr, (x,))
    assert flops(small, x) == predicted  # the plan's FLOPs model is the counter's


def test_linear_attention_equals_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False)[0]
        out = QKVAttention(mha)(x, x, x, need_weights=False)[0]
    assert (out - ref).abs().max() < 1e-5
