"""Helpers for tests and benchmarks: make channels dead the way training would, through STR.

``kill_channels`` plays the end of STR training: for a random fraction of the channels of every
prunable group it sets the raw γ of every STR-BN (and its frozen offset β₀) and the entry of every
importance vector on that channel to exactly 0, so γ' = u' = 0 there. Which channels belong
together comes from the channel analysis, so a killed channel is dead in every coupled layer (e.g.
the whole residual stream of a ResNet stage). Only channels the analysis then proves dead are
counted (``killed``); ``zeroed`` counts every channel whose STR vectors were set to zero.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from strfx.modules import STRShift, STRWeight, UnitScale, channel_carriers


def _carrier_entries(model: nn.Module) -> dict[str, tuple[str, Any]]:
    """Qualified tensor name → ("bn", (STRWeight chain, STRShift or None)) / ("unit", UnitScale)."""
    out: dict[str, tuple[str, Any]] = {}
    for owner, mod in model.named_modules():
        plist = getattr(mod, "parametrizations", None)
        if not isinstance(plist, nn.ModuleDict):
            continue
        for tensor, chain in plist.items():
            name = f"{owner}.{tensor}" if owner else tensor
            for p in chain:
                if isinstance(p, STRWeight) and p.role == "norm":
                    shift = next((q for c in plist.values() for q in c if isinstance(q, STRShift)), None)
                    out[name] = ("bn", (chain, shift))
                elif isinstance(p, UnitScale) and getattr(p.unit, "kind", "") != "depth":
                    out[name] = ("unit", p)  # a depth gate scales every channel: not a channel's carrier
    return out


@torch.no_grad()
def kill_channels(
    model: nn.Module,
    fraction: float | tuple[float, float] = 0.5,
    seed: int = 0,
    example_inputs: Sequence[Any] | None = None,
    round_to: int = 1,
    depth: float = 0.0,
) -> dict[str, int]:
    """Zero the STR vectors of a random ``fraction`` of each prunable group's channels, in place.

    ``model`` is a structured model from :func:`strfx.sparsify`. ``fraction`` is a number or a
    ``(low, high)`` range drawn per group. At least one channel of each group is left alive; with
    ``round_to`` > 1 each group keeps a multiple of it (rounded up), as hardware-friendly widths.
    ``depth``: the fraction of residual-branch depth gates to zero too (whole branches go).
    Returns counts: ``groups`` touched, ``zeroed`` channels whose STR entries were set to zero,
    ``channels`` of those the analysis proves dead (what shrink removes), ``carriers`` entries set.
    """
    from strfx.surgery import analyze

    rng = np.random.default_rng(seed)
    gm, analysis = analyze(model, example_inputs)
    roots = analysis.roots
    entries_of = _carrier_entries(model)
    carriers: dict[int, list[tuple[str, Any, int]]] = {}  # channel -> (kind, carrier, index)
    for name, (kind, carrier) in entries_of.items():
        dims = analysis.params.get(name, {})
        dim = 0 if kind == "bn" else carrier.dim
        if dim not in dims:
            continue
        for idx, r in enumerate(roots[dims[dim]].tolist()):
            carriers.setdefault(r, []).append((kind, carrier, idx))
    members: dict[int, list[int]] = {}
    for r, g in analysis.group_of_root.items():
        members.setdefault(g, []).append(r)
    touched = zeroed = entries = 0
    for group in analysis.groups:
        if not group.prunable:
            continue
        chans = sorted(members.get(group.id, []))
        killable = [r for r in chans if r in carriers]
        if not killable or len(chans) < 2:
            continue
        frac = rng.uniform(*fraction) if isinstance(fraction, tuple) else float(fraction)
        if round_to > 1:
            keep = min(len(chans), max(round_to, math.ceil(len(chans) * (1 - frac) / round_to) * round_to))
            n = min(len(chans) - keep, len(killable))
        else:
            n = min(int(round(frac * len(chans))), len(chans) - 1, len(killable))
        if n <= 0:
            continue
        touched += 1
        for r in rng.choice(killable, size=n, replace=False).tolist():
            zeroed += 1
            for kind, carrier, idx in carriers[r]:
                if kind == "bn":
                    chain, shift = carrier
                    chain.original[idx] = 0.0
                    if shift is not None:
                        shift.offset[idx] = 0.0
                else:
                    carrier.unit.weight[carrier.index[idx]] = 0.0
                entries += 1
    gates = [c for c in channel_carriers(model).values() if c.kind == "depth"]
    n_depth = int(round(depth * len(gates)))
    for k in rng.choice(len(gates), size=n_depth, replace=False).tolist() if n_depth else []:
        gates[k].raw.zero_()
    after = _reanalyze(gm, model)
    if after.bias_wanted:  # constant channels a bias-less layer could absorb: capture again with zero biases
        _, after = analyze(model, example_inputs)
    return {"groups": touched, "zeroed": zeroed, "channels": after.dead_channels(), "carriers": entries}


@torch.no_grad()
def _reanalyze(gm: torch.fx.GraphModule, model: nn.Module) -> Any:
    """The channel analysis of ``model`` on ``gm``, captured from it before only its parameter values changed.

    Killing channels changes values, not the graph: the folded values are copied into the graph's own tensors
    and the rules run again, which is what a fresh capture would give at a fifth of the cost (unless a layer
    without a bias would now absorb a constant channel: the caller captures again then).
    """
    from strfx.passes.channel_analysis import META_KEY, analyze_channels
    from strfx.surgery import fold_str

    plain = fold_str(model)
    new = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
        if name in new:  # a zero bias strfx gave a bias-less layer stays zero
            t.copy_(new[name])
    for node in gm.graph.nodes:
        node.meta.pop(META_KEY, None)
    return analyze_channels(gm)


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


# ---------------------------------------------------------------------------------------------
# random DAG CNNs for property tests and benchmarks/fuzz.py
# ---------------------------------------------------------------------------------------------
class RandomNet(torch.nn.Module):
    """A CNN whose forward is a random program over a pool of same-resolution feature maps.

    ``program`` is a list of (op, args) steps; each step reads earlier values by index and
    appends its result. The ops are the couplings channel analysis must get right: residual
    adds, concat, chunk, depthwise/grouped conv, channel shuffle, SE, GroupNorm, channels-last
    LayerNorm+MLP blocks, and a flatten→linear or pooled head.
    """

    def __init__(self, program: list[tuple[str, tuple[Any, ...]]], layers: dict[str, torch.nn.Module],
                 outputs: str = "tensor") -> None:
        super().__init__()
        self.program = program
        self.layers = torch.nn.ModuleDict(layers)
        self.outputs = outputs  # "tensor", "shape" (logits, width) or "dict" (with non-tensor leaves)

    def forward(self, x: torch.Tensor) -> Any:
        F = torch.nn.functional
        vals = [x]
        for op, a in self.program:
            if op == "seq":
                vals.append(self.layers[a[1]](vals[a[0]]))
            elif op == "act":
                vals.append(torch.relu(vals[a[0]]) if a[1] == "relu" else torch.nn.functional.silu(vals[a[0]]))
            elif op == "add":
                vals.append(vals[a[0]] + vals[a[1]])
            elif op == "mul":
                vals.append(vals[a[0]] * vals[a[1]])
            elif op == "cat":
                vals.append(torch.cat([vals[i] for i in a[0]], dim=1))
            elif op == "chunk":
                first, second = vals[a[0]].chunk(2, dim=1)
                vals.append(first)
                vals.append(second)
            elif op == "shuffle":
                v = vals[a[0]]
                b, c, h, w = v.size()
                v = v.view(b, a[1], c // a[1], h, w).transpose(1, 2).contiguous()
                vals.append(v.view(b, -1, h, w))
            elif op == "se":
                v = vals[a[0]]
                s = v.mean((2, 3), keepdim=True)
                s = torch.sigmoid(self.layers[a[2]](torch.relu(self.layers[a[1]](s))))
                vals.append(v * s)
            elif op == "cl_mlp":
                v = vals[a[0]].permute(0, 2, 3, 1)
                v = self.layers[a[2]](torch.nn.functional.gelu(self.layers[a[1]](v)))
                if a[3]:
                    v = self.layers[a[3]](v)
                vals.append(v.permute(0, 3, 1, 2))
            elif op == "head":
                v = vals[a[0]]
                v = torch.flatten(v, 1) if a[2] else v.mean((2, 3))
                vals.append(self.layers[a[1]](v))
            # --- extended ops (random_cnn(extended=True)): the edges a new user's model has
            elif op == "kwact":  # keyword-called, possibly with a non-zero image of 0
                kind, p, q = a[1], a[2], a[3]
                v = vals[a[0]]
                vals.append(F.hardtanh(v, min_val=p, max_val=q) if kind == "hardtanh" else
                            F.threshold(v, threshold=p, value=q) if kind == "threshold" else
                            torch.clamp(v, min=p, max=q))
            elif op == "dimnorm":  # computed dims: sizes read from the tensor at run time
                v = vals[a[0]]
                vals.append(F.layer_norm(v, v.shape[1:]) if a[1] else v / v.shape[1])
            elif op == "inplace":  # in-place ops through views of a copy
                v = vals[a[0]].clone()
                if a[1] == "slice":
                    v[:, : v.shape[1] // 2].mul_(2.0)
                else:
                    v.transpose(2, 3).add_(0.5)
                vals.append(v)
        out = vals[-1]
        if self.outputs == "shape":
            return out, out.shape[1]
        if self.outputs == "dict":
            return {"logits": out, "features": vals[-2] if vals[-2].dim() == 2 else None, "width": out.shape[-1]}
        return out


def random_cnn(seed: int, max_steps: int = 8, extended: bool = False) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """A small random :class:`RandomNet` and an input for it, fully determined by ``seed``.

    ``extended`` adds the ops a first fuzz of new users' models found wanting: keyword-called
    hardtanh/threshold/clamp with non-zero images of 0, sizes computed from ``x.shape``, in-place ops
    through views, pad modules on the channel dim, InstanceNorm with running statistics, BatchNorm
    channels with γ = 0 and β ≠ 0 (constants), and non-tensor outputs (the default stream is unchanged).
    """
    import random

    from torch import nn

    r = random.Random(seed)
    torch.manual_seed(seed)
    hw = r.choice([4, 6])
    cin = r.choice([1, 3])
    chans = [cin]
    program: list[tuple[str, tuple[Any, ...]]] = []
    layers: dict[str, nn.Module] = {}

    def add_layer(mod: nn.Module) -> str:
        name = f"l{len(layers)}"
        layers[name] = mod
        return name

    def push(op: str, args: tuple[Any, ...], c: int) -> None:
        program.append((op, args))
        chans.append(c)

    def conv_block(src: int, cout: int) -> None:
        cin_ = chans[src]
        groups = 1
        kind = r.random()
        if kind < 0.2 and cin_ > 1:
            groups, cout = cin_, cin_ * r.choice([1, 1, 2])  # depthwise (multiplier 1 or 2)
        elif kind < 0.35:
            common = [g for g in (2, 3, 4) if cin_ % g == 0 and cout % g == 0]
            groups = r.choice(common) if common else 1
        k = r.choice([1, 3])
        norm = r.random()
        bias = norm >= 0.6 or r.random() < 0.3
        mods: list[nn.Module] = [nn.Conv2d(cin_, cout, k, padding=k // 2, groups=groups, bias=bias)]
        if extended and norm < 0.1:
            inorm = nn.InstanceNorm2d(cout, affine=r.random() < 0.5, track_running_stats=True)
            inorm.running_mean.uniform_(-0.5, 0.5)
            inorm.running_var.uniform_(0.5, 1.5)
            mods.append(inorm)
        elif norm < 0.45:
            mods.append(nn.BatchNorm2d(cout))
        elif norm < 0.6 and cout % 2 == 0:
            mods.append(nn.GroupNorm(2, cout))
        if r.random() < 0.7:
            mods.append(r.choice([nn.ReLU(), nn.Hardswish(), nn.SiLU()]))
        push("seq", (src, add_layer(nn.Sequential(*mods))), cout)

    def extended_op(src: int, c: int) -> None:
        kind = r.random()
        if kind < 0.3:
            act = r.choice(["hardtanh", "threshold", "clamp"])
            p = r.choice([-1.0, 0.0, 0.5])
            push("kwact", (src, act, p, r.choice([p + 1.0, 2.0]) if act != "threshold" else r.choice([0.0, 1.5])), c)
        elif kind < 0.5:
            push("dimnorm", (src, r.random() < 0.5), c)
        elif kind < 0.7:
            push("inplace", (src, r.choice(["slice", "transpose"])), c)
        else:
            front, back = r.choice([(1, 0), (0, 2), (1, 1)])
            pad = add_layer(nn.ConstantPad3d((0, 0, 0, 0, front, back), r.choice([0.0, 0.0, 1.0])))
            push("seq", (src, pad), c + front + back)

    conv_block(0, r.choice([4, 6, 8]))
    for _ in range(r.randint(2, max_steps)):
        last = len(chans) - 1
        src = r.choice([last, last, r.randrange(1, len(chans))])
        c = chans[src]
        op = r.random()
        same = [i for i in range(1, len(chans)) if chans[i] == c and i != src]
        if op < 0.3:
            conv_block(src, r.choice([2, 4, 6, 8]))
        elif op < 0.45 and same:
            push(r.choice(["add", "add", "mul"]), (src, r.choice(same)), c)
        elif op < 0.55:
            other = r.randrange(1, len(chans))
            push("cat", ([src, other],), c + chans[other])
        elif op < 0.62 and c % 2 == 0 and c >= 2:
            program.append(("chunk", (src,)))
            chans.extend([c // 2, c // 2])
        elif op < 0.72 and c % 2 == 0:
            push("shuffle", (src, 2), c)
        elif op < 0.8:
            hidden = max(1, c // 2)
            push("se", (src, add_layer(nn.Conv2d(c, hidden, 1)), add_layer(nn.Conv2d(hidden, c, 1))), c)
        elif op < 0.9:
            norm = add_layer(nn.LayerNorm(c)) if r.random() < 0.5 else None
            push("cl_mlp", (src, add_layer(nn.Linear(c, 2 * c)), add_layer(nn.Linear(2 * c, c)), norm), c)
        elif not extended or op < 0.95:
            push("act", (src, r.choice(["relu", "silu"])), c)
        else:
            extended_op(src, c)
    last = len(chans) - 1
    flat = r.random() < 0.5
    feats = chans[last] * (hw * hw if flat else 1)
    push("head", (last, add_layer(nn.Linear(feats, r.choice([3, 5]))), flat), 0)
    outputs = r.choice(["tensor", "tensor", "shape", "dict"]) if extended else "tensor"
    model = RandomNet(program, layers, outputs)
    randomize_(model, seed)
    if extended:  # network slimming: some BatchNorm channels are the constant β
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, nn.BatchNorm2d) and r.random() < 0.3:
                    mod.weight[r.randrange(mod.num_features)] = 0.0
    model.eval()
    return model, (torch.randn(2, cin, hw, hw, generator=torch.Generator().manual_seed(seed)),)
