"""A representative subset of each zoo set (benchmarks/zoo.py runs them all): sparsify (structured), kill
30-50 % of every prunable group through the STR parameters, shrink, verify.

torchvision transformer families are built small (same classes, fewer/narrower layers) and timm/HF
models come from the zoo's own builders or small configs, to fit the CI budget."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import strfx
import strfx.modules
from strfx._torchvision import torchvision
from strfx.surgery import random_like
from strfx.testing import kill_channels, randomize_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import zoo  # noqa: E402

tvm = torchvision.models

TORCHVISION = {
    "resnet18": (lambda: tvm.resnet18(), 32),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(), 32),
    "shufflenet_v2_x0_5": (lambda: tvm.shufflenet_v2_x0_5(), 32),
    "vit_tiny": (lambda: tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10), 32),
}


def _shrink(model: torch.nn.Module, x: tuple[torch.Tensor, ...]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """sparsify → kill 30-50 % per group → shrink; returns (masked, shrunk) after checking the report."""
    sparse = strfx.sparsify(model, "structured", example_inputs=x)
    counts = kill_channels(sparse, (0.3, 0.5), seed=0, example_inputs=x)
    assert counts["channels"] > 0
    small = strfx.shrink(sparse, x)
    rep = small.strfx_shrink
    assert rep["params_after"] < rep["params_before"]
    assert rep["max_error"] <= 1e-4
    assert rep["channels_removed"] == counts["channels"]
    # nothing of strfx is left but the norms of a cut hidden size (original width as divisor)
    wide = (strfx.modules.WideLayerNorm, strfx.modules.WideRMSNorm)
    assert not any(type(m).__module__.startswith("strfx") and not isinstance(m, wide) for m in small.modules())
    return sparse.eval(), small


def _removed(model: torch.nn.Module, small: torch.nn.Module) -> float:
    return 1 - sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_model_shrinks_exactly(name):
    build, size = TORCHVISION[name]
    torch.manual_seed(0)
    model = randomize_(build(), seed=0).eval()
    x = (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)
    sparse, small = _shrink(model, x)
    if name.startswith("shufflenet"):  # x.chunk(2) in its forward: unequal halves only the cut graph can express
        assert small.strfx_shrink["result"] in ("eager", "exported")
    elif name.startswith("vit"):  # nn.MultiheadAttention ties its width to embed_dim: a cut hidden size needs
        assert small.strfx_shrink["result"] == "exported"  # the cut graph
    else:
        assert small.strfx_shrink["result"] == "eager" and type(small) is type(model)
    with torch.no_grad():
        y = random_like(x, 7)
        torch.testing.assert_close(small(*y), sparse(*y), rtol=1e-4, atol=1e-4 * sparse(*y).abs().max().item())


timm = pytest.importorskip("timm")


def _timm(name: str, size: int) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = randomize_(timm.create_model(name, pretrained=False, num_classes=10), seed=0).eval()
    return model, (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def test_timm_batchnormact_model_removes_as_much_as_a_plain_batchnorm_one():
    """timm's BatchNormAct2d (a BatchNorm2d subclass with its own forward) is a batch_norm and an activation
    on the ATen graph: its channels are as prunable as plain BatchNorm2d ones."""
    act_model, x = _timm("mobilenetv3_small_050", 32)
    plain_model, xp = _timm("resnet10t", 32)
    assert zoo._norm_kind(act_model) == "BatchNormAct2d" and zoo._norm_kind(plain_model) == "BatchNorm"
    removed = {}
    for key, (model, inputs) in {"act": (act_model, x), "plain": (plain_model, xp)}.items():
        sparse, small = _shrink(model, inputs)
        assert small.strfx_shrink["blocked_groups"] <= small.strfx_shrink["groups"] // 4
        with torch.no_grad():
            y = random_like(inputs, 7)
            torch.testing.assert_close(small(*y), sparse(*y), rtol=1e-4, atol=1e-4 * sparse(*y).abs().max().item())
        removed[key] = _removed(model, small)
    assert removed["act"] >= 0.2 and removed["plain"] >= 0.2
    assert removed["act"] >= 0.6 * removed["plain"]


def test_zoo_picks_one_timm_model_per_family_and_builds_it():
    families = zoo.timm_families()
    assert len(families) >= 90 and families["resnet"].startswith("resnet")
    model, x, desc = zoo.build_timm(families["mobilenetv3"])
    assert x[0].shape[-1] == 96 and desc.endswith("96×96")


@pytest.mark.parametrize("name", ["gpt2"])
def test_hf_zoo_model_shrinks_exactly(name):
    pytest.importorskip("transformers")
    model, x, _ = zoo.build_hf(name)
    model = randomize_(model, seed=0)
    sparse, small = _shrink(model, x)
    # an exported result (the model's forward hard-codes head sizes) takes inputs shaped like the example
    batch, seq = (2, 11) if small.strfx_shrink["result"] == "eager" else tuple(x[0].shape)
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = small(ids), sparse(ids)
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
