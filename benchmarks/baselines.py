"""Pure helpers for the pruning baselines the benchmarks compare STR against.

Kept apart from the benchmark scripts so that tests/test_bench_baselines.py can check them fast:
a baseline with a wrong mask or schedule would make STR look better than it is.

* :func:`global_magnitude_masks` — Han et al. (2015): one magnitude threshold over all layers.
* :func:`uniform_magnitude_masks` — Zhu & Gupta (2017): the same sparsity in every layer.
* :func:`gmp_sparsity` — Zhu & Gupta's cubic schedule s_t = s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))³.
* :func:`slimming_keep` — Liu et al. (2017): one global threshold on |γ| over all channels.
* :class:`RewindSchedule` — structured STR as a unit search only (issue 14): where the search runs, which
  earlier state the shrunk model is rewound to, and the learning rate of its retraining.
* :func:`lowest`, :func:`uniform_counts` — structured uniform magnitude pruning of transformer units
  (Torch-Pruning / LLM-Pruner's recipe, benchmarks/lm.py): which units, and how many per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


def _kth_smallest(values: torch.Tensor, k: int) -> float:
    """The k-th smallest value (1-based); k ≤ 0 gives -inf (prune nothing)."""
    if k <= 0:
        return float("-inf")
    return float(torch.kthvalue(values, k).values)


def _mask_exact(w: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Mask pruning exactly the ``n_prune`` smallest |w| (ties broken by position, so the count is exact)."""
    flat = w.detach().abs().flatten()
    mask = torch.ones_like(flat)
    if n_prune > 0:
        mask[torch.argsort(flat, stable=True)[:n_prune]] = 0
    return mask.view_as(w)


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """0/1 masks removing the ``sparsity`` fraction of smallest-magnitude weights over *all* tensors.

    Layer budgets come out non-uniform (what Han et al. get from one quality threshold).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    names = list(weights)
    flat = torch.cat([weights[n].detach().abs().flatten() for n in names])
    n_prune = int(round(sparsity * flat.numel()))
    keep = torch.ones_like(flat)
    if n_prune > 0:
        keep[torch.argsort(flat, stable=True)[:n_prune]] = 0
    masks, start = {}, 0
    for n in names:
        size = weights[n].numel()
        masks[n] = keep[start:start + size].view_as(weights[n]).clone()
        start += size
    return masks


def uniform_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """0/1 masks removing the ``sparsity`` fraction of smallest |w| in *each* tensor (uniform budget)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return {n: _mask_exact(w, int(round(sparsity * w.numel()))) for n, w in weights.items()}


def gmp_sparsity(step: int, final: float, begin: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017) cubic sparsity at ``step``: ``initial`` before ``begin``, ``final`` from ``end`` on.

    Prunes fast early, while the network can still recover, and slowly near the target.
    """
    if end <= begin:
        raise ValueError("end must be after begin")
    if step <= begin:
        return initial
    if step >= end:
        return final
    frac = (step - begin) / (end - begin)
    return final + (initial - final) * (1.0 - frac) ** 3


def iterative_densities(final_sparsity: float, rounds: int) -> list[float]:
    """Sparsity after each of ``rounds`` prune–retrain cycles, density shrinking geometrically.

    Han et al. prune iteratively; equal *ratios* of removed weights per round keep every round's
    damage comparable (linear steps would remove most of the weights in the first round).
    """
    density = 1.0 - final_sparsity
    return [1.0 - density ** ((r + 1) / rounds) for r in range(rounds)]


def slimming_keep(gammas: dict[str, torch.Tensor], prune_fraction: float, min_keep: int = 1) -> dict[str, torch.Tensor]:
    """Boolean keep-masks from one global threshold on |γ| (network slimming).

    Every layer keeps at least ``min_keep`` channels (its largest), as Liu et al. do, so the network
    stays connected.
    """
    flat = torch.cat([g.detach().abs().flatten() for g in gammas.values()])
    k = int(math.floor(prune_fraction * flat.numel()))
    thr = _kth_smallest(flat, k)
    out = {}
    for n, g in gammas.items():
        a = g.detach().abs()
        keep = a > thr
        if int(keep.sum()) < min_keep:
            keep = torch.zeros_like(keep)
            keep[torch.topk(a, min(min_keep, a.numel())).indices] = True
        out[n] = keep
    return out


def lowest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Boolean mask of the ``n_prune`` lowest scores (ties by position, so the count is exact)."""
    dead = torch.zeros(scores.numel(), dtype=torch.bool)
    if n_prune > 0:
        dead[torch.argsort(scores.detach().flatten(), stable=True)[:n_prune]] = True
    return dead


def uniform_counts(kv_heads: int, ffn: int, layers: int, head_cost: float, neuron_cost: float, dense: float,
                   target: float) -> tuple[int, int]:
    """(kv groups, neurons) to remove in EVERY layer so that the same fraction p of each goes and the
    FLOPs removed come closest to ``target``; heads round to whole groups (at least one kept).

    ``head_cost``/``neuron_cost``: FLOPs one kv group / one neuron costs in one layer (FLOPs are linear
    in both); ``dense``: the whole model's FLOPs.
    """
    best: tuple[float, int, int] | None = None
    for n in range(ffn):
        k = min(int(round(n / ffn * kv_heads)), kv_heads - 1)
        removed = layers * (k * head_cost + n * neuron_cost) / dense
        if best is None or abs(removed - target) < best[0]:
            best = (abs(removed - target), k, n)
    assert best is not None
    return best[1], best[2]


def cosine_lr(step: int, start: int, end: int, peak: float) -> float:
    """Cosine from ``peak`` at ``start`` to 0 at ``end`` (benchmarks/mnist.py's schedule, clamped outside)."""
    return 0.5 * peak * (1 + math.cos(math.pi * min(max(step - start, 0), end - start) / max(end - start, 1)))


@dataclass(frozen=True)
class RewindSchedule:
    """STR picks the units, an earlier state of the weights minus those units is retrained (issue 14).

    Fractions are of the whole step budget ``total``: the weights are recorded at ``rewind_at`` (0: right
    after sparsify; ``search_end``: no rewind, the searched weights themselves), strfx's FLOPs controller ramps between ``ramp_start`` and ``ramp_end`` (held to
    ``search_end``), the dead units are read off at ``search_end``, and the shrunk model trains for the
    remaining ``total - search_end`` steps, so every schedule spends the same number of SGD steps.
    ``search_lr``: ``own`` — a cosine over the search alone (a short ``strfx train`` run), ``global`` — the
    run's one cosine. ``retrain_lr``: ``restart`` — a fresh cosine from the peak; ``continue`` — the
    original cosine from ``rewind_at`` to the end, compressed onto the retraining steps (learning-rate
    rewinding, Renda et al. 2020, at a shorter length).
    """

    rewind_at: float = 0.0
    ramp_start: float = 0.05 / 3
    ramp_end: float = 0.6 / 3
    search_end: float = 1 / 3
    search_lr: Literal["own", "global"] = "own"
    retrain_lr: Literal["restart", "continue"] = "restart"

    def __post_init__(self) -> None:
        ok = 0 <= self.ramp_start < self.ramp_end <= self.search_end < 1
        if not ok or not (0 <= self.rewind_at <= self.ramp_start or self.rewind_at == self.search_end):
            raise ValueError(f"need 0 <= rewind_at <= ramp_start < ramp_end <= search_end < 1 (or rewind_at = "
                             f"search_end: no rewind, the searched weights are retrained), got {self}")

    def steps(self, total: int) -> tuple[int, int]:
        """(step whose start state is rewound to, step at which the search stops); the rest retrains."""
        return round(self.rewind_at * total), round(self.search_end * total)

    def search_lr_at(self, step: int, total: int, peak: float) -> float:
        end = self.steps(total)[1] if self.search_lr == "own" else total
        return cosine_lr(step, 0, end, peak)

    def retrain_lr_at(self, k: int, total: int, peak: float) -> float:
        """Learning rate of retraining step ``k`` (0 ≤ k < total − search_end steps)."""
        rewind, stop = self.steps(total)
        n = total - stop
        if self.retrain_lr == "restart":
            return cosine_lr(k, 0, n, peak)
        pos = rewind + (total - rewind) * k / n  # where on the original cosine this step sits
        return 0.5 * peak * (1 + math.cos(math.pi * pos / total))
