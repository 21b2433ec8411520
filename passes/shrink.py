"""The shrink pass: fold STR into plain parameters and cut every dead channel out of the graph.

Takes a GraphModule analysed by :func:`~strfx.passes.channel_analysis.analyze_channels` and
returns it (changed in place) without STR: parametrized weights become their thresholded values,
STR-BN becomes an ordinary BatchNorm (γ = γ', β = γ'·β̂ + β₀), a gate right after a conv/linear
is multiplied into it and any other gate becomes a constant multiply. Then each op's ``shrink``
rule from the registry cuts its parameters, attributes and constant shape arguments with the keep
masks of its channel ids. Checking the result is the caller's job (:func:`strfx.shrink` always does).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from strfx.errors import StrfxError
from strfx.modules import STRBatchNorm, STRGate, STRWeight
from strfx.passes.channel_analysis import META_KEY, ChannelAnalysis, TInfo
from strfx.passes.channel_rules import lookup


class ShrinkError(StrfxError):
    """The cut of one op is inconsistent (a bug or an op the rules mis-describe)."""


class ShrinkCtx:
    """What shrink rules read: modules, channel facts of nodes, and the keep masks."""

    def __init__(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> None:
        self.gm = gm
        self.analysis = analysis
        self._modules = dict(gm.named_modules())
        self._visited: set[str] = set()

    def module(self, node: fx.Node) -> nn.Module:
        return self._modules[node.target]

    def first_visit(self, node: fx.Node) -> bool:
        """A module called several times is cut once (the analysis made its calls agree)."""
        if node.target in self._visited:
            return False
        self._visited.add(node.target)
        return True

    def info(self, arg: Any) -> TInfo | None:
        v = arg.meta.get(META_KEY) if isinstance(arg, fx.Node) else None
        return v if isinstance(v, TInfo) else None

    def out_value(self, node: fx.Node) -> Any:
        return node.meta.get(META_KEY)

    def keep_of(self, info: TInfo | None, dim: int) -> np.ndarray | None:
        """Bool mask of kept indices along ``dim``, or None when nothing is cut there."""
        if info is None or dim not in info.labels:
            return None
        keep = self.analysis.keep(info.labels[dim])
        return None if keep.all() else keep

    def keep_count(self, info: TInfo, dim: int) -> int:
        if dim not in info.labels:
            return info.shape[dim]
        return int(self.analysis.keep(info.labels[dim]).sum())

    def fail(self, node: fx.Node, why: str) -> None:
        raise ShrinkError(f"cannot cut {node.name} ({node.target}): {why}")


def _set_module(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, leaf, module)


def remove_str_weights(gm: fx.GraphModule) -> int:
    """Replace every STR-parametrized weight by its thresholded value (exact zeros stay zeros).

    ``parametrize.remove_parametrizations`` deletes the property from the module's class, which a
    deep copy shares with the original model; so the copy gets its own class first.
    """
    count = 0
    for _, mod in list(gm.named_modules()):
        plist = getattr(mod, "parametrizations", None)
        if plist is None:
            continue
        cls = type(mod)
        mod.__class__ = type(cls.__name__, (cls.__bases__[0],), dict(cls.__dict__))
        for tensor_name in list(plist.keys()):
            if any(isinstance(p, STRWeight) for p in plist[tensor_name]):
                # out of place: the raw tensor may be shared with the caller's model
                value = getattr(mod, tensor_name).detach().clone()
                requires_grad = plist[tensor_name].original.requires_grad
                parametrize.remove_parametrizations(mod, tensor_name, leave_parametrized=False)
                setattr(mod, tensor_name, nn.Parameter(value, requires_grad=requires_grad))
                count += 1
    return count


def _batchnorm_for(ndim: int) -> type[nn.modules.batchnorm._BatchNorm]:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(ndim, nn.BatchNorm2d)


@torch.no_grad()
def fold_str_batchnorm(m: STRBatchNorm, ndim: int) -> nn.modules.batchnorm._BatchNorm:
    """An ordinary BatchNorm computing exactly what the STR-BN computes (γ = γ', β = γ'·β̂ + β₀)."""
    bn = _batchnorm_for(ndim)(m.num_features, m.eps, m.momentum, affine=True,
                              track_running_stats=m.track_running_stats)
    bn.to(device=m.weight.device, dtype=m.weight.dtype)
    gamma = m.effective_weight().detach()
    bn.weight.copy_(gamma)
    bn.bias.copy_(gamma * m.shift.detach() + m.offset)
    if m.track_running_stats:
        bn.running_mean.copy_(m.running_mean)
        bn.running_var.copy_(m.running_var)
        bn.num_batches_tracked.copy_(m.num_batches_tracked)
    bn.train(m.training)
    return bn


def _ndim(node: fx.Node) -> int | None:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return len(shape) if shape is not None else None


@torch.no_grad()
def _fold_gate_into_producer(gm: fx.GraphModule, node: fx.Node, gate: STRGate) -> bool:
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
        return False
    prod = gm.get_submodule(src.target)
    if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == src.target) != 1:
        return False
    ndim = _ndim(node)
    g = gate.effective_weight().detach()
    # out of place: parameters may be shared with the caller's model (see strfx.surgery.prepare)
    if isinstance(prod, nn.Linear) and ndim is not None and gate.channel_dim % ndim == ndim - 1:
        w = prod.weight.detach() * g[:, None]
    elif (isinstance(prod, nn.modules.conv._ConvNd) and not prod.transposed and ndim is not None
          and gate.channel_dim % ndim == ndim - len(prod.kernel_size) - 1):
        w = prod.weight.detach() * g.reshape(-1, *[1] * (prod.weight.dim() - 1))
    else:
        return False
    prod.weight = nn.Parameter(w, requires_grad=prod.weight.requires_grad)
    if prod.bias is not None:
        prod.bias = nn.Parameter(prod.bias.detach() * g, requires_grad=prod.bias.requires_grad)
    node.replace_all_uses_with(src)
    gm.graph.erase_node(node)
    return True


def fold_str(gm: fx.GraphModule, fold_gates: bool = True) -> None:
    """STR-BN → BatchNorm, gates → folded into their conv/linear (the rest stay until :func:`gates_to_mul`)."""
    remove_str_weights(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, STRBatchNorm):
            _set_module(gm, node.target, fold_str_batchnorm(mod, _ndim(node) or 4))
        elif isinstance(mod, STRGate) and fold_gates:
            if _fold_gate_into_producer(gm, node, mod):
                if not any(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes):
                    gm.delete_submodule(node.target)


@torch.no_grad()
def gates_to_mul(gm: fx.GraphModule) -> None:
    """Each remaining gate becomes ``x * scale`` with a plain buffer: the model needs nothing from strfx."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), STRGate):
            continue
        gate = gm.get_submodule(node.target)
        ndim = _ndim(node) or 2
        shape = [1] * ndim
        shape[gate.channel_dim % ndim] = gate.num_channels
        name = node.target.replace(".", "_") + "_scale"
        gm.register_buffer(name, gate.effective_weight().detach().reshape(shape).clone())
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
            mul = gm.graph.call_function(operator.mul, (node.args[0], attr))
        mul.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", META_KEY)})
        node.replace_all_uses_with(mul)
        gm.graph.erase_node(node)
    for name, mod in list(gm.named_modules()):
        if isinstance(mod, STRGate) and name:
            gm.delete_submodule(name)


def shrink_graph(gm: fx.GraphModule, analysis: ChannelAnalysis) -> fx.GraphModule:
    """Fold STR and cut the dead channels of ``analysis`` out of ``gm`` (in place)."""
    fold_str(gm)
    ctx = ShrinkCtx(gm, analysis)
    for node in list(gm.graph.nodes):
        rule = lookup_shrink(ctx, node)
        if rule is not None:
            rule(ctx, node)
    gates_to_mul(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


class _LookupCtx:
    def __init__(self, ctx: ShrinkCtx) -> None:
        self._ctx = ctx

    def module(self, node: fx.Node) -> nn.Module:
        return self._ctx.module(node)


def lookup_shrink(ctx: ShrinkCtx, node: fx.Node) -> Any:
    rule = lookup(_LookupCtx(ctx), node)  # type: ignore[arg-type]
    return rule.shrink if rule is not None else None
