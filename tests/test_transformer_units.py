"""Transformer units as channels: attention heads (MHA, SDPA, grouped-query) and MLP neurons, exact in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strfx
import strfx.modules
from strfx.surgery import analyze
from strfx.testing import kill_channels


class SelfAttention(nn.Module):
    """Hand-written multi-head attention (the way most model code writes it) with an MLP."""

    def __init__(self, dim: int = 24, heads: int = 4, kv_heads: int = 4) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.k = nn.Linear(dim, kv_heads * self.head_dim)
        self.v = nn.Linear(dim, kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 40), nn.Linear(40, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv_heads
        if rep > 1:  # grouped-query attention, repeat_kv as HF writes it
            kv = k.shape[1]
            k = k[:, :, None].expand(b, kv, rep, n, self.head_dim).reshape(b, -1, n, self.head_dim)
            v = v[:, :, None].expand(b, kv, rep, n, self.head_dim).reshape(b, -1, n, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        x = x + self.o(y)
        return x + self.fc2(F.gelu(self.fc1(x)))


def _units(model: nn.Module, x: torch.Tensor) -> list[int]:
    _, analysis = analyze(model, (x,))
    return sorted(g.channels for g in analysis.groups if g.prunable)


def test_multi_query_attention_prunes_value_dims():
    """One key/value head cannot go; its value dims can (each removes a column of every head's output)."""
    model, x = SelfAttention(kv_heads=1).eval(), torch.randn(2, 5, 24)
    assert _units(model, x) == [6, 40]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_heads_are_units_and_shrink_exactly(kv_heads):
    torch.manual_seed(0)
    model, x = SelfAttention(kv_heads=kv_heads).eval(), torch.randn(2, 5, 24)
    assert _units(model, x) == [kv_heads, 40]  # a kv head goes with the query heads that share it
    sparse = strfx.sparsify(model, "structured", example_inputs=(x,))
    head_unit = next(c for c in strfx.modules.channel_carriers(sparse).values() if c.raw.numel() == kv_heads)
    with torch.no_grad():
        head_unit.raw[0] = 0.0
    small = strfx.shrink(sparse, (x,))
    rep = small.strfx_shrink
    assert rep["result"] == "eager", rep["note"]
    assert small.q.out_features == 24 - 24 // kv_heads and small.o.in_features == small.q.out_features
    assert small.k.out_features == small.v.out_features == 24 // 4 * (kv_heads - 1)
    assert rep["max_error64"] <= 1e-9
    with torch.no_grad():
        y = torch.randn(3, 5, 24)
        torch.testing.assert_close(small(y), sparse(y), rtol=1e-5, atol=1e-6)


def test_multihead_attention_heads_are_units():
    mha = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    assert _units(mha, x) == [4, 32]
    sparse = strfx.sparsify(mha, "structured", example_inputs=(x,))
    counts = kill_channels(sparse, 0.5, example_inputs=(x,))
    small = strfx.shrink(sparse, (x,))
    # nn.MultiheadAttention ties its inner width to embed_dim: the cut ATen graph is the result
    assert counts["channels"] > 0 and small.strfx_shrink["result"] == "exported"
    assert small.get_parameter("self_attn.in_proj_weight").shape[0] < 48
    assert small.strfx_shrink["max_error64"] <= 1e-9
