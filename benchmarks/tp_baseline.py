"""Torch-Pruning (``torch_pruning``, 1.6.x) itself as a baseline for benchmarks/lm.py, where it runs.

Set up the way Torch-Pruning's own LLM example (examples/LLMs/prune_llm.py) sets it up: ``BasePruner`` with
``GroupMagnitudeImportance(p=2, group_reduction="mean")``, local (per-layer, ``global_pruning=False``) ratios,
``num_heads`` for q/k/v (GQA: k/v get ``num_key_value_heads``), ``prune_num_heads=True``,
``prune_head_dims=False`` (RoPE stays intact), ``lm_head`` ignored; then the HF attributes the example
rewrites by hand (``num_key_value_groups``, ``config.num_attention_heads``, ``config.intermediate_size``).
Unlike the example, the hidden size is kept (like ``uniform``): every writer into the residual stream
(``o_proj``, ``down_proj``) is an ignored layer, so no group is rooted there.

Finding (Torch-Pruning 1.6.1, transformers 5.24, HF Llama): building the pruning group of ``q_proj`` never
ends — the group grows without bound through RoPE's ``rotate_half`` (slice → cat → mul → add) with eager
attention, and through the SDPA node with SDPA attention. (Upstream: VainF/Torch-Pruning#527, the same hang on Qwen3.) So the head step runs under a time limit
(:class:`TPTimeout`), and where it fails the benchmark falls back to what Torch-Pruning can do on this model:
MLP neurons, with the attention projections ignored too.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from importlib.metadata import version
from typing import Any, Iterator

import torch
from torch import nn


class TPTimeout(RuntimeError):
    """Torch-Pruning did not finish within the time limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`TPTimeout` in the main thread after ``seconds`` (Torch-Pruning's graph code is pure Python,
    so the alarm interrupts it); ``seconds <= 0``: no limit."""
    if seconds <= 0:
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise TPTimeout(f"Torch-Pruning did not finish within {seconds:g} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def ratio_keeping(total: int, keep: int) -> float:
    """The ``pruning_ratio`` for which Torch-Pruning's local pruning keeps exactly ``keep`` of ``total`` channels
    (it keeps ``int(total * (1 - ratio))``; the half channel guards against float rounding)."""
    if not 1 <= keep <= total:
        raise ValueError(f"keep must be in [1, {total}], got {keep}")
    return 1.0 - (keep + 0.5) / total


def tp_prune_llama(model: nn.Module, example: torch.Tensor, neuron_ratio: float, head_ratio: float = 0.0,
                   limit_s: float = 0.0) -> dict[str, Any]:
    """Prune an HF Llama in place with Torch-Pruning: MLP neurons at ``neuron_ratio`` in every layer and, when
    ``head_ratio > 0``, query heads at ``head_ratio`` (Torch-Pruning's GQA rule: the same number of query heads
    in every kv group, kv heads kept). Returns what was done; raises :class:`TPTimeout` past ``limit_s``."""
    import torch_pruning as tp

    cfg = model.config
    attn = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    mlps = [m for n, m in model.named_modules() if n.endswith("mlp")]
    ignored: list[nn.Module] = [model.lm_head]  # as the example: the vocabulary is not pruned
    ignored += [a.o_proj for a in attn] + [m.down_proj for m in mlps]  # no group rooted in the residual stream
    num_heads: dict[nn.Module, int] = {}
    if head_ratio > 0:
        for a in attn:
            num_heads[a.q_proj] = cfg.num_attention_heads
            num_heads[a.k_proj] = cfg.num_key_value_heads
            num_heads[a.v_proj] = cfg.num_key_value_heads
    else:  # heads left alone: the attention projections are not roots either (their groups never finish, above)
        ignored += [p for a in attn for p in (a.q_proj, a.k_proj, a.v_proj)]
    t0 = time.perf_counter()
    with time_limit(limit_s):
        pruner = tp.pruner.BasePruner(
            model, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=False, output_transform=lambda out: out.logits, pruning_ratio=neuron_ratio,
            ignored_layers=ignored, num_heads=num_heads, prune_num_heads=head_ratio > 0, prune_head_dims=False,
            head_pruning_ratio=head_ratio)
        for group in pruner.step(interactive=True):
            group.prune()
    # the attributes Torch-Pruning's example rewrites by hand after pruning (HF keeps head counts in them)
    for a in attn:
        a.num_key_value_groups = (a.q_proj.out_features // a.head_dim) // (a.k_proj.out_features // a.head_dim)
    cfg.num_attention_heads = attn[0].q_proj.out_features // attn[0].head_dim
    cfg.num_key_value_heads = attn[0].k_proj.out_features // attn[0].head_dim
    cfg.intermediate_size = mlps[0].gate_proj.out_features
    return {"torch_pruning": version("torch-pruning"), "neuron_ratio": neuron_ratio, "head_ratio": head_ratio,
            "ignored_layers": ["lm_head", "o_proj", "down_proj"] + ([] if head_ratio > 0 else ["q_proj", "k_proj", "v_proj"]),
            "prune_s": time.perf_counter() - t0,
            "q_heads": [a.q_proj.out_features // a.head_dim for a in attn],
            "kv_heads": [a.k_proj.out_features // a.head_dim for a in attn],
            "neurons": [m.gate_proj.out_features for m in mlps]}
