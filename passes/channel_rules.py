"""The channel-rule registry, keyed by ATen operator: how channels map from an op's inputs to its outputs.

One table (:data:`RULES`, looked up by :func:`lookup` with an ``OpOverload``, then its overload
packet) says for every op strfx understands

* ``analyze(ctx, node)``: the output's channel ids and provably-zero slices, computed from the
  inputs' (:class:`~strfx.passes.channel_analysis.TInfo`), plus the couplings (``ctx.uf``), the
  parameters each channel lives in (``ctx.tie``), the positions that must be zero to be removed
  (``ctx.sink``) and the channels that can never be removed (``ctx.block``);
* ``shrink(s, node)``: how to rewrite the op's constant arguments (view sizes, conv groups, split
  sizes, ...) once the dead channels are known. Parameters need no rule: every parameter dim that
  carries channel ids is cut by :mod:`strfx.passes.shrink` itself.

Element-wise ops are recognised by ATen's own ``pointwise`` tag, and whether ``f(0) == 0`` is asked
of the op itself (it is run on zeros with the node's constant arguments), never assumed. An op that
is not in the table goes to :data:`unknown_rule`: every channel it touches is blocked and the
report names its overload. Nothing is guessed.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from strfx.passes.channel_analysis import Ctx, FoldSite, TInfo, Writer, infos_of, module_path

aten = torch.ops.aten


@dataclass(frozen=True)
class Rule:
    """How one op maps channels (``analyze``) and how its constant arguments are cut (``shrink``)."""

    name: str
    analyze: Callable[[Ctx, fx.Node], Any]
    shrink: Callable[[Any, fx.Node], None] | None = None


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def ndim_dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _copy(info: TInfo, shape: tuple[int, ...] | None = None, zero: bool = True, const: bool = False) -> TInfo:
    out = TInfo(shape if shape is not None else info.shape)
    for d, ids in info.labels.items():
        out.set(d, ids, info.zero[d].copy() if zero else None, info.const_of(d) if const and zero else None)
    return out


def _per_index(t: torch.Tensor | None, dim: int, n: int) -> np.ndarray:
    """Per index of ``dim`` (broadcast to ``n``): the one value ``t`` has there, NaN where it varies."""
    if t is None or not t.is_floating_point() and t.dtype not in (torch.bool, torch.int64, torch.int32):
        return np.full(n, np.nan)
    t = t.detach().to(torch.float64).cpu()
    if t.dim() == 0:
        return np.full(n, float(t))
    m = t.movedim(dim, 0).reshape(t.shape[dim], -1)
    same = (m == m[:, :1]).all(1).numpy()
    vals = np.where(same, m[:, 0].numpy(), np.nan)
    return np.broadcast_to(vals, (n,)).copy() if len(vals) in (1, n) else np.full(n, np.nan)


def _eval_const(node: fx.Node, values: dict[int, np.ndarray], n: int) -> np.ndarray:
    """The op evaluated on per-channel constants (``values``: operand index → per-channel value):
    the output's constant per channel, NaN where an operand is unknown or the result is not finite."""
    known = np.logical_and.reduce([np.isfinite(v) for v in values.values()]) if values else np.zeros(n, bool)
    out = np.full(n, np.nan)
    if not known.any():
        return out
    args = []
    for k, a in enumerate(node.args):
        if k in values:
            args.append(torch.as_tensor(values[k][known]).to(a.meta["val"].dtype))
        elif _is_tensor_node(a):
            return out
        else:
            args.append(a)
    if any(_is_tensor_node(a) for a in node.kwargs.values()):
        return out
    try:
        with torch.no_grad():
            res = node.target(*args, **node.kwargs)
    except Exception:  # noqa: BLE001 - not computable here: unknown
        return out
    if not isinstance(res, torch.Tensor) or res.shape != (int(known.sum()),):
        return out
    res = res.detach().to(torch.float64).cpu().numpy()
    out[known] = np.where(np.isfinite(res), res, np.nan)
    return out


def op_name(node: fx.Node) -> str:
    t = node.target
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def short_name(node: fx.Node) -> str:
    """``layer_norm`` for ``aten.layer_norm.default``: the op as a user would name it."""
    t = node.target
    return t.overloadpacket.__name__ if isinstance(t, torch._ops.OpOverload) else op_name(node)


def _nz(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else (t.detach() != 0).cpu().numpy()


def _nz_along(t: torch.Tensor, dim: int) -> np.ndarray:
    """Per index of ``dim``: whether any entry of ``t`` there is non-zero."""
    t = t.detach()
    if t.dim() == 0:
        return np.array([bool(t != 0)])
    return (t != 0).movedim(dim, 0).reshape(t.shape[dim], -1).any(1).cpu().numpy()


def _values(t: torch.Tensor | None, n: int) -> np.ndarray:
    """A 1-D parameter's values as float64 (zeros where there is none)."""
    return np.zeros(n) if t is None else t.detach().to(torch.float64).reshape(-1).cpu().numpy()


def _is_tensor_node(a: Any) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)


# ---------------------------------------------------------------------------------------------
# graph boundary and fallbacks
# ---------------------------------------------------------------------------------------------
def _unknown(ctx: Ctx, node: fx.Node) -> Any:
    touched = infos_of((node.args, node.kwargs), ctx)
    if any(i.labels for i in touched):
        name = op_name(node)
        ctx.unknown_ops.setdefault(name, node.name)
        for i in touched:
            ctx.block(i, f"unsupported op {name} ({node.name})")
    return ctx.fresh_value(node)


unknown_rule = Rule("unknown", _unknown)


def _fresh(ctx: Ctx, node: fx.Node) -> Any:
    return ctx.fresh_value(node)


def _output(ctx: Ctx, node: fx.Node) -> Any:
    for i in infos_of(node.args, ctx):
        ctx.block(i, "model output")
    return None


def _no_value(ctx: Ctx, node: fx.Node) -> Any:
    """Size queries and asserts: read no channel values (a size follows the cut tensor)."""
    return None


def _blocking(reason: str) -> Callable[[Ctx, fx.Node], Any]:
    def analyze(ctx: Ctx, node: fx.Node) -> Any:
        for i in infos_of((node.args, node.kwargs), ctx):
            ctx.block(i, f"{reason} ({node.name})")
        return ctx.fresh_value(node)

    return analyze


# ---------------------------------------------------------------------------------------------
# element-wise (ATen's pointwise tag), broadcasting
# ---------------------------------------------------------------------------------------------
_SAMPLES = {torch.bool: (True, False, True, False), "int": (1, -3, 7, 2), "float": (-2.5, 0.7, 3.0, 1e4)}


def _sample(val: torch.Tensor, trial: int) -> torch.Tensor:
    kind = torch.bool if val.dtype == torch.bool else ("float" if val.is_floating_point() else "int")
    return torch.tensor(_SAMPLES[kind][trial], dtype=val.dtype)


def _zero_image(ctx: Ctx, node: fx.Node, zero_operands: set[int]) -> bool:
    """Whether the op gives exactly 0 whenever the operands in ``zero_operands`` are 0.

    Asked of the op itself, never assumed: it runs on one-element tensors, zeros at those operands
    and several non-zero values at the other tensor operands, with the node's constant arguments
    (``hardtanh(x, 0.5, 2.0)`` maps 0 to 0.5, so it is not zero-preserving; ``mul`` is whatever the
    other factor is).
    """
    for trial in range(4):
        args = [(torch.zeros((), dtype=a.meta["val"].dtype) if k in zero_operands else _sample(a.meta["val"], trial))
                if _is_tensor_node(a) else a for k, a in enumerate(node.args)]
        kwargs = {key: _sample(a.meta["val"], trial) if _is_tensor_node(a) else a for key, a in node.kwargs.items()}
        try:
            with torch.no_grad():
                out = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - cannot tell: not zero-preserving
            return False
        if not (isinstance(out, torch.Tensor) and out.numel() == 1 and bool((out == 0).all())):
            return False
    return True


def _pointwise(ctx: Ctx, node: fx.Node) -> Any:
    """out[..., c, ...] reads operand[..., c, ...] only (with broadcasting).

    Channel dims of all full-size operands are coupled (a residual add). A parameter or constant
    operand spanning a channel dim (layer scale ``γ·x``, a per-channel bias) is labelled with the
    channel and cut with it; any other full-size operand strfx cannot label blocks the dim. A
    channel is zero where the op maps the zero operands to zero: for ``mul`` one zero operand
    suffices, for ``add`` every operand must be zero; both are decided by running the op on zeros.
    """
    shape = ctx.shape(node)
    operands = [(k, a) for k, a in enumerate(node.args) if _is_tensor_node(a)]
    if shape is None:
        return _unknown(ctx, node)
    R = len(shape)
    out = TInfo(shape)
    if not any(ctx.info(a) is not None and ctx.info(a).labels for _, a in operands):
        # constants combined with constants/inputs: nothing to follow (still unlabelled); a parameter
        # used here must keep every index, whatever another use of it ties (a shared layer scale)
        for k, a in operands:
            if ctx.param_name(a) is not None:
                for dd in range(ctx.info(a).ndim if ctx.info(a) is not None else 0):
                    if ctx.info(a).shape[dd] > 1:
                        ctx.pin(a, dd, f"{short_name(node)} on values strfx does not follow ({node.name})")
        return out
    single_zero = {k: _zero_image(ctx, node, {k}) for k, _ in operands}
    all_zero = _zero_image(ctx, node, {k for k, _ in operands})
    for d in range(R):
        labelled: list[tuple[int, TInfo, int]] = []  # operand index, info, dim
        params: list[tuple[int, Any, int]] = []  # unlabelled parameter operands spanning d
        blocked_by = None
        for k, a in operands:
            t = ctx.info(a)
            if t is None:
                blocked_by = "an operand strfx cannot follow"
                continue
            dd = d - (R - t.ndim)
            if dd < 0 or t.shape[dd] == 1 and shape[d] != 1:
                continue  # broadcast along d: the same value lands in every channel
            if dd in t.labels:
                labelled.append((k, t, dd))
            elif ctx.const(a) is not None:
                params.append((k, a, dd))
            elif shape[d] != 1:
                blocked_by = "an operand strfx cannot cut"
        if not labelled:
            for _, a, dd in params:
                if ctx.param_name(a) is not None and ctx.info(a).shape[dd] > 1:
                    ctx.pin(a, dd, f"{short_name(node)} on values strfx does not follow ({node.name})")
            continue
        ids = labelled[0][1].labels[labelled[0][2]]
        if blocked_by is not None:
            for _, t, dd in labelled:
                ctx.block_ids(t.labels[dd], f"{op_name(node)} with {blocked_by} ({node.name})")
            continue
        for _, t, dd in labelled[1:]:
            ctx.uf.union_arrays(ids, t.labels[dd])
        tied = [_tie_const(ctx, a, dd, ids) for _, a, dd in params]
        if not all(tied):
            ctx.block_ids(ids, f"{op_name(node)} with a parameter computed in forward that strfx cannot cut ({node.name})")
            continue
        if tied and not all(single_zero[k] for k, _, _ in labelled):  # x + bias: the parameter writes the channel
            ctx.writers.append(Writer(node, "param", ids, [t for t in tied if t is not None]))
        zeros = {k: t.zero[dd] for k, t, dd in labelled}
        for k, a, dd in params:
            zeros[k] = ~_nz_along(ctx.tensor(a), dd) if ctx.tensor(a) is not None else np.zeros(len(ids), bool)
        n = len(ids)
        zero = np.zeros(n, bool)
        for k, z in zeros.items():
            if single_zero[k]:
                zero |= z
        if all_zero and len(zeros) == len(operands):
            zero |= np.logical_and.reduce(list(zeros.values()))
        values = {k: t.const_of(dd) for k, t, dd in labelled}
        for k, a, dd in params:
            values[k] = _per_index(ctx.tensor(a), dd, n)
        for k, a in operands:  # operands broadcast along d: constant only if one value everywhere
            if k not in values:
                t = ctx.tensor(a)
                one = t is not None and t.numel() > 0 and bool((t.reshape(-1) == t.reshape(-1)[0]).all())
                values[k] = np.full(n, float(t.reshape(-1)[0]) if one else np.nan)
        out.set(d, ids, zero, _eval_const(node, values, n))
    return out


_SHAPE_ONLY = {aten.view, aten._unsafe_view, aten.reshape, aten.unsqueeze, aten.squeeze, aten.flatten, aten.clone,
               aten._to_copy, aten.alias, aten.detach, aten.contiguous}


def _tie_const(ctx: Ctx, a: fx.Node, dim: int, ids: np.ndarray) -> tuple[str, int] | None:
    """Label ``dim`` of the constant operand ``a`` with ``ids``, and the parameter it comes from.

    Only the parameter itself is cut, so a constant computed in ``forward`` can follow a cut only
    when it is that parameter reshaped or broadcast (``gamma.view(1, -1, 1, 1)``, ``gamma[:, None,
    None]``, ``cls_token.expand(B, -1, -1)``): then every node of the chain is labelled too (their
    size arguments are rewritten). Returns (parameter name, its dim), or None when it cannot.
    """
    chain: list[tuple[fx.Node, int]] = []
    node = a
    while isinstance(node, fx.Node) and node.op == "call_function":
        packet = getattr(node.target, "overloadpacket", None)
        src = node.args[0] if node.args else None
        if packet not in _SHAPE_ONLY and packet is not aten.expand or not isinstance(src, fx.Node) \
                or node.all_input_nodes != [src]:
            return None
        out_shape, in_shape = ctx.shape(node), ctx.shape(src)
        if out_shape is None or in_shape is None:
            return None
        chain.append((node, dim))
        if packet is aten.expand:  # dims align on the right; a broadcast dim is not a channel dim
            d_in = dim - (len(out_shape) - len(in_shape))
            if d_in < 0 or in_shape[d_in] != out_shape[dim]:
                return None
            dim = d_in
        elif in_shape != out_shape:
            big_out = [i for i, n in enumerate(out_shape) if n != 1]
            big_in = [i for i, n in enumerate(in_shape) if n != 1]
            if big_out != [dim] or len(big_in) != 1 or in_shape[big_in[0]] != out_shape[dim]:
                return None
            dim = big_in[0]
        node = src
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    ctx.tie(node, dim, ids)
    for n, d in chain:
        ctx.tie(n, d, ids)
    return node.target, dim


def _new_tensor(ctx: Ctx, node: fx.Node) -> Any:
    """``x.new_zeros(size)`` and friends: a fresh tensor; ``x`` lends only its dtype and device."""
    return _fresh(ctx, node)


def _like(fill: float | None) -> Callable[[Ctx, fx.Node], Any]:
    """``zeros_like(x)``/``ones_like``/``full_like``/``empty_like``: shaped like ``x`` (so cut with it),
    every entry the fill value (unknown for ``empty_like``)."""

    def analyze(ctx: Ctx, node: fx.Node) -> Any:
        x = ctx.info(node.args[0])
        if x is None or ctx.shape(node) != x.shape:
            return _unknown(ctx, node)
        value = arg(node, 1, "fill_value") if fill is None and node.target.overloadpacket is aten.full_like else fill
        out = TInfo(x.shape)
        for d, ids in x.labels.items():
            n = len(ids)
            known = isinstance(value, (int, float)) and not isinstance(value, bool)
            out.set(d, ids, np.full(n, known and value == 0), np.full(n, float(value)) if known else None)
        return out

    return analyze


def _identity(ctx: Ctx, node: fx.Node) -> Any:
    """clone, alias, dtype casts, dropout in eval: the value passes through."""
    x = ctx.info(node.args[0]) if node.args else None
    if x is None:
        return _unknown(ctx, node)
    shape = ctx.shape(node)
    same_dtype = getattr(node.meta.get("val"), "dtype", None) == getattr(node.args[0].meta.get("val"), "dtype", 0)
    return _copy(x, shape, const=same_dtype) if shape == x.shape else _unknown(ctx, node)


def _where(ctx: Ctx, node: fx.Node) -> Any:
    """``where(cond, a, b)``: a pointwise select; the condition's channels are coupled too."""
    return _pointwise(ctx, node)


# ---------------------------------------------------------------------------------------------
# cat / stack / split / getitem / slice / select
# ---------------------------------------------------------------------------------------------
def _cat(stack: bool) -> Callable[[Ctx, fx.Node], Any]:
    def analyze(ctx: Ctx, node: fx.Node) -> Any:
        seq = arg(node, 0, "tensors")
        shape = ctx.shape(node)
        if not isinstance(seq, (list, tuple)) or shape is None:
            return _unknown(ctx, node)
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
                tied = [_tie_const(ctx, a, src, ids) for a in parts]
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
        o = TInfo(tuple(int(s) for s in v.shape))
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
        o = TInfo(tuple(int(s) for s in v.shape))
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


# ---------------------------------------------------------------------------------------------
# reshapes and permutations
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# reductions, spatial ops, softmax
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def _sdpa(ctx: Ctx, node: fx.Node) -> Any:
    """``softmax(q kᵀ) v`` per head, q/k/v shaped (..., heads, seq, dim).

    Head h of the output reads head h of q, k and v only, so the head dims of q, k and v are coupled
    (with grouped-query attention, repeat_kv has already made each key/value head's id the id of the
    query heads sharing it: a kv head goes only with all of them) and a head is zero where v's is.
    The per-head dims of q and k are contracted together (both must be zero to go); v's pass to the
    output. A mask or sequence dim carrying channels blocks them.
    """
    q, k, v = (ctx.info(a) for a in node.args[:3])
    shape = ctx.shape(node)
    if q is None or k is None or v is None or shape is None or q.ndim < 3 or arg(node, 7, "enable_gqa", False):
        return _unknown(ctx, node)
    R = q.ndim
    for extra in infos_of((node.args[3:], node.kwargs), ctx):
        ctx.block(extra, f"attention mask or argument carrying channels ({node.name})")
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


# ---------------------------------------------------------------------------------------------
# weight layers: conv, linear, embedding
# ---------------------------------------------------------------------------------------------
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
    for d in list(x.labels):
        if d != cdim:
            ctx.block_ids(x.labels[d], f"convolution over a channel-labelled spatial dim ({node.name})")
    cin = x.shape[cdim]
    cout = shape[len(shape) - n_sp - 1]
    ig, og = cin // g, cout // g
    out_dim_w = 1 if transposed else 0
    out_ids = ctx.out_ids(w_node, 0, cout) if not transposed else ctx.new(cout)
    xin = x.labels.get(cdim)
    in_zero = x.zero[cdim] if xin is not None else np.zeros(cin, dtype=bool)
    if not _needs_param(ctx, node, w_node, [out_ids] + ([xin] if xin is not None else [])):
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
    return out


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


# ---------------------------------------------------------------------------------------------
# per-channel ops: norms, PReLU
# ---------------------------------------------------------------------------------------------
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
    shape = tuple(int(s) for s in (val[0] if multi else val).shape) if val is not None else None
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


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------
R_POINTWISE = Rule("pointwise", _pointwise)
R_ID = Rule("identity", _identity)
R_CAT = Rule("cat", _cat(False))
R_STACK = Rule("stack", _cat(True))
R_SPLIT = Rule("split", _split, _split_shrink)
R_VIEW = Rule("view", _reshape, _sizes_shrink(1, "size"))
R_RESHAPE = Rule("reshape", _reshape, _sizes_shrink(1, "shape"))
R_RESHAPE_NOARGS = Rule("reshape", _reshape)
R_SUM, R_AMAX = Rule("sum", _reduce("sum")), Rule("amax", _reduce("max"))
R_MEAN = Rule("mean", _reduce("mean"), _mean_shrink)
R_ATTENTION = Rule("attention", _blocking("attention/matmul internals are not pruned"))
R_CONV = Rule("conv", _conv, _conv_shrink)
R_NORM = Rule("norm", _norm)
R_GROUP_NORM = Rule("group_norm", _norm, _group_norm_shrink)
R_SOFTMAX = Rule("softmax", _softmax)
R_NONE = Rule("size/assert", _no_value)


def _pool(k: int | None) -> Rule:
    return Rule("pool", _spatial(_fixed(k) if k is not None else _all_but_two))


RULES: dict[Any, Rule] = {
    "placeholder": Rule("input", _fresh),
    "get_attr": Rule("parameter", _fresh),
    "output": Rule("output", _output),
    operator.getitem: Rule("getitem", _getitem),
    aten.linear: Rule("linear", _linear),
    aten.embedding: Rule("embedding", _embedding),
    aten.prelu: Rule("prelu", _prelu), aten._prelu_kernel: Rule("prelu", _prelu),
    aten.layer_norm: Rule("layer_norm", _last_dims_norm, _last_dims_norm_shrink),
    aten.native_layer_norm: Rule("layer_norm", _last_dims_norm, _last_dims_norm_shrink),
    aten.rms_norm: Rule("rms_norm", _last_dims_norm, _last_dims_norm_shrink),
    aten.cat: R_CAT, aten.concat: R_CAT, aten.stack: R_STACK,
    aten.split: R_SPLIT, aten.split_with_sizes: R_SPLIT, aten.chunk: R_SPLIT, aten.unsafe_split: R_SPLIT,
    aten.unbind: Rule("unbind", _unbind),
    aten.slice: Rule("slice", _slice), aten.select: Rule("select", _select),
    aten.view: R_VIEW, aten._unsafe_view: R_VIEW, aten.reshape: R_RESHAPE,
    aten.expand: Rule("expand", _expand, _sizes_shrink(1, "size")),
    aten.flatten: R_RESHAPE_NOARGS, aten.squeeze: R_RESHAPE_NOARGS, aten.unsqueeze: R_RESHAPE_NOARGS,
    aten.unflatten: Rule("unflatten", _reshape, _unflatten_shrink),
    aten.permute: Rule("permute", _permute), aten.transpose: Rule("transpose", _transpose),
    aten.t: Rule("transpose", _transpose), aten.swapaxes: Rule("transpose", _transpose),
    aten.sum: R_SUM, aten.mean: R_MEAN, aten.amax: R_AMAX,
    aten.softmax: R_SOFTMAX, aten._softmax: R_SOFTMAX, aten.log_softmax: R_SOFTMAX, aten._log_softmax: R_SOFTMAX,
    aten.clone: R_ID, aten.alias: R_ID, aten._to_copy: R_ID, aten.contiguous: R_ID, aten.detach: R_ID,
    aten.lift_fresh_copy: R_ID, aten.dropout: R_ID, aten.feature_dropout: R_ID, aten.alpha_dropout: R_ID,
    aten.to: R_ID, aten.type_as: R_ID,
    aten.matmul: Rule("matmul", _matmul), aten.mm: Rule("matmul", _matmul), aten.addmm: Rule("addmm", _matmul),
    aten.bmm: Rule("matmul", _matmul), aten.baddbmm: R_ATTENTION, aten.einsum: R_ATTENTION,
    aten.scaled_dot_product_attention: Rule("attention", _sdpa, _sdpa_shrink),
    aten.sym_size: R_NONE, aten.sym_numel: R_NONE, aten.sym_stride: R_NONE,
    aten._assert_tensor_metadata: R_NONE, aten._assert_scalar: R_NONE, aten.sym_constrain_range_for_size: R_NONE,
    aten.upsample_nearest1d: _pool(1), aten.upsample_nearest2d: _pool(2), aten.upsample_nearest3d: _pool(3),
    aten.upsample_bilinear2d: _pool(2), aten.upsample_bicubic2d: _pool(2), aten.upsample_linear1d: _pool(1),
    aten.upsample_trilinear3d: _pool(3), aten._upsample_nearest_exact2d: _pool(2),
    aten._upsample_bilinear2d_aa: _pool(2),
    aten.roll: Rule("roll", _spatial(_roll_dims)),
    aten.new_zeros: Rule("new tensor", _new_tensor), aten.new_ones: Rule("new tensor", _new_tensor),
    aten.new_full: Rule("new tensor", _new_tensor), aten.new_empty: Rule("new tensor", _new_tensor),
    aten.zeros_like: Rule("like", _like(0.0)), aten.ones_like: Rule("like", _like(1.0)),
    aten.full_like: Rule("like", _like(None)), aten.empty_like: Rule("like", _like(None)),
    aten.pad: Rule("pad", _spatial(_pad_dims, _pad_zp)), aten.constant_pad_nd: Rule("pad", _spatial(_pad_dims, _pad_zp)),
    aten.reflection_pad1d: _pool(1), aten.reflection_pad2d: _pool(2), aten.reflection_pad3d: _pool(3),
    aten.replication_pad1d: _pool(1), aten.replication_pad2d: _pool(2), aten.replication_pad3d: _pool(3),
    aten.where: R_POINTWISE,
}
for _name in ("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
    RULES[getattr(aten, _name)] = R_CONV
for _op, _spec in NORMS.items():
    RULES[_op] = R_GROUP_NORM if _spec.groups is not None else R_NORM
for _k, _names in ((1, ("max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d",
                        "max_pool1d_with_indices")),
                   (2, ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
                        "max_pool2d_with_indices", "_adaptive_avg_pool2d")),
                   (3, ("max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "adaptive_max_pool3d",
                        "max_pool3d_with_indices", "_adaptive_avg_pool3d"))):
    for _name in _names:
        if hasattr(aten, _name):
            RULES[getattr(aten, _name)] = _pool(_k)

# Elementwise ops ATen does not tag ``torch.Tag.pointwise`` (so the tag lookup misses them); the pointwise
# rule still asks the op itself whether it maps zeros to zeros.
for _op in (aten.hardswish,):
    RULES[_op] = R_POINTWISE
RULES[aten.linalg_vector_norm] = Rule("vector_norm", _vector_norm)
RULES[aten.var] = Rule("var", _reduce("var"))
RULES[aten.std] = Rule("std", _reduce("std"))


def lookup(node: fx.Node) -> Rule | None:
    """The rule for ``node`` or None (then :data:`unknown_rule` applies)."""
    if node.op in ("placeholder", "get_attr", "output"):
        return RULES[node.op]
    if node.op != "call_function":
        return None
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        rule = RULES.get(t) or RULES.get(t.overloadpacket)
        if rule is not None:
            return rule
        if torch.Tag.pointwise in t.tags:
            return R_POINTWISE
        return None
    try:
        return RULES.get(t)
    except TypeError:  # unhashable target
        return None
