"""A representative subset of torchvision's classification zoo: sparsify (structured), kill 30-50% of
every prunable group through the STR parameters, shrink, verify. benchmarks/zoo.py runs all 80.

Transformer families are built small (same classes, fewer/narrower layers) to fit the CI budget."""

from __future__ import annotations

import pytest
import torch

import strfx
from strfx._torchvision import torchvision
from strfx.surgery import random_like
from strfx.testing import kill_channels, randomize_

tvm = torchvision.models

BUILDERS = {
    "resnet18": (lambda: tvm.resnet18(), 64),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(), 64),
    "shufflenet_v2_x0_5": (lambda: tvm.shufflenet_v2_x0_5(), 64),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(), 64),
    "regnet_y_400mf": (lambda: tvm.regnet_y_400mf(), 64),
    "squeezenet1_1": (lambda: tvm.squeezenet1_1(), 64),
    "googlenet": (lambda: tvm.googlenet(aux_logits=False, init_weights=True), 64),
    "mnasnet0_5": (lambda: tvm.mnasnet0_5(), 64),
    "densenet121": (lambda: tvm.densenet121(), 32),
    "vit_tiny": (lambda: tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10), 32),
    "swin_tiny": (lambda: tvm.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                              window_size=[2, 2], num_classes=10), 32),
    "swin_v2_tiny": (lambda: tvm.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2], num_classes=10,
        block=torchvision.models.swin_transformer.SwinTransformerBlockV2,
        downsample_layer=torchvision.models.swin_transformer.PatchMergingV2), 32),
    "convnext_tiny_narrow": (lambda: tvm.convnext.ConvNeXt(
        [tvm.convnext.CNBlockConfig(16, 32, 1), tvm.convnext.CNBlockConfig(32, None, 1)], num_classes=10), 32),
    "maxvit_tiny": (lambda: tvm.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                                       block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0,
                                       num_classes=10), 32),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_zoo_model_shrinks_exactly(name):
    build, size = BUILDERS[name]
    torch.manual_seed(0)
    model = randomize_(build(), seed=0).eval()
    x = (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)
    gm = strfx.sparsify(model, "structured", example_inputs=x)
    counts = kill_channels(gm, (0.3, 0.5), seed=0)
    assert counts["channels"] > 0
    small = strfx.shrink(gm)
    rep = small.strfx_shrink
    assert rep["params_after"] < rep["params_before"]
    assert rep["max_error"] <= 1e-4
    assert not any(type(m).__module__.startswith("strfx") for m in small.modules())
    with torch.no_grad():
        gm.eval(), small.eval()
        y = random_like(x, 7)
        torch.testing.assert_close(small(*y), gm(*y), rtol=1e-4, atol=1e-4 * gm(*y).abs().max().item())
