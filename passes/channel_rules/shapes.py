"""Channels through reshapes, permutations and expand."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch.fx as fx

from strfx.passes.channel_analysis import Ctx, TInfo
from strfx.passes.channel_rules._base import _unknown, arg, aten, ndim_dim


def _match_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Group dims of ``a`` and ``b`` into consecutive blocks with equal numbers of elements."""
    blocks = []
    i = j = 0
    while i < len(a) or j < len(b):
        ii: list[int] = []
        jj: list[int] = []
        pa = pb = 1
        if i < len(a):
            ii.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            jj.append(j)
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                ii.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                jj.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        # trailing size-1 dims join the current block
        while i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            ii.append(i)
            i += 1
        while j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            jj.append(j)
            j += 1
        blocks.append((ii, jj))
    return blocks


MAX_RESHAPE_POSITIONS = 20_000_000


def _reshape(ctx: Ctx, node: fx.Node) -> Any:
    """Follow channel ids through a reshape; a split channel dim is cut along one piece only.

    Channel shuffle (``view(B, g, C/g, H, W)``) splits C into (g, C/g): the ids of the ``g`` copies
    at the same inner index are coupled, so the cut stays rectangular and the reshape stays valid.
    The piece is the largest one, unless the split feeds attention (:func:`mark_head_splits`): then it
    is the heads, and all of a head's entries are coupled (a head goes whole).
    """
    x = ctx.info(node.args[0])
    shape = ctx.shape(node)
    if x is None or shape is None:
        return _unknown(ctx, node)
    out = TInfo(shape)
    if not x.labels:
        return out
    blocks = _match_blocks(x.shape, shape)
    if blocks is None:
        ctx.block(x, f"reshape strfx cannot follow ({node.name})")
        return out
    for ii, jj in blocks:
        labelled = [d for d in ii if d in x.labels]
        if not labelled:
            continue
        if len(labelled) > 1:
            ctx.block(x, f"reshape merging two channel dims ({node.name})", dims=labelled)
            continue
        d = labelled[0]
        big = [k for k in jj if shape[k] != 1]
        if x.shape[d] == 1:  # a one-channel dim folded into another: it cannot be cut anyway
            ctx.block_ids(x.labels[d], f"reshape folding a channel dim away ({node.name})")
            continue
        if len([k for k in ii if x.shape[k] != 1]) == 1 and len(big) == 1:
            out.set(big[0], x.labels[d], x.zero[d], x.const_of(d))
            continue
        total = math.prod(x.shape[k] for k in ii)
        if total > MAX_RESHAPE_POSITIONS or not jj:
            ctx.block_ids(x.labels[d], f"reshape strfx cannot follow ({node.name})")
            continue
        inner = math.prod(x.shape[k] for k in ii if k > d)
        pos = (np.arange(total) // inner) % x.shape[d]
        out_block = [shape[k] for k in jj]
        T = x.labels[d][pos].reshape(out_block)
        Z = x.zero[d][pos].reshape(out_block)
        K = x.const_of(d)[pos].reshape(out_block)
        varying = [a for a in range(T.ndim) if T.shape[a] > 1 and np.any(np.diff(T, axis=a) != 0)]
        if not varying:
            ctx.block_ids(x.labels[d], f"reshape folding a channel dim away ({node.name})")
            continue
        want = ctx.preferred_axis.get(node)
        a = jj.index(want) if want in jj and jj.index(want) in varying else max(varying, key=lambda k: (T.shape[k], k))
        Tm = np.moveaxis(T, a, 0).reshape(T.shape[a], -1)
        Zm = np.moveaxis(Z, a, 0).reshape(T.shape[a], -1)
        Km = np.moveaxis(K, a, 0).reshape(T.shape[a], -1)
        if len(varying) > 1:
            for row in Tm:
                ctx.uf.union_all(row)
        out.set(jj[a], Tm[:, 0].copy(), Zm.all(axis=1), np.where((Km == Km[:, :1]).all(axis=1), Km[:, 0], np.nan))
    return out


def _sizes_shrink(index: int, name: str) -> Callable[[Any, fx.Node], None]:
    """Constant sizes of cut dims (``view``/``reshape``/``expand``) become the new channel counts."""

    def shrink(s: Any, node: fx.Node) -> None:
        out = s.out_value(node)
        if not isinstance(out, TInfo):
            return
        sizes = arg(node, index, name)
        if not isinstance(sizes, (list, tuple)) or len(sizes) != len(out.shape):
            return
        new = list(sizes)
        for d in out.labels:
            n = s.keep_count(out, d)
            if n != out.shape[d] and isinstance(new[d], int) and new[d] != -1:
                new[d] = n
        if new != list(sizes):
            args = list(node.args)
            args[index] = new
            node.args = tuple(args)

    return shrink


def _unflatten_shrink(s: Any, node: fx.Node) -> None:
    out = s.out_value(node)
    if not isinstance(out, TInfo):
        return
    dim, sizes = arg(node, 1, "dim"), list(arg(node, 2, "sizes"))
    dim = ndim_dim(dim, len(out.shape) - len(sizes) + 1)
    for k in range(len(sizes)):
        d = dim + k
        if d in out.labels and isinstance(sizes[k], int) and sizes[k] != -1:
            sizes[k] = s.keep_count(out, d)
    node.args = (node.args[0], dim, sizes)


def _permute(ctx: Ctx, node: fx.Node) -> Any:
    x = ctx.info(node.args[0])
    shape = ctx.shape(node)
    dims = arg(node, 1, "dims")
    if x is None or shape is None or not isinstance(dims, (list, tuple)) or len(dims) != x.ndim:
        return _unknown(ctx, node)
    out = TInfo(shape)
    for new, old in enumerate(dims):
        old = ndim_dim(old, x.ndim)
        if old in x.labels:
            out.set(new, x.labels[old], x.zero[old], x.const_of(old))
    return out


def _transpose(ctx: Ctx, node: fx.Node) -> Any:
    x = ctx.info(node.args[0])
    shape = ctx.shape(node)
    if x is None or shape is None:
        return _unknown(ctx, node)
    if node.target in (aten.t.default, aten.numpy_T.default):
        d0, d1 = 0, max(x.ndim - 1, 0)
    else:
        d0, d1 = ndim_dim(arg(node, 1, "dim0"), x.ndim), ndim_dim(arg(node, 2, "dim1"), x.ndim)
    perm = list(range(x.ndim))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    out = TInfo(shape)
    for new, old in enumerate(perm):
        if old in x.labels:
            out.set(new, x.labels[old], x.zero[old], x.const_of(old))
    return out


def _expand(ctx: Ctx, node: fx.Node) -> Any:
    x = ctx.info(node.args[0])
    shape = ctx.shape(node)
    if x is None or shape is None:
        return _unknown(ctx, node)
    out = TInfo(shape)
    off = len(shape) - x.ndim
    for d, ids in x.labels.items():
        if x.shape[d] == shape[d + off]:
            out.set(d + off, ids, x.zero[d], x.const_of(d))
        else:
            ctx.block_ids(ids, f"expand of a channel dim ({node.name})")
    return out
