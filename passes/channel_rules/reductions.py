"""Reductions, spatial ops (pools, pads, roll, interpolation) and softmax."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch.fx as fx

from strfx.passes.channel_analysis import Ctx, TInfo
from strfx.passes.channel_rules._base import _copy, _unknown, arg, aten, ndim_dim, op_name, short_name


def _reduce(kind: str, dim_at: int = 1) -> Callable[[Ctx, fx.Node], Any]:
    """A sum over channels mixes them (zeros add nothing); mean/max/var over channels change with the count.

    ``dim_at``: the position of ``dim`` in the op's schema. A zero channel has zero sum, mean, max, var, std."""

    def analyze(ctx: Ctx, node: fx.Node) -> Any:
        x = ctx.info(node.args[0])
        shape = ctx.shape(node)
        if x is None or shape is None:
            return _unknown(ctx, node)
        dims = arg(node, dim_at, "dim")
        if dims is None or dims == []:
            red = list(range(x.ndim))
        elif isinstance(dims, int):
            red = [ndim_dim(dims, x.ndim)]
        elif isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims):
            red = [ndim_dim(d, x.ndim) for d in dims]
        else:
            return _unknown(ctx, node)
        keepdim = len(shape) == x.ndim  # ATen's output shape decides (var.dim has ``unbiased`` before keepdim)
        out = TInfo(shape)
        for d, ids in x.labels.items():
            if d in red:
                if kind in ("sum", "mean"):  # a mean keeps the original count (see _mean_shrink)
                    ctx.sink(x, d, why_not=f"a {kind} over channels ({node.name}) would lose it")
                else:
                    ctx.block_ids(ids, f"{kind} over a channel dim ({node.name})")
                continue
            nd = d if keepdim else d - sum(1 for r in red if r < d)
            count = math.prod(x.shape[r] for r in red)
            if kind in ("var", "std"):  # the spread of a constant channel is zero
                const = np.where(np.isnan(x.const_of(d)), np.nan, 0.0)
            else:
                const = x.const_of(d) * (count if kind == "sum" else 1)
            out.set(nd, ids, x.zero[d] if kind in ("sum", "mean", "max", "var", "std") else None, const)
        return out

    return analyze


def _vector_norm(ctx: Ctx, node: fx.Node) -> Any:
    """``linalg_vector_norm(x, ord, dim, keepdim)``: a zero channel has norm 0 (reduced over other dims); over
    channels, zero entries add nothing to a p-norm with p > 0 (or ∞), as to a sum; p ≤ 0 counts them."""
    order = arg(node, 1, "ord", 2)
    kind = "sum" if isinstance(order, (int, float)) and order > 0 else "norm"
    return _reduce(kind, dim_at=2)(ctx, node)


def _spatial(n_spatial: Callable[[fx.Node, TInfo], int | set[int]],
             zero_preserving: bool | Callable[[fx.Node], bool] = True):
    """Pooling/upsampling/pad/roll: channels pass through; the dims the op works along (the last
    ``n_spatial`` ones, or the set it returns) must not be channels."""

    def analyze(ctx: Ctx, node: fx.Node) -> Any:
        x = ctx.info(node.args[0])
        shape = ctx.shape(node)
        if isinstance(node.meta.get("val"), (tuple, list)):  # max_pool with indices
            vals = ctx.fresh_value(node)
            shape = vals[0].shape if vals and vals[0] is not None else None
        if x is None or shape is None or len(shape) != x.ndim:
            return _unknown(ctx, node)
        k = n_spatial(node, x)
        moved = k if isinstance(k, set) else set(range(x.ndim - k, x.ndim))
        zp = zero_preserving(node) if callable(zero_preserving) else zero_preserving
        out = TInfo(shape)
        for d, ids in x.labels.items():
            if d in moved:
                ctx.block_ids(ids, f"{op_name(node)} over a channel dim ({node.name})")
            else:
                out.set(d, ids, x.zero[d] if zp else None, x.const_of(d) if zp and _keeps_constants(node) else None)
        if isinstance(node.meta.get("val"), (tuple, list)):  # (values, indices): indices follow the values
            return (out, _copy(out, zero=False))
        return out

    return analyze


_CONSTANT_KEEPING = ("reflection_pad", "replication_pad", "max_pool", "adaptive_max_pool", "adaptive_avg_pool",
                     "_adaptive_avg_pool", "upsample_nearest", "_upsample_nearest_exact")


def _keeps_constants(node: fx.Node) -> bool:
    """A channel that is one value everywhere stays that value: pads that copy the border, max pooling
    (its padding is −inf), adaptive pooling (no padding) and nearest upsampling. Zero padding, average
    pooling with padding and interpolation (rounding of the weights) are not claimed."""
    name = short_name(node)
    if node.target is aten.pad.default:  # reflect / replicate / circular copy the channel's own values
        return arg(node, 2, "mode", "constant") != "constant"
    return any(name.startswith(p) for p in _CONSTANT_KEEPING)


def _all_but_two(node: fx.Node, x: TInfo) -> int:
    return max(x.ndim - 2, 0)


def _fixed(k: int) -> Callable[[fx.Node, TInfo], int]:
    return lambda node, x: k


def _pad_dims(node: fx.Node, x: TInfo) -> set[int]:
    """The dims a pad widens (a (0, 0) pair leaves its dim alone: ``F.pad(x, (0, 0, 0, 1))`` on NHWC)."""
    pad = arg(node, 1, "pad")
    if not isinstance(pad, (list, tuple)) or not all(isinstance(p, int) for p in pad):
        return set(range(x.ndim))
    return {x.ndim - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]}


def _roll_dims(node: fx.Node, x: TInfo) -> set[int]:
    """``roll(x, shifts, dims)`` (Swin's shifted windows) moves entries along ``dims`` only."""
    dims = arg(node, 2, "dims", [])
    if not dims:
        return set(range(x.ndim))  # a roll of the flattened tensor mixes everything
    return {ndim_dim(d, x.ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}


def _pad_zp(node: fx.Node) -> bool:
    mode = arg(node, 2, "mode", "constant") if node.target is aten.pad.default else "constant"
    value = arg(node, 3, "value", None) if node.target is aten.pad.default else arg(node, 2, "value", 0)
    return mode != "constant" or value is None or value == 0


def _softmax(ctx: Ctx, node: fx.Node) -> Any:
    x = ctx.info(node.args[0])
    dim = arg(node, 1, "dim")
    if x is None or not isinstance(dim, int):
        return _unknown(ctx, node)
    dim = ndim_dim(dim, x.ndim)
    out = TInfo(x.shape)
    for d, ids in x.labels.items():
        if d == dim:
            ctx.block_ids(ids, f"softmax over a channel dim ({node.name})")
        else:
            out.set(d, ids)
    return out
