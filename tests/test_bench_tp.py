"""Torch-Pruning as the LM benchmark runs it: a pruned model with the wrong widths or stale HF head attributes
would make the Torch-Pruning row of docs/lm.md measure something else than what it says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import strfx  # noqa: F401  (before transformers: the torchvision shim)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from tp_baseline import TPTimeout, ratio_keeping, time_limit, tp_prune_llama  # noqa: E402


def tiny_llama() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=16, use_cache=False, tie_word_embeddings=False,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_ratio_keeping_gives_torch_pruning_the_exact_count():
    for total in (7, 24, 344):
        for keep in range(1, total + 1):
            assert int(total * (1 - ratio_keeping(total, keep))) == keep
    with pytest.raises(ValueError, match="keep"):
        ratio_keeping(24, 0)


def test_tp_prunes_the_same_lowest_l2_neurons_in_every_layer_and_the_model_runs():
    pytest.importorskip("torch_pruning")  # the `bench` extra
    model = tiny_llama()
    x = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    mlp = model.model.layers[1].mlp
    score = (mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1) + mlp.down_proj.weight.pow(2).sum(0))
    expected = torch.sort(torch.argsort(score, descending=True)[:10]).values  # the 10 largest group L2 survive
    gate_before = mlp.gate_proj.weight.detach().clone()
    info = tp_prune_llama(model, x, neuron_ratio=ratio_keeping(24, 10))
    assert info["neurons"] == [10, 10] and info["q_heads"] == [4, 4] and info["kv_heads"] == [2, 2]
    for layer in model.model.layers:
        m, a = layer.mlp, layer.self_attn
        assert m.gate_proj.out_features == m.up_proj.out_features == m.down_proj.in_features == 10
        assert a.q_proj.weight.shape == (32, 32) and a.o_proj.weight.shape == (32, 32)  # attention and hidden kept
    assert model.config.intermediate_size == 10 and model.lm_head.weight.shape == (64, 32)
    assert torch.equal(mlp.gate_proj.weight, gate_before[expected])
    logits = model(x).logits
    assert logits.shape == (1, 16, 64) and bool(torch.isfinite(logits).all())


def test_time_limit_interrupts_pure_python_work():
    with pytest.raises(TPTimeout, match="within 0.2 s"):
        with time_limit(0.2):
            while True:
                pass
