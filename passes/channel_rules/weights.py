"""Weight layers: conv, linear, matmul/bmm products, embedding."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from strfx.passes.channel_analysis import Ctx, FoldSite, TInfo, Writer, infos_of, module_path
from strfx.passes.channel_rules._base import (
    _blocking, _nz, _nz_along, _unknown, _values, arg, aten, op_name, short_name
)


def _conv_args(node: fx.Node) -> tuple[bool, int]:
    """(transposed, groups) of any ATen convolution overload."""
    t = node.target
    if t is aten.convolution.default:
        return bool(arg(node, 6, "transposed")), int(arg(node, 8, "groups", 1))
    if t.overloadpacket in (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d):
        return True, int(arg(node, 6, "groups", 1))
    return False, int(arg(node, 6, "groups", 1))


def _conv_out_zero(w: torch.Tensor | None, bias: torch.Tensor | None, has_bias: bool, transposed: bool,
                   g: int, cin: int, cout: int, in_zero: np.ndarray) -> np.ndarray:
    """Output channels that are exactly zero: no bias, and every non-zero weight reads a zero input.

    Works per group on the (groups, out/g, in/g) weight pattern, never on a dense out×in matrix
    (a depthwise conv with 4,000 channels would otherwise build a 16M-entry one).
    """
    if w is None or (has_bias and bias is None):
        return np.zeros(cout, dtype=bool)
    ig, og = cin // g, cout // g
    w = w.detach()
    live_in = ~in_zero.reshape(g, ig)
    if live_in.all():
        if transposed:
            reads_live = w.reshape(g, ig, og, -1).any(-1).any(1).cpu().numpy()
        else:
            reads_live = w.flatten(1).any(1).cpu().numpy()
    elif transposed:
        nz = w.flatten(2).any(-1).cpu().numpy()
        reads_live = (nz.reshape(g, ig, og) & live_in[:, :, None]).any(1)
    else:
        nz = w.flatten(2).any(-1).cpu().numpy()
        reads_live = (nz.reshape(g, og, ig) & live_in[:, None, :]).any(2)
    no_bias = np.ones(cout, dtype=bool) if not has_bias else ~_nz(bias)
    return no_bias & ~reads_live.reshape(cout)


def _padding(node: fx.Node) -> Any:
    if node.target is aten.convolution.default:
        return arg(node, 4, "padding", 0)
    return arg(node, 4, "padding", 0)


# ops whose bias argument a module can fill (nn.Linear / nn.Conv*d with bias=False pass None there)
BIAS_SLOT = frozenset({"linear", "conv1d", "conv2d", "conv3d", "convolution"})


def _fold_site(ctx: Ctx, node: fx.Node, w_node: Any, b_node: Any, in_dim: int, out_dim: int,
               transposed: bool) -> tuple[FoldSite | None, str]:
    """Whether this conv/linear can absorb a constant input channel into its bias exactly, or why not."""
    where = f"{short_name(node)} {module_path(node) or node.name}"
    if transposed:
        return None, f"the transposed convolution {where} adds it a position-dependent number of times"
    pad = _padding(node) if short_name(node) not in ("linear", "addmm", "mm", "matmul") else 0
    if isinstance(pad, str):
        no_pad = pad == "valid"
    else:
        no_pad = all(int(p) == 0 for p in (pad if isinstance(pad, (list, tuple)) else [pad]))
    if not no_pad:
        return None, f"{where} zero-pads it (a constant channel is not constant at the borders, so no bias can absorb it)"
    if b_node is None and ctx.param_name(w_node) is not None and short_name(node) in BIAS_SLOT:
        return FoldSite(node.name, w_node.target, None, in_dim, out_dim), f"{where} has no bias parameter to absorb it"
    if ctx.param_name(w_node) is None or ctx.param_name(b_node) is None:
        return None, f"{where} has no bias parameter to absorb it"
    if len(b_node.users) != 1:
        return None, f"{where} shares its bias with another op"
    return FoldSite(node.name, w_node.target, b_node.target, in_dim, out_dim), ""


def _needs_param(ctx: Ctx, node: fx.Node, w: Any, ids_to_block: list[np.ndarray]) -> bool:
    """A weight must be a parameter read directly (a ``get_attr``) to be cut with its channels."""
    if ctx.param_name(w) is not None:
        return True
    for ids in ids_to_block:
        ctx.block_ids(ids, f"{op_name(node)} with a weight computed in the graph ({node.name})")
    return False


def _conv(ctx: Ctx, node: fx.Node) -> Any:
    x = ctx.info(node.args[0])
    w_node, b_node = node.args[1], arg(node, 2, "bias")
    shape = ctx.shape(node)
    w_shape = ctx.shape(w_node) if isinstance(w_node, fx.Node) else None
    if x is None or shape is None or w_shape is None:
        return _unknown(ctx, node)
    transposed, g = _conv_args(node)
    n_sp = len(w_shape) - 2
    cdim = x.ndim - n_sp - 1
    along: list[int] = []  # labelled spatial dims the conv maps position by position (CoaT's Conv1d over scales)
    for d in list(x.labels):
        if d == cdim:
            continue
        if not transposed and d > cdim and _pointwise_along(node, w_shape, d - cdim - 1):
            along.append(d)
        else:
            ctx.block_ids(x.labels[d], f"convolution over a channel-labelled spatial dim ({node.name})")
    cin = x.shape[cdim]
    cout = shape[len(shape) - n_sp - 1]
    ig, og = cin // g, cout // g
    out_dim_w = 1 if transposed else 0
    out_ids = ctx.out_ids(w_node, 0, cout) if not transposed else ctx.new(cout)
    xin = x.labels.get(cdim)
    in_zero = x.zero[cdim] if xin is not None else np.zeros(cin, dtype=bool)
    carried = [out_ids] + ([xin] if xin is not None else []) + [x.labels[d] for d in along]
    if not _needs_param(ctx, node, w_node, carried):
        out = TInfo(shape)
        out.set(len(shape) - n_sp - 1, out_ids)
        return out
    w = ctx.tensor(w_node)
    bias = ctx.tensor(b_node) if isinstance(b_node, fx.Node) else None
    zero = _conv_out_zero(w, bias, isinstance(b_node, fx.Node), transposed, g, cin, cout, in_zero)
    # a filter that reads nothing live outputs its bias everywhere: a constant channel
    const = np.full(cout, np.nan)
    if w is not None and (bias is not None or not isinstance(b_node, fx.Node)):
        reads_nothing = _conv_out_zero(w, None, False, transposed, g, cin, cout, in_zero)
        const = np.where(reads_nothing, _values(bias, cout), np.nan)
    # parameters: the weight's out (and in) dims, the bias
    unfollowed = f"{short_name(node)} reads an input strfx does not follow ({node.name})"
    if transposed:  # weight (cin, cout/g, k...)
        if xin is not None:
            ctx.tie(w_node, 0, xin)
        else:
            ctx.pin(w_node, 0, unfollowed)
        if g == 1:
            ctx.tie(w_node, 1, out_ids)
    else:  # weight (cout, cin/g, k...)
        ctx.tie(w_node, 0, out_ids)
        if xin is not None and g == 1:
            ctx.tie(w_node, 1, xin)
        elif xin is None:
            ctx.pin(w_node, 1, unfollowed)
    if isinstance(b_node, fx.Node):
        ctx.tie(b_node, 0, out_ids)
    if g == 1:
        if xin is not None:
            fold, why = _fold_site(ctx, node, w_node, b_node, 1, 0, transposed)
            ctx.sink(x, cdim, fold, why)
    elif ig == 1:
        # depthwise-like: each input channel owns its og outputs; cut whole groups
        if xin is None:
            ctx.block_ids(out_ids, f"grouped convolution on channels strfx cannot cut ({node.name})")
        else:
            ctx.uf.union_arrays(np.repeat(xin, og), out_ids)
    else:
        # grouped: cut the same positions in every group so that the group structure stays valid
        if xin is not None:
            for col in xin.reshape(g, ig).T:
                ctx.uf.union_all(col)
            ctx.sink(x, cdim)
        for col in out_ids.reshape(g, og).T:
            ctx.uf.union_all(col)
        # the weight's per-group dims carry the first group's ids (all groups are cut alike)
        if transposed:
            ctx.tie(w_node, 1, out_ids.reshape(g, og)[0])
        elif xin is not None:
            ctx.tie(w_node, 1, xin.reshape(g, ig)[0])
    params = [(w_node.target, out_dim_w)] + ([(b_node.target, 0)] if ctx.param_name(b_node) else [])
    ctx.writers.append(Writer(node, "conv", out_ids, params))
    out = TInfo(shape)
    out.set(len(shape) - n_sp - 1, out_ids, zero, const)
    for d in along:
        out.set(d, x.labels[d], *_positions_through(x, d, w, bias, cout))
    return out


def _pointwise_along(node: fx.Node, w_shape: tuple[int, ...], j: int) -> bool:
    """Whether spatial dim ``j`` of a (non-transposed) conv maps position p to position p: kernel 1, stride 1,
    no padding there, so a labelled position can be cut from its input and output alike."""
    def nth(v: Any) -> int:
        if isinstance(v, (list, tuple)):
            return int(v[j] if len(v) > j else v[0])
        return int(v)

    pad = _padding(node)
    return w_shape[2 + j] == 1 and nth(arg(node, 3, "stride", 1)) == 1 and (isinstance(pad, str) or nth(pad) == 0)


def _positions_through(x: TInfo, d: int, w: torch.Tensor | None, bias: torch.Tensor | None,
                       cout: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero / constant positions of the output along a position-by-position dim ``d``.

    A position whose input slice is the constant c (0 included) outputs ``c·Σw[o] + b[o]`` in every output
    channel o: a constant only where that is one number for every o (no bias and c = 0 gives 0).
    """
    n = len(x.labels[d])
    if w is None or cout == 0:
        return np.zeros(n, dtype=bool), np.full(n, np.nan)
    wsum = w.detach().to(torch.float64).flatten(1).sum(1).cpu().numpy()
    c = x.const_of(d)
    out = c[:, None] * wsum[None, :] + _values(bias, cout)[None, :]  # (positions, out channels), NaN: unknown
    same = np.isfinite(c) & (out.max(1) == out.min(1))
    const = np.where(same, out[:, 0], np.nan)
    return same & (const == 0), const


def _conv_shrink(s: Any, node: fx.Node) -> None:
    """Depthwise-like convs lose whole groups: ``groups`` becomes the kept input channel count."""
    transposed, g = _conv_args(node)
    if g == 1:
        return
    x = s.info(node.args[0])
    w_shape = s.shape(node.args[1])
    if x is None or w_shape is None:
        return
    cdim = x.ndim - (len(w_shape) - 2) - 1
    cin = x.shape[cdim]
    if cin // g != 1:
        return  # grouped: every group keeps the same positions, the count stays
    new_g = s.keep_count(x, cdim)
    idx = 8 if node.target is aten.convolution.default else 6
    args = list(node.args)
    while len(args) <= idx:  # fill defaulted arguments from the schema
        sch = node.target._schema.arguments[len(args)]
        args.append(node.kwargs.get(sch.name, sch.default_value))
    args[idx] = new_g
    node.args = tuple(args)
    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "groups"}


def _dense(ctx: Ctx, node: fx.Node, x_arg: Any, w_node: Any, b_node: Any, out_dim: int, in_dim: int) -> Any:
    """``x @ W.T + b`` over the last dim of ``x``; ``W``'s output channels along ``out_dim``."""
    x = ctx.info(x_arg)
    shape = ctx.shape(node)
    if x is None or shape is None:
        return _unknown(ctx, node)
    last = x.ndim - 1
    xin = x.labels.get(last)
    n_in, n_out = x.shape[last], shape[-1]
    in_zero = x.zero[last] if xin is not None else np.zeros(n_in, dtype=bool)
    out_ids = ctx.out_ids(w_node, out_dim, n_out)
    if not _needs_param(ctx, node, w_node, [out_ids] + ([xin] if xin is not None else [])):
        out = TInfo(shape)
        out.set(len(shape) - 1, out_ids)
        return out
    w = ctx.tensor(w_node)
    bias = ctx.tensor(b_node) if isinstance(b_node, fx.Node) else None
    has_bias = isinstance(b_node, fx.Node)
    ctx.tie(w_node, out_dim, out_ids)
    if xin is not None:
        ctx.tie(w_node, in_dim, xin)
        fold, why = _fold_site(ctx, node, w_node, b_node, in_dim, out_dim, False)
        ctx.sink(x, last, fold, why)
    else:
        ctx.pin(w_node, in_dim, f"{short_name(node)} reads an input strfx does not follow ({node.name})")
    if has_bias:
        ctx.tie(b_node, -1, out_ids)
    const = np.full(n_out, np.nan)
    if w is None or has_bias and bias is None:
        zero = np.zeros(n_out, bool)
    else:
        ww = w.detach() if out_dim == 0 else w.detach().t()
        if in_zero.any():
            ww = ww[:, torch.from_numpy(~in_zero).to(ww.device)]
        zero = ~ww.any(1).cpu().numpy() & (np.ones(n_out, bool) if not has_bias else ~_nz_along(bias, bias.dim() - 1))
        if bias is None or bias.dim() == 1:  # a row that reads nothing live outputs its bias: a constant
            const = np.where(~ww.any(1).cpu().numpy(), _values(bias, n_out), np.nan)
    bias_zero = not has_bias or (bias is not None and not _nz(bias).any())
    out = TInfo(shape)
    for d, ids in x.labels.items():
        if d != last:
            out.set(d, ids, x.zero[d] & bias_zero)
    out.set(len(shape) - 1, out_ids, zero, const)
    params = [(w_node.target, out_dim)] + ([(b_node.target, 0)] if ctx.param_name(b_node) else [])
    ctx.writers.append(Writer(node, "linear", out_ids, params))
    return out


def _linear(ctx: Ctx, node: fx.Node) -> Any:
    return _dense(ctx, node, node.args[0], node.args[1], arg(node, 2, "bias"), 0, 1)


def _matmul(ctx: Ctx, node: fx.Node) -> Any:
    """``x @ W`` with a 2-D parameter ``W`` (HF's Conv1D: ``addmm(b, x, W)``) is a linear layer with
    ``W`` transposed; a product of two activations (attention) blocks its operands."""
    if node.target.overloadpacket is aten.addmm:
        b, x, w = node.args[0], node.args[1], node.args[2]
        scalars_default = arg(node, 3, "beta", 1) == 1 and arg(node, 4, "alpha", 1) == 1
    else:
        b, x, w = None, node.args[0], node.args[1]
        scalars_default = True
    w_shape = ctx.shape(w) if isinstance(w, fx.Node) else None
    if ctx.param_name(w) is not None and w_shape is not None and len(w_shape) == 2 and scalars_default and (
            b is None or ctx.param_name(b) is not None):
        return _dense(ctx, node, x, w, b, 1, 0)
    if b is None and all(ctx.param_name(t) is None for t in (x, w)):
        return _product(ctx, node, x, w)
    return _blocking("attention/matmul internals are not pruned")(ctx, node)


def _product(ctx: Ctx, node: fx.Node, a_node: Any, b_node: Any) -> Any:
    """``a @ b`` of two activations (hand-written attention: ``q @ kᵀ``, ``softmax(·) @ v``).

    out[..., i, j] = Σₖ a[..., i, k]·b[..., k, j]: batch dims (heads) of both operands are coupled and
    pass through, a's rows and b's columns become the output's, and the contracted dim couples a's
    columns with b's rows — an index k can go where a or b is zero there (the term vanishes). An
    operand dim strfx cannot follow blocks what it meets.
    """
    a, b = ctx.info(a_node), ctx.info(b_node)
    shape = ctx.shape(node)
    if a is None or b is None or shape is None or a.ndim < 2 or b.ndim < 2:
        return _unknown(ctx, node)
    R = len(shape)
    out = TInfo(shape)
    for d in range(R - 2):  # batch dims, aligned on the right
        parts = [(t, d - (R - t.ndim)) for t in (a, b) if d - (R - t.ndim) >= 0 and t.shape[d - (R - t.ndim)] == shape[d]]
        labelled = [(t, dd) for t, dd in parts if dd in t.labels]
        if not labelled:
            continue
        if len(labelled) < len(parts):
            for t, dd in labelled:
                ctx.block_ids(t.labels[dd], f"matmul with an operand strfx cannot follow ({node.name})")
            continue
        ids = labelled[0][0].labels[labelled[0][1]]
        for t, dd in labelled[1:]:
            ctx.uf.union_arrays(ids, t.labels[dd])
        out.set(d, ids, np.logical_or.reduce([t.zero[dd] for t, dd in labelled]))
    if a.ndim - 2 in a.labels:
        out.set(R - 2, a.labels[a.ndim - 2], a.zero[a.ndim - 2])
    if b.ndim - 1 in b.labels:
        out.set(R - 1, b.labels[b.ndim - 1], b.zero[b.ndim - 1])
    ka, kb = a.ndim - 1, b.ndim - 2
    if ka in a.labels and kb in b.labels:
        ctx.uf.union_arrays(a.labels[ka], b.labels[kb])
        ctx.live.append(a.labels[ka][~(a.zero[ka] | b.zero[kb])])
    else:
        for t, k in ((a, ka), (b, kb)):
            if k in t.labels:
                ctx.block_ids(t.labels[k], f"matmul contracting with an operand strfx cannot follow ({node.name})")
    return out


def _embedding(ctx: Ctx, node: fx.Node) -> Any:
    w_node = node.args[0]
    shape = ctx.shape(node)
    w = ctx.tensor(w_node)
    if shape is None or ctx.param_name(w_node) is None:
        return _unknown(ctx, node)
    for i in infos_of((node.args[1],), ctx):
        ctx.block(i, f"embedding indices ({node.name})")
    ids = ctx.out_ids(w_node, 1, shape[-1])
    ctx.tie(w_node, 1, ids)
    out = TInfo(shape)
    out.set(len(shape) - 1, ids, ~_nz_along(w, 1) if w is not None else None)
    ctx.writers.append(Writer(node, "embedding", ids, [(w_node.target, 1)]))
    return out


def _rnn(ctx: Ctx, node: fx.Node) -> Any:
    """``aten.lstm/gru/rnn_tanh/rnn_relu.input``: the input's features are read only by the columns of the
    first layer's ``weight_ih`` (one per direction), so a zero feature goes with those columns, as a linear
    layer's input does. The hidden units are not followed: the outputs are fresh values, and a labelled
    initial state is blocked. A constant feature stays (two directions would need one bias fold each).
    """
    x = ctx.info(node.args[0])
    hx, params = node.args[1], list(node.args[2])
    num_layers, bidirectional = int(node.args[4]), bool(node.args[7])
    for h in infos_of(hx, ctx):
        ctx.block(h, f"{op_name(node)} hidden units are not pruned ({node.name})")
    if x is None:
        return _unknown(ctx, node)
    fdim = x.ndim - 1
    for d in list(x.labels):
        if d != fdim:
            ctx.block_ids(x.labels[d], f"{op_name(node)} over a channel-labelled time/batch dim ({node.name})")
    xin = x.labels.get(fdim)
    if xin is None:
        return ctx.fresh_value(node)
    dirs = 2 if bidirectional else 1
    stride = len(params) // (num_layers * dirs)  # weight_ih, weight_hh[, bias_ih, bias_hh][, weight_hr]
    first = [params[k * stride] for k in range(dirs)]
    if not all(ctx.param_name(w) is not None for w in first):
        ctx.block_ids(xin, f"{op_name(node)} with a weight computed in the graph ({node.name})")
        return ctx.fresh_value(node)
    for w in first:
        ctx.tie(w, 1, xin)
    ctx.sink(x, fdim, None, f"{op_name(node)} {module_path(node) or node.name} has no single bias to absorb it")
    return ctx.fresh_value(node)
