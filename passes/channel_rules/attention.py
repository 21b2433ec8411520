"""Scaled dot-product attention, and the batch×heads dims of attention written with matmuls."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from strfx.passes.channel_analysis import Ctx, TInfo, infos_of
from strfx.passes.channel_rules._base import _unknown, arg, aten
from strfx.passes.channel_rules.shapes import _match_blocks


def _sdpa(ctx: Ctx, node: fx.Node) -> Any:
    """``softmax(q kᵀ) v`` per head, q/k/v shaped (..., heads, seq, dim).

    Head h of the output reads head h of q, k and v only, so the head dims of q, k and v are coupled
    (with grouped-query attention, repeat_kv has already made each key/value head's id the id of the
    query heads sharing it: a kv head goes only with all of them) and a head is zero where v's is.
    The per-head dims of q and k are contracted together (both must be zero to go); v's pass to the
    output. A sequence dim carrying channels blocks them. A mask with one slice per head (T5's relative
    position bias, an ALiBi table) is read by its head only: its head dim is coupled with the heads, so a
    head goes with its slice of the mask (and of the parameters that made it); a per-head mask strfx cannot
    cut (its head dim carries no ids) keeps every head, and any other channel-carrying dim of a mask blocks.
    """
    q, k, v = (ctx.info(a) for a in node.args[:3])
    shape = ctx.shape(node)
    if q is None or k is None or v is None or shape is None or q.ndim < 3 or arg(node, 7, "enable_gqa", False):
        return _unknown(ctx, node)
    R = q.ndim
    mask_node = arg(node, 3, "attn_mask")
    mask = ctx.info(mask_node) if isinstance(mask_node, fx.Node) else None
    rest = {k: a for k, a in node.kwargs.items() if k != "attn_mask"}
    for extra in infos_of((node.args[4:], rest), ctx):
        ctx.block(extra, f"attention argument carrying channels ({node.name})")
    out = TInfo(shape)
    head = R - 3
    for t in (q, k, v):
        for d in list(t.labels):
            if d not in (head, R - 1):
                ctx.block_ids(t.labels[d], f"attention over a channel-labelled sequence dim ({node.name})")
    heads = [t for t in (q, k, v) if head in t.labels]
    if heads:
        if len(heads) < 3 or len({len(t.labels[head]) for t in heads}) != 1:
            for t in heads:
                ctx.block_ids(t.labels[head], f"attention heads strfx cannot pair ({node.name})")
        else:
            ids = q.labels[head]
            ctx.uf.union_arrays(ids, k.labels[head])
            ctx.uf.union_arrays(ids, v.labels[head])
            out.set(head, ids, v.zero[head].copy())
    if mask is not None:
        _sdpa_mask(ctx, node, mask, out.labels.get(head), head - (R - mask.ndim))
    for t in (q, k):  # the default scale 1/√d is written out when d is cut (_sdpa_shrink)
        if R - 1 in t.labels:
            ctx.sink(t, R - 1)
    if R - 1 in q.labels and R - 1 in k.labels and len(q.labels[R - 1]) == len(k.labels[R - 1]):
        ctx.uf.union_arrays(q.labels[R - 1], k.labels[R - 1])
    elif R - 1 in q.labels or R - 1 in k.labels:
        for t in (q, k):
            if R - 1 in t.labels:
                ctx.block_ids(t.labels[R - 1], f"attention with per-head dims strfx cannot pair ({node.name})")
    if R - 1 in v.labels:
        out.set(R - 1, v.labels[R - 1], v.zero[R - 1])
    return out


def _sdpa_mask(ctx: Ctx, node: fx.Node, mask: TInfo, heads: Any, mhead: int) -> None:
    """Couple a per-head mask's head dim (``mhead``, after broadcasting) with the ``heads`` ids; block the rest."""
    per_head = 0 <= mhead < mask.ndim and mask.shape[mhead] > 1
    for d, ids in mask.labels.items():
        if d == mhead and heads is not None and len(ids) == len(heads):
            ctx.uf.union_arrays(heads, ids)
        else:
            ctx.block_ids(ids, f"attention mask carrying channels ({node.name})")
    if heads is not None and per_head and mhead not in mask.labels:
        ctx.block_ids(heads, f"attention mask with one slice per head strfx cannot cut ({node.name})")


def _sdpa_shrink(s: Any, node: fx.Node) -> None:
    """The default scale 1/√d of the original per-head dim d is written out when d loses dims."""
    q = s.info(node.args[0])
    if q is None or arg(node, 6, "scale") is not None or s.keep_of(q, q.ndim - 1) is None:
        return
    node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(q.shape[-1])}  # keyword-only in the schema


_HEAD_PASS = {"transpose", "t", "permute", "clone", "contiguous", "alias", "_to_copy", "expand", "unsqueeze",
              "squeeze", "unbind", "select", "view", "_unsafe_view", "reshape"}


def mark_head_splits(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Reshapes that split a feature dim into (…, heads, …) for attention → the output dim of the heads.

    Walks back from every attention op's q, k and v, tracking where their head dim came from through
    transposes, permutes, unbind/select, repeats and element-wise ops (rotary embeddings), to the
    reshape that created it. Only there is the head axis the piece to cut (elsewhere, e.g. a channel
    shuffle, the largest piece is).
    """
    found: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        packet = getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None
        if packet is aten.scaled_dot_product_attention:
            operands = node.args[:3]
        elif packet is aten.matmul and all(isinstance(a, fx.Node) and a.op != "get_attr" for a in node.args[:2]):
            operands = node.args[:2]  # hand-written attention: q @ kᵀ, softmax(·) @ v on (..., heads, seq, dim)
        else:
            continue
        for a in operands:
            if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dim() >= 4:
                _trace_head(a, a.meta["val"].dim() - 3, found, 0)
    return found


def _trace_head(n: fx.Node, dim: int, found: dict[fx.Node, int], depth: int) -> None:
    if depth > 24 or n.op != "call_function":
        return
    val = n.meta.get("val")
    t = n.target
    name = t.overloadpacket.__name__ if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", "")
    if t is operator.getitem:  # a piece of unbind/split: same dims as its source
        src = n.args[0]
        if isinstance(src, fx.Node) and isinstance(src.meta.get("val"), (tuple, list)):
            return _trace_head(src, dim, found, depth + 1)
        return
    if not isinstance(t, torch._ops.OpOverload):
        return
    x = n.args[0] if n.args else None
    xval = x.meta.get("val") if isinstance(x, fx.Node) else None
    if name in ("view", "_unsafe_view", "reshape") and isinstance(xval, torch.Tensor) and isinstance(val, torch.Tensor):
        blocks = _match_blocks(tuple(int(v) for v in xval.shape), tuple(int(v) for v in val.shape))
        block = next(((ii, jj) for ii, jj in blocks or [] if dim in jj), None)
        if block is None:
            return
        ii, jj = block
        big_in = [k for k in ii if xval.shape[k] != 1]
        big_out = [k for k in jj if val.shape[k] != 1]
        if len(big_in) == 1 and len(big_out) > 1:
            found[n] = dim  # the split that made the heads (or split a batch × heads dim: look further)
            _trace_head(x, big_in[0], found, depth + 1)
        elif len(big_in) > 1 and len(big_out) == 1:  # a merge (repeat_kv): the heads are its outer piece
            _trace_head(x, big_in[0], found, depth + 1)
        elif len(big_in) == 1 and len(big_out) == 1:
            _trace_head(x, big_in[0], found, depth + 1)
        else:  # (batch, channels) → (batch × heads, head dim), as nn.MultiheadAttention does
            found[n] = dim
        return
    if name in ("transpose", "swapaxes"):
        nd = val.dim()
        d0, d1 = int(n.args[1]) % nd, int(n.args[2]) % nd
        return _trace_head(x, d1 if dim == d0 else d0 if dim == d1 else dim, found, depth + 1)
    if name == "permute":
        return _trace_head(x, int(n.args[1][dim]) % xval.dim(), found, depth + 1)
    if name in ("unsqueeze",):
        u = int(n.args[1]) % val.dim()
        return None if dim == u else _trace_head(x, dim - (dim > u), found, depth + 1)
    if name in ("select",):
        s = int(n.args[1]) % xval.dim()
        return _trace_head(x, dim + (dim >= s), found, depth + 1)
    if name in ("unbind",):
        s = int(n.args[1]) % xval.dim() if len(n.args) > 1 else 0
        return _trace_head(x, dim + (dim >= s), found, depth + 1)
    if name in ("clone", "contiguous", "alias", "_to_copy", "expand") or torch.Tag.pointwise in t.tags:
        nd = val.dim() if isinstance(val, torch.Tensor) else None
        for a in n.args:
            if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dim() == nd:
                if a.meta["val"].shape[dim] == val.shape[dim]:
                    _trace_head(a, dim, found, depth + 1)
        return
