"""Channels through cat / stack / split / unbind / getitem / slice / select."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch.fx as fx

from strfx.passes.channel_analysis import Ctx, TInfo, Writer, static_shape
from strfx.passes.channel_rules._base import _nz_along, _per_index, _unknown, arg, aten, ndim_dim
from strfx.passes.channel_rules.pointwise import _tie_const


def _cat(stack: bool) -> Callable[[Ctx, fx.Node], Any]:
    def analyze(ctx: Ctx, node: fx.Node) -> Any:
        seq = arg(node, 0, "tensors")
        shape = ctx.shape(node)
        if not isinstance(seq, (list, tuple)) or shape is None:
            return _unknown(ctx, node)
        if not stack and len(shape) > 1:  # torch.cat skips 1-D empty tensors (an empty cache to append to)
            seq = [a for a in seq if not (isinstance(a, fx.Node) and ctx.shape(a) == (0,))]
        infos = [ctx.info(a) for a in seq]
        if any(i is None for i in infos):
            return _unknown(ctx, node)
        R = len(shape)
        dim = ndim_dim(arg(node, 1, "dim", 0), R)
        out = TInfo(shape)
        for d in range(R):
            if stack and d == dim:
                continue
            src = d if not stack or d < dim else d - 1
            if not stack and d == dim:
                if any(src in i.labels for i in infos):
                    ids, zeros, consts = [], [], []
                    for i in infos:
                        if src in i.labels:
                            ids.append(i.labels[src])
                            zeros.append(i.zero[src])
                            consts.append(i.const_of(src))
                        else:
                            new = ctx.new(i.shape[src])
                            ctx.block_ids(new, f"cat with a part strfx cannot cut ({node.name})")
                            ids.append(new)
                            zeros.append(np.zeros(i.shape[src], bool))
                            consts.append(np.full(i.shape[src], np.nan))
                    out.set(d, np.concatenate(ids), np.concatenate(zeros), np.concatenate(consts))
                continue
            labelled = [i for i in infos if src in i.labels]
            if not labelled:
                continue
            ids = labelled[0].labels[src]
            parts = [a for a, i in zip(seq, infos) if src not in i.labels]
            if parts:  # a parameter part (a class token) is cut with the channel
                tied = [_tie_const(ctx, a, src, ids, node) for a in parts]
                if not all(tied):
                    for i in labelled:
                        ctx.block_ids(i.labels[src], f"cat/stack with a part strfx cannot cut ({node.name})")
                    continue
                ctx.writers.append(Writer(node, "param", ids, [t for t in tied if t is not None]))
            for i in labelled[1:]:
                ctx.uf.union_arrays(ids, i.labels[src])
            zs = [i.zero[src] for i in labelled]
            cs = [i.const_of(src) for i in labelled]
            for a in parts:
                t = ctx.tensor(a)
                zs.append(~_nz_along(t, src) if t is not None else np.zeros(len(ids), bool))
                cs.append(_per_index(t, src, len(ids)))
            same = np.logical_and.reduce([c == cs[0] for c in cs])  # NaN != NaN: unknown stays unknown
            out.set(d, ids, np.logical_and.reduce(zs), np.where(same, cs[0], np.nan))
        return out

    return analyze


def _split(ctx: Ctx, node: fx.Node) -> Any:
    x = ctx.info(node.args[0])
    vals = node.meta.get("val")
    if x is None or not isinstance(vals, (tuple, list)):
        return _unknown(ctx, node)
    dim = ndim_dim(arg(node, 2, "dim", 0), x.ndim)
    outs = []
    start = 0
    for v in vals:
        o = TInfo(static_shape(v))
        n = o.shape[dim]
        for d, ids in x.labels.items():
            if d == dim:
                o.set(d, ids[start:start + n], x.zero[d][start:start + n], x.const_of(d)[start:start + n])
            else:
                o.set(d, ids, x.zero[d], x.const_of(d))
        outs.append(o)
        start += n
    return tuple(outs)


def _split_shrink(s: Any, node: fx.Node) -> None:
    """Pieces may lose different numbers of channels: always explicit sizes (``split_with_sizes``)."""
    x = s.info(node.args[0])
    if x is None:
        return
    dim = ndim_dim(arg(node, 2, "dim", 0), x.ndim)
    if s.keep_of(x, dim) is None:
        return
    sizes = [int(s.keep_count(o, dim)) for o in s.out_value(node)]
    node.target = aten.split_with_sizes.default
    node.args = (node.args[0], sizes, dim)
    node.kwargs = {}


def _unbind(ctx: Ctx, node: fx.Node) -> Any:
    x = ctx.info(node.args[0])
    vals = node.meta.get("val")
    if x is None or not isinstance(vals, (tuple, list)):
        return _unknown(ctx, node)
    dim = ndim_dim(arg(node, 1, "dim", 0), x.ndim)
    if dim in x.labels:
        ctx.block_ids(x.labels[dim], f"unbind of a channel dim ({node.name})")
    outs = []
    for v in vals:
        o = TInfo(static_shape(v))
        for d, ids in x.labels.items():
            if d != dim:
                o.set(d - (d > dim), ids, x.zero[d])
        outs.append(o)
    return tuple(outs)


def _getitem(ctx: Ctx, node: fx.Node) -> Any:
    base, idx = node.args[0], node.args[1]
    v = ctx.value(base)
    if isinstance(v, (tuple, list)) and isinstance(idx, int) and -len(v) <= idx < len(v):
        return v[idx]
    return _unknown(ctx, node)


_FULL = (0, None, math.inf)


def _slice(ctx: Ctx, node: fx.Node) -> Any:
    """``x[:, a:b]``: a full slice passes channels; a partial slice of a channel dim is followed
    (the kept part keeps its ids) but blocks the channels, as the slice bounds are constants."""
    x = ctx.info(node.args[0])
    shape = ctx.shape(node)
    if x is None or shape is None:
        return _unknown(ctx, node)
    dim = ndim_dim(arg(node, 1, "dim", 0), x.ndim)
    start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
    out = TInfo(shape)
    for d, ids in x.labels.items():
        if d != dim:
            out.set(d, ids, x.zero[d], x.const_of(d))
            continue
        if shape[d] == x.shape[d] and step == 1:
            out.set(d, ids, x.zero[d], x.const_of(d))
            continue
        ctx.block_ids(ids, f"slicing a channel dim ({node.name})")
        if all(isinstance(p, (int, type(None))) for p in (start, end, step)):
            sel = np.arange(x.shape[d])[slice(start, end, step)]
            if len(sel) == shape[d]:
                out.set(d, ids[sel], x.zero[d][sel], x.const_of(d)[sel])
    return out


def _select(ctx: Ctx, node: fx.Node) -> Any:
    x = ctx.info(node.args[0])
    shape = ctx.shape(node)
    if x is None or shape is None:
        return _unknown(ctx, node)
    dim = ndim_dim(arg(node, 1, "dim", 0), x.ndim)
    out = TInfo(shape)
    for d, ids in x.labels.items():
        if d == dim:
            ctx.block_ids(ids, f"indexing a channel dim ({node.name})")
        else:
            out.set(d - (d > dim), ids, x.zero[d], x.const_of(d))
    return out
