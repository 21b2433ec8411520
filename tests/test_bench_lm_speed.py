"""benchmarks/lm_speed.py times models rebuilt from the widths a run recorded: if the rebuild cut other widths
than recorded, its tokens/s would belong to another model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lm  # noqa: E402
from lm_speed import shaped_like  # noqa: E402

TINY = lm.Budget(hidden=32, layers=2, heads=4, kv_heads=2, ffn=24, seq=8, batch=2)


def test_shaped_like_cuts_exactly_the_recorded_widths():
    import transformers

    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(lm.llama_config(TINY)).eval()
    kept = {"heads": [2, 4], "neurons": [10, 7], "hidden": 20, "branches": [[1, 1], [0, 1]]}
    small = shaped_like(dense, kept, TINY, depth=True)
    hd = TINY.hidden // TINY.heads
    layers = small.model.layers
    assert small.model.embed_tokens.weight.shape[1] == 20 and small.lm_head.in_features == 20  # hidden size
    assert (layers[0].self_attn.q_proj.out_features, layers[0].self_attn.k_proj.out_features) == (2 * hd, 1 * hd)
    assert [m.mlp.gate_proj.out_features for m in layers] == [10, 7]
    assert not any(isinstance(m, torch.nn.Linear) for m in layers[1].self_attn.modules())  # branch removed
    with pytest.raises(ValueError, match="whole kv groups"):
        shaped_like(dense, {**kept, "heads": [3, 4]}, TINY, depth=True)
