"""timm's own transformer and ConvNeXt classes (issue 11): every unit kind is cut exactly in timm's class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import strfx
from strfx.testing import kill_channels

timm = pytest.importorskip("timm")


def _shrunk(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, nn.Module, dict]:
    sparse = strfx.sparsify(model.eval(), "structured", example_inputs=(x,))
    counts = kill_channels(sparse, (0.3, 0.5), example_inputs=(x,), depth=0.3)
    small = strfx.shrink(sparse, (x,))
    assert small.strfx_shrink["channels_removed"] == counts["channels"] > 0
    return sparse, small, small.strfx_shrink


def test_timm_vit_loses_heads_neurons_hidden_and_branches_in_its_own_class() -> None:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0,
                              num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    sparse, small, rep = _shrunk(model, x)
    assert rep["result"] == "eager" and isinstance(small, VisionTransformer)  # timm's class, timm's forward
    assert rep["max_error64"] < 1e-12 and rep["params_after"] < 0.8 * rep["params_before"]
    hidden = small.cls_token.shape[-1]
    assert hidden < 48 and small.pos_embed.shape[-1] == hidden == small.patch_embed.proj.out_channels
    for block in small.blocks:  # the head count follows the cut qkv rows (timm's Attention reads num_heads)
        attn = block.attn
        if isinstance(attn, nn.Module) and hasattr(attn, "qkv"):
            assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
    torch.testing.assert_close(small(x), sparse(x), rtol=1e-4, atol=1e-5)


def test_timm_convnext_layer_scale_is_cut_with_its_channels() -> None:
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10, ls_init_value=0.5)
    x = torch.randn(2, 3, 32, 32)
    full = {n: p.numel() for n, p in model.named_parameters() if n.endswith("gamma")}
    _, small, rep = _shrunk(model, x)
    assert rep["max_error64"] < 1e-12 and rep["params_after"] < rep["params_before"]
    cut = {n: p.numel() for n, p in small.named_parameters() if n.endswith("gamma")}
    assert full and all(cut.get(n, 0) <= k for n, k in full.items())
    assert any(cut.get(n, 0) < k for n, k in full.items())  # layer-scale vectors cut with their channels
