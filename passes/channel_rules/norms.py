"""Per-channel ops: batch/instance/group/layer/RMS norms, means over channels, PReLU."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from strfx.passes.channel_analysis import Ctx, TInfo, Writer, static_shape
from strfx.passes.channel_rules._base import _copy, _nz, _unknown, arg, aten, ndim_dim, op_name, short_name


@dataclass(frozen=True)
class NormArgs:
    """Where a norm overload keeps its operands (None: it has no such operand)."""

    weight: int
    bias: int | None
    mean: int | None = None
    var: int | None = None
    groups: int | None = None  # the num_groups argument
    use_input_stats: int | None = None
    stats_over_channels: bool = False  # group/instance norm: statistics over more than one channel


NORMS: dict[Any, NormArgs] = {
    aten._native_batch_norm_legit_no_training.default: NormArgs(1, 2, 3, 4),
    aten._native_batch_norm_legit.default: NormArgs(1, 2, 3, 4, use_input_stats=5),
    aten._native_batch_norm_legit.no_stats: NormArgs(1, 2, use_input_stats=3),
    aten._native_batch_norm_legit_functional.default: NormArgs(1, 2, 3, 4, use_input_stats=5),
    aten.native_batch_norm.default: NormArgs(1, 2, 3, 4, use_input_stats=5),
    aten.batch_norm.default: NormArgs(1, 2, 3, 4, use_input_stats=5),
    aten.instance_norm.default: NormArgs(1, 2, 3, 4, use_input_stats=5, stats_over_channels=False),
    aten.group_norm.default: NormArgs(2, 3, groups=1, stats_over_channels=True),
    aten.native_group_norm.default: NormArgs(1, 2, groups=6, stats_over_channels=True),
}


def _norm(ctx: Ctx, node: fx.Node) -> Any:
    """Batch/instance/group norm over dim 1: each channel is normalised on its own statistics
    (group norm: within its group, so groups are cut whole)."""
    spec = NORMS[node.target]
    x = ctx.info(node.args[0])
    val = node.meta.get("val")
    multi = isinstance(val, (tuple, list))
    shape = static_shape(val[0] if multi else val)
    if x is None or shape is None or shape != x.shape or x.ndim < 2:
        return _unknown(ctx, node)
    is_instance = node.target is aten.instance_norm.default
    out = TInfo(shape)
    for d, ids in x.labels.items():
        if d == 1:
            continue
        if spec.stats_over_channels or is_instance:
            ctx.block_ids(ids, f"{short_name(node)} normalizes over these channels ({node.name})")
        else:
            out.set(d, ids)
    ids = x.labels.get(1)
    if ids is None:  # a norm (maybe shared) on channels strfx does not follow: its parameters stay whole
        for i in (spec.weight, spec.bias, spec.mean, spec.var):
            p = arg(node, i, "") if i is not None else None
            if isinstance(p, fx.Node):
                ctx.pin(p, 0, f"{short_name(node)} reads an input strfx does not follow ({node.name})")
        return (out, *ctx.fresh_value(node)[1:]) if multi else out
    n = x.shape[1]
    w_node, b_node = arg(node, spec.weight, "weight"), arg(node, spec.bias, "bias") if spec.bias is not None else None
    m_node = arg(node, spec.mean, "running_mean") if spec.mean is not None else None
    v_node = arg(node, spec.var, "running_var") if spec.var is not None else None
    groups = int(arg(node, spec.groups, "group")) if spec.groups is not None else None
    if groups:
        for row in ids.reshape(groups, -1):
            ctx.uf.union_all(row)
    params = []
    for p in (w_node, b_node, m_node, v_node):
        if isinstance(p, fx.Node):
            if ctx.param_name(p) is None:
                ctx.block_ids(ids, f"{op_name(node)} with a parameter computed in the graph ({node.name})")
            ctx.tie(p, 0, ids)
    for p in (w_node, b_node):
        if ctx.param_name(p) is not None:
            params.append((p.target, 0))
    # which channels come out exactly zero
    w, b = ctx.tensor(w_node), ctx.tensor(b_node)
    b_zero = np.ones(n, bool) if not isinstance(b_node, fx.Node) else (~_nz(b) if b is not None else np.zeros(n, bool))
    zero = np.zeros(n, bool)
    if isinstance(w_node, fx.Node) and w is not None:
        zero |= ~_nz(w) & b_zero
    use_stats = arg(node, spec.use_input_stats, "training") if spec.use_input_stats is not None else m_node is None
    if use_stats is True or m_node is None:  # statistics of the input itself: a zero channel stays 0 (x̂ = 0)
        if groups:
            zero |= np.repeat(x.zero[1].reshape(groups, -1).all(axis=1), n // groups) & b_zero
        else:
            zero |= x.zero[1] & b_zero
    else:  # running statistics: x̂ = -mean/σ, zero only where the running mean is zero too
        mean = ctx.tensor(m_node)
        if mean is not None:
            zero |= x.zero[1] & ~_nz(mean) & b_zero
    const = np.full(n, np.nan)  # γ = 0: the channel is β whatever the input (network slimming leaves many)
    if isinstance(w_node, fx.Node) and w is not None and (b is not None or not isinstance(b_node, fx.Node)):
        beta = b.detach().to(torch.float64).cpu().numpy() if b is not None else np.zeros(n)
        const = np.where(~_nz(w), beta, np.nan)
    out.set(1, ids, zero, const)
    kind = "batch_norm" if "batch_norm" in op_name(node) else "norm"
    ctx.writers.append(Writer(node, kind, ids, params, affine=isinstance(w_node, fx.Node) and isinstance(b_node, fx.Node)))
    return (out, *ctx.fresh_value(node)[1:]) if multi else out


def _group_norm_shrink(s: Any, node: fx.Node) -> None:
    """Group norm loses whole groups: its group count (and C) follow the cut."""
    spec = NORMS[node.target]
    x = s.info(node.args[0])
    if x is None or 1 not in x.labels:
        return
    keep = s.keep_of(x, 1)
    if keep is None:
        return
    args = list(node.args)
    g = int(args[spec.groups])
    per = x.shape[1] // g
    args[spec.groups] = int(keep.reshape(g, per)[:, 0].sum())
    if node.target is aten.native_group_norm.default:
        args[4] = int(keep.sum())  # C
    node.args = tuple(args)


def _last_dims_norm(ctx: Ctx, node: fx.Node) -> Any:
    """layer_norm / rms_norm over the last dim(s).

    Over one dim, channels stay channels: output channel c is input channel c normalised, but the
    statistics read every channel. So a channel can go only where its input is exactly zero (a
    sink: it adds nothing to the sums) and the cut keeps the original width as the divisor (see
    :func:`_last_dims_norm_shrink`); the output channel is zero where γ and β are (rms_norm: or the
    input). Normalised over several dims, the channels are blocked.
    """
    x = ctx.info(node.args[0])
    val = node.meta.get("val")
    multi = isinstance(val, (tuple, list))
    if x is None:
        return _unknown(ctx, node)
    ns = arg(node, 1, "normalized_shape")
    k = len(ns) if isinstance(ns, (list, tuple)) else 1
    rms = node.target.overloadpacket is aten.rms_norm
    w_node = arg(node, 2, "weight")
    b_node = None if rms else arg(node, 3, "bias")
    b = ctx.tensor(b_node) if isinstance(b_node, fx.Node) else None
    bias_zero = not isinstance(b_node, fx.Node) or (b is not None and not _nz(b).any())
    out = TInfo(x.shape)
    for d, ids in x.labels.items():
        if d < x.ndim - k:  # a zero row normalises to 0, then β is added
            out.set(d, ids, x.zero[d] & bias_zero)
            continue
        params = [p for p in (w_node, b_node) if isinstance(p, fx.Node)]
        if k != 1 or any(ctx.param_name(p) is None for p in params):
            ctx.block_ids(ids, f"{short_name(node)} normalizes across these channels ({node.name})")
            continue
        ctx.sink(x, d, why_not=f"{short_name(node)} statistics read it ({node.name})")
        for p in params:
            ctx.tie(p, 0, ids)
        n = len(ids)
        w = ctx.tensor(w_node) if isinstance(w_node, fx.Node) else None
        w_zero = ~_nz(w) if w is not None else np.zeros(n, bool)
        b_zero = ~_nz(b) if b is not None else np.full(n, not isinstance(b_node, fx.Node))
        out.set(d, ids, (w_zero | x.zero[d]) if rms else (w_zero & b_zero))
        if params:
            ctx.writers.append(Writer(node, "layer_norm", ids, [(p.target, 0) for p in params]))
    return (out, *ctx.fresh_value(node)[1:]) if multi else out


def _reduced_dims(node: fx.Node, ndim: int, dim_at: int = 1) -> list[int] | None:
    dims = arg(node, dim_at, "dim")
    if dims is None or dims == []:
        return list(range(ndim))
    if isinstance(dims, int):
        return [ndim_dim(dims, ndim)]
    if isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims):
        return [ndim_dim(d, ndim) for d in dims]
    return None


def _full_width(s: Any, node: fx.Node, x: TInfo, dims: list[int]) -> tuple[int, int] | None:
    """(original, kept) number of elements over ``dims`` of ``x`` when the cut shrinks them, else None."""
    if not any(s.keep_of(x, d) is not None for d in dims):
        return None
    return math.prod(x.shape[d] for d in dims), math.prod(s.keep_count(x, d) for d in dims)


def _mean_shrink(s: Any, node: fx.Node) -> None:
    """A mean over cut channels keeps the original count as its divisor: ``mean · kept / original``
    (the cut channels were exactly zero, so the sum is unchanged)."""
    x = s.info(node.args[0])
    dims = _reduced_dims(node, x.ndim) if x is not None else None
    widths = _full_width(s, node, x, dims) if dims is not None else None
    if widths is None:
        return
    old, new = widths
    graph = node.graph
    with graph.inserting_after(node):
        scaled = graph.call_function(aten.mul.Tensor, (node, new / old))
    scaled.meta = dict(node.meta)
    node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
    s.record_width(node, "mean", old, new)


def _last_dims_norm_shrink(s: Any, node: fx.Node) -> None:
    """A layer_norm / rms_norm that lost channels is written out with the original width as divisor.

    The cut channels were exactly zero at the input: they add nothing to Σx or Σx², but they did
    count in the mean (layer_norm: each also added μ² to the variance). Plain ATen ops, so the result
    exports to ONNX as it is.
    """
    x = s.info(node.args[0])
    if x is None or s.keep_of(x, x.ndim - 1) is None:
        return
    old, new = x.shape[-1], s.keep_count(x, x.ndim - 1)
    rms = node.target.overloadpacket is aten.rms_norm
    xn, w = node.args[0], arg(node, 2, "weight")
    b = None if rms else arg(node, 3, "bias")
    eps = arg(node, 3 if rms else 4, "eps", None if rms else 1e-5)
    if eps is None:
        eps = torch.finfo(node.args[0].meta["val"].dtype).eps
    g = node.graph
    call = g.call_function
    with g.inserting_before(node):
        if rms:
            mean = None
            ms = call(aten.div.Tensor, (call(aten.sum.dim_IntList, (call(aten.mul.Tensor, (xn, xn)), [-1], True)), old))
            r = call(aten.rsqrt.default, (call(aten.add.Tensor, (ms, eps)),))
            y = call(aten.mul.Tensor, (xn, r))
        else:
            mean = call(aten.div.Tensor, (call(aten.sum.dim_IntList, (xn, [-1], True)), old))
            d = call(aten.sub.Tensor, (xn, mean))
            ss = call(aten.sum.dim_IntList, (call(aten.mul.Tensor, (d, d)), [-1], True))
            extra = call(aten.mul.Tensor, (call(aten.mul.Tensor, (mean, mean)), float(old - new)))
            var = call(aten.div.Tensor, (call(aten.add.Tensor, (ss, extra)), old))
            r = call(aten.rsqrt.default, (call(aten.add.Tensor, (var, eps)),))
            y = call(aten.mul.Tensor, (d, r))
        if isinstance(w, fx.Node):
            y = call(aten.mul.Tensor, (y, w))
        if isinstance(b, fx.Node):
            y = call(aten.add.Tensor, (y, b))
    if isinstance(node.meta.get("val"), (tuple, list)):  # native_layer_norm: (out, mean, rstd)
        parts = (y, mean, r)
        for user in list(node.users):
            if user.target is not operator.getitem or parts[user.args[1]] is None:
                raise ValueError(f"{node.name}: a use of the normalisation statistics strfx cannot rewrite")
            parts[user.args[1]].meta = dict(user.meta)  # later rules read its channel facts (a norm after a norm)
            user.replace_all_uses_with(parts[user.args[1]])
            g.erase_node(user)
    else:
        y.meta = dict(node.meta)  # later rules read its channel facts (a norm after a norm)
        node.replace_all_uses_with(y)
    s.record_width(node, "rms_norm" if rms else "layer_norm", old, new)
    g.erase_node(node)


def _prelu(ctx: Ctx, node: fx.Node) -> Any:
    x = ctx.info(node.args[0])
    w_node = node.args[1]
    if x is None:
        return _unknown(ctx, node)
    out = _copy(x)
    w_shape = ctx.shape(w_node)
    if w_shape and w_shape[0] > 1 and x.ndim >= 2 and 1 in x.labels:
        ctx.tie(w_node, 0, x.labels[1])
    elif w_shape and w_shape[0] > 1:
        ctx.pin(w_node, 0, f"prelu on channels strfx does not follow ({node.name})")
    return out
