"""Helpers for tests and benchmarks: make channels dead the way training would, through STR.

``kill_channels`` plays the end of STR training: for a random fraction of the channels of every
prunable group it sets the raw γ of every STR-BN (and its frozen offset β₀) and the raw weight of
every gate on that channel to exactly 0, so γ' = 0 there. Which channels belong together comes
from the channel analysis, so a killed channel is dead in every coupled layer (e.g. the whole
residual stream of a ResNet stage).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from strfx.modules import STRBatchNorm, STRGate
from strfx.passes.channel_analysis import META_KEY, TInfo


@torch.no_grad()
def kill_channels(
    gm: fx.GraphModule,
    fraction: float | tuple[float, float] = 0.5,
    seed: int = 0,
    example_inputs: Sequence[Any] | None = None,
) -> dict[str, int]:
    """Zero the STR parameters of a random ``fraction`` of each prunable group's channels, in place.

    ``gm`` is a structured model from :func:`strfx.sparsify`. ``fraction`` is a number or a
    ``(low, high)`` range drawn per group. At least one channel of each group is left alive.
    Returns counts: ``groups`` touched, ``channels`` killed, ``carriers`` (STR-BN/gate entries set).
    """
    from strfx.surgery import analyze

    rng = np.random.default_rng(seed)
    traced, analysis = analyze(gm, example_inputs)
    roots = analysis.roots
    # which STR carriers (module name, entry) sit on each channel
    carriers: dict[int, list[tuple[str, int]]] = {}
    for node in traced.graph.nodes:
        if node.op != "call_module":
            continue
        mod = traced.get_submodule(node.target)
        if not isinstance(mod, (STRBatchNorm, STRGate)):
            continue
        x = node.args[0].meta.get(META_KEY) if isinstance(node.args[0], fx.Node) else None
        if not isinstance(x, TInfo):
            continue
        cdim = mod.channel_dim % x.ndim if isinstance(mod, STRGate) else 1
        if cdim not in x.labels:
            continue
        for idx, r in enumerate(roots[x.labels[cdim]].tolist()):
            carriers.setdefault(r, []).append((node.target, idx))
    touched = killed = entries = 0
    modules = dict(gm.named_modules())
    members: dict[int, list[int]] = {}
    for r, g in analysis.group_of_root.items():
        members.setdefault(g, []).append(r)
    for group in analysis.groups:
        if not group.prunable:
            continue
        chans = sorted(members.get(group.id, []))
        killable = [r for r in chans if r in carriers]
        if not killable or len(chans) < 2:
            continue
        frac = rng.uniform(*fraction) if isinstance(fraction, tuple) else float(fraction)
        n = min(int(round(frac * len(chans))), len(chans) - 1, len(killable))
        if n <= 0:
            continue
        touched += 1
        for r in rng.choice(killable, size=n, replace=False).tolist():
            killed += 1
            for name, idx in carriers[r]:
                mod = modules[name]
                mod.weight[idx] = 0.0
                if isinstance(mod, STRBatchNorm):
                    mod.offset[idx] = 0.0
                entries += 1
    return {"groups": touched, "channels": killed, "carriers": entries}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a freshly built model non-trivial parameters, in place, so equality checks mean something.

    torchvision zero-initialises some heads (ViT) and every BatchNorm starts as the identity
    (μ = 0, σ² = 1, γ = 1, β = 0); an all-zero output, a 1e-6 layer scale or an identity norm
    hides wrong cuts. Weights
    that are all zero get small random values; norms get random γ, β and running statistics.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(t: torch.Tensor, scale: float, offset: float = 0.0) -> torch.Tensor:
        return (torch.randn(t.shape, generator=gen) * scale + offset).to(t.dtype)

    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            if mod.affine:
                mod.weight.copy_(rand(mod.weight, 0.2, 1.0))
                mod.bias.copy_(rand(mod.bias, 0.2))
            if mod.running_mean is not None:
                mod.running_mean.copy_(rand(mod.running_mean, 0.2))
                mod.running_var.copy_(rand(mod.running_var, 0.2, 1.0).abs() + 0.05)
        elif isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and getattr(mod, "weight", None) is not None:
            mod.weight.copy_(rand(mod.weight, 0.2, 1.0))
            if mod.bias is not None:
                mod.bias.copy_(rand(mod.bias, 0.2))
        for name, p in mod.named_parameters(recurse=False):
            if p.numel() > 1 and not p.any():
                p.copy_(rand(p, 0.02))
            elif p.numel() > 1 and (p == p.flatten()[0]).all() and 0 < p.flatten()[0].abs() < 1e-3:
                p.copy_(rand(p, 0.1, 1.0))  # ConvNeXt-style layer scale (1e-6) would hide the blocks
    return model
