"""The channel-rule registry: for each op kind, how channels map from its inputs to its outputs.

One table (``MODULE_RULES``, ``FUNCTION_RULES``, ``METHOD_RULES``, looked up by :func:`lookup`) says
for every op strfx understands

* ``analyze(ctx, node)``: the output's channel ids and provably-zero slices, computed from the
  inputs' (:class:`~strfx.passes.channel_analysis.TInfo`), plus the couplings (``ctx.uf``), the
  positions that must be zero to be removed (``ctx.sink``) and the channels that can never be
  removed (``ctx.block``);
* ``shrink(s, node)``: how to cut the op's parameters, attributes and constant arguments once the
  dead channels are known (None: nothing to cut).

An op that is not in the table goes to :data:`unknown_rule`: every channel it touches is blocked
and the report names the op. Nothing is guessed.
"""

from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from strfx.modules import STRBatchNorm, STRGate
from strfx.passes.channel_analysis import Ctx, TInfo, infos_of


@dataclass(frozen=True)
class Rule:
    """How one op kind maps channels (``analyze``) and how it is cut (``shrink``)."""

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


def _copy(info: TInfo, shape: tuple[int, ...] | None = None, zero: bool = True) -> TInfo:
    out = TInfo(shape if shape is not None else info.shape)
    for d, ids in info.labels.items():
        out.set(d, ids, info.zero[d].copy() if zero else None)
    return out


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_module":
        return str(t)
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _is_zero_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, bool)) and v == 0


def _nz(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else (t.detach() != 0).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# graph boundary and fallbacks
# ---------------------------------------------------------------------------------------------
def _unknown(ctx: Ctx, node: fx.Node) -> Any:
    touched = infos_of((node.args, node.kwargs), ctx)
    if any(i.labels for i in touched):
        name = _op_name(node)
        kind = type(ctx.module(node)).__name__ if node.op == "call_module" else name
        ctx.unknown_ops.setdefault(kind, node.name)
        for i in touched:
            ctx.block(i, f"unsupported op {kind} ({node.name})")
    return ctx.fresh_value(node)


unknown_rule = Rule("unknown", _unknown)


def _placeholder(ctx: Ctx, node: fx.Node) -> Any:
    return ctx.fresh_value(node)


def _output(ctx: Ctx, node: fx.Node) -> Any:
    for i in infos_of(node.args, ctx):
        ctx.block(i, "model output")
    return None


def _meta_only(ctx: Ctx, node: fx.Node) -> Any:
    """size(), shape, dim(): reads no channel values (a dynamic size follows the cut tensor)."""
    return None


def _blocking(reason: str) -> Callable[[Ctx, fx.Node], Any]:
    def analyze(ctx: Ctx, node: fx.Node) -> Any:
        for i in infos_of((node.args, node.kwargs), ctx):
            ctx.block(i, f"{reason} ({node.name})")
        return ctx.fresh_value(node)

    return analyze


# ---------------------------------------------------------------------------------------------
# element-wise
# ---------------------------------------------------------------------------------------------
def _elementwise(zero_preserving: bool | Callable[[fx.Node], bool]) -> Callable[[Ctx, fx.Node], Any]:
    """out[i] depends on in[i] only: channels pass through; ``f(0) == 0`` keeps zero slices zero."""

    def analyze(ctx: Ctx, node: fx.Node) -> Any:
        x = ctx.info(node.args[0]) if node.args else None
        if x is None:
            return _unknown(ctx, node)
        for other in infos_of((node.args[1:], node.kwargs), ctx):
            ctx.block(other, f"tensor argument of {_op_name(node)} ({node.name})")
        zp = zero_preserving(node) if callable(zero_preserving) else zero_preserving
        shape = ctx.shape(node)
        if shape is not None and tuple(shape) != x.shape:
            return _unknown(ctx, node)
        return _copy(x, zero=zp)

    return analyze


def _clamp_zp(node: fx.Node) -> bool:
    lo = arg(node, 1, "min")
    hi = arg(node, 2, "max")
    ok_lo = lo is None or (isinstance(lo, (int, float)) and lo <= 0)
    ok_hi = hi is None or (isinstance(hi, (int, float)) and hi >= 0)
    return ok_lo and ok_hi


def _pow_zp(node: fx.Node) -> bool:
    e = arg(node, 1, "exponent")
    return isinstance(e, (int, float)) and e > 0


# ---------------------------------------------------------------------------------------------
# broadcasting binary ops
# ---------------------------------------------------------------------------------------------
def _binary(kind: str) -> Callable[[Ctx, fx.Node], Any]:
    """add/sub couple channels and are zero where all operands are; mul is zero where any is."""

    def analyze(ctx: Ctx, node: fx.Node) -> Any:
        shape = ctx.shape(node)
        operands = [arg(node, 0, "input"), arg(node, 1, "other")]
        tensors = [(ctx.info(a), a) for a in operands if ctx.info(a) is not None]
        if shape is None:
            for t, _ in tensors:
                ctx.block(t, f"{_op_name(node)} without a recorded shape ({node.name})")
            return ctx.fresh_value(node)
        out = TInfo(shape)
        R = len(shape)
        scalars_zero = all(_is_zero_scalar(a) for a in operands if ctx.info(a) is None)
        for d in range(R):
            labelled: list[tuple[TInfo, int, int]] = []  # info, its dim, operand index
            full_unlabelled = False
            narrow = 0
            for k, a in enumerate(operands):
                t = ctx.info(a)
                if t is None:
                    if isinstance(a, fx.Node) and a in ctx.values and ctx.values[a] is not None:
                        full_unlabelled = True  # a non-tensor value: be safe
                    continue
                dd = d - (R - t.ndim)
                if dd < 0:
                    narrow += 1  # broadcast along d: the same (unknown) value lands in every channel
                    continue
                if dd in t.labels:
                    if t.shape[dd] == shape[d]:
                        labelled.append((t, dd, k))
                    else:
                        ctx.block_ids(t.labels[dd], f"{_op_name(node)} broadcasts a channel dim ({node.name})")
                elif t.shape[dd] == shape[d] and shape[d] != 1:
                    full_unlabelled = True
                else:
                    narrow += 1
            if not labelled:
                continue
            if full_unlabelled:
                for t, dd, _ in labelled:
                    ctx.block_ids(t.labels[dd], f"{_op_name(node)} with an operand strfx cannot cut ({node.name})")
                continue
            ids = labelled[0][0].labels[labelled[0][1]]
            for t, dd, _ in labelled[1:]:
                ctx.uf.union_arrays(ids, t.labels[dd])
            zs = [t.zero[dd] for t, dd, _ in labelled]
            if kind == "add":
                zero = np.logical_and.reduce(zs) if (narrow == 0 and scalars_zero) else np.zeros(len(ids), bool)
            elif kind == "mul":
                zero = np.logical_or.reduce(zs)
            else:  # div: only a zero numerator
                num = [t.zero[dd] for t, dd, k in labelled if k == 0]
                zero = num[0].copy() if num else np.zeros(len(ids), bool)
            out.set(d, ids, zero)
        return out

    return analyze


# ---------------------------------------------------------------------------------------------
# cat / stack / split / chunk / getitem
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
                    ids, zeros = [], []
                    for i in infos:
                        if src in i.labels:
                            ids.append(i.labels[src])
                            zeros.append(i.zero[src])
                        else:
                            new = ctx.new(i.shape[src])
                            ctx.block_ids(new, f"cat with a part strfx cannot cut ({node.name})")
                            ids.append(new)
                            zeros.append(np.zeros(i.shape[src], bool))
                    out.set(d, np.concatenate(ids), np.concatenate(zeros))
                continue
            labelled = [i for i in infos if src in i.labels]
            if not labelled:
                continue
            if len(labelled) < len(infos):
                for i in labelled:
                    ctx.block_ids(i.labels[src], f"cat/stack with a part strfx cannot cut ({node.name})")
                continue
            ids = labelled[0].labels[src]
            for i in labelled[1:]:
                ctx.uf.union_arrays(ids, i.labels[src])
            out.set(d, ids, np.logical_and.reduce([i.zero[src] for i in labelled]))
        return out

    return analyze


def _split(ctx: Ctx, node: fx.Node) -> Any:
    x = ctx.info(node.args[0])
    tms = node.meta.get("tensor_meta")
    if x is None or not isinstance(tms, (tuple, list)):
        return _unknown(ctx, node)
    dim = ndim_dim(arg(node, 2, "dim", 0), x.ndim)
    sizes = [int(t.shape[dim]) for t in tms]
    outs = []
    start = 0
    for t, n in zip(tms, sizes):
        o = TInfo(tuple(int(s) for s in t.shape))
        for d, ids in x.labels.items():
            if d == dim:
                o.set(d, ids[start:start + n], x.zero[d][start:start + n])
            else:
                o.set(d, ids, x.zero[d])
        outs.append(o)
        start += n
    return tuple(outs)


def _split_shrink(s: Any, node: fx.Node) -> None:
    """Pieces lose different numbers of channels: rewrite as ``torch.split`` with explicit sizes."""
    x = s.info(node.args[0])
    if x is None:
        return
    dim = ndim_dim(arg(node, 2, "dim", 0), x.ndim)
    keep = s.keep_of(x, dim)
    if keep is None:
        return
    outs = s.out_value(node)
    sizes = [int(s.keep_count(o, dim)) for o in outs]
    node.op = "call_function"
    node.target = torch.split
    node.args = (node.args[0], sizes, dim)
    node.kwargs = {}


def _getitem(ctx: Ctx, node: fx.Node) -> Any:
    base, idx = node.args[0], node.args[1]
    v = ctx.value(base)
    if isinstance(v, (tuple, list)):
        return v[idx] if isinstance(idx, int) and -len(v) <= idx < len(v) else _unknown(ctx, node)
    if isinstance(v, dict):
        return v.get(idx)
    if not isinstance(v, TInfo):
        return ctx.fresh_value(node) if not any(i.labels for i in infos_of(node.args, ctx)) else _unknown(ctx, node)
    shape = ctx.shape(node)
    if shape is None:
        return _unknown(ctx, node)
    items = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, fx.Node) and isinstance(ctx.value(i), TInfo) for i in items) or any(
        isinstance(i, (list, torch.Tensor)) for i in items
    ):
        return _unknown(ctx, node)  # advanced indexing
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    out = TInfo(shape)
    src, dst = 0, 0
    for it in items:
        if it is Ellipsis:
            skip = v.ndim - n_real
            for _ in range(skip):
                if src in v.labels:
                    out.set(dst, v.labels[src], v.zero[src])
                src += 1
                dst += 1
        elif it is None:
            dst += 1
        elif isinstance(it, slice):
            if src in v.labels:
                full = it == slice(None, None, None)
                if full:
                    out.set(dst, v.labels[src], v.zero[src])
                else:
                    ctx.block_ids(v.labels[src], f"slicing a channel dim ({node.name})")
                    rng = range(v.shape[src])[it] if all(
                        not isinstance(p, fx.Node) for p in (it.start, it.stop, it.step)) else None
                    if rng is not None and len(rng) == shape[dst]:
                        sel = np.asarray(list(rng), dtype=np.int64)
                        out.set(dst, v.labels[src][sel], v.zero[src][sel])
            src += 1
            dst += 1
        else:  # an integer (or an int-valued node): the dim disappears
            if src in v.labels:
                ctx.block_ids(v.labels[src], f"indexing a channel dim ({node.name})")
            src += 1
    while src < v.ndim:
        if src in v.labels:
            out.set(dst, v.labels[src], v.zero[src])
        src += 1
        dst += 1
    for d in list(out.labels):
        if d >= len(shape) or shape[d] != len(out.labels[d]):
            ctx.block_ids(out.labels.pop(d), f"indexing strfx could not follow ({node.name})")
            out.zero.pop(d)
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
        blocks.append((ii, jj))
    return blocks


MAX_RESHAPE_POSITIONS = 20_000_000


def _reshape(ctx: Ctx, node: fx.Node) -> Any:
    """Follow channel ids through a reshape; a split channel dim is cut along one piece only.

    Channel shuffle (``view(B, g, C/g, H, W)``) splits C into (g, C/g): the ids of the ``g`` copies
    at the same inner index are coupled, so the cut stays rectangular and the reshape stays valid.
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
    found = _shape_args(node)
    dynamic = {k for k, v in enumerate(found[1]) if isinstance(v, fx.Node)} if found and len(found[1]) == len(shape) else set()
    for ii, jj in blocks:
        labelled = [d for d in ii if d in x.labels]
        if not labelled:
            continue
        if len(labelled) > 1:
            ctx.block(x, f"reshape merging two channel dims ({node.name})", dims=labelled)
            continue
        d = labelled[0]
        if len(ii) == 1 and len(jj) == 1:
            out.set(jj[0], x.labels[d], x.zero[d])
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
        varying = [a for a in range(T.ndim) if T.shape[a] > 1 and np.any(np.diff(T, axis=a) != 0)]
        if not varying:
            ctx.block_ids(x.labels[d], f"reshape folding a channel dim away ({node.name})")
            continue
        dyn_varying = [k for k in varying if jj[k] in dynamic]
        a = max(dyn_varying or varying, key=lambda k: (T.shape[k], k))
        Tm = np.moveaxis(T, a, 0).reshape(T.shape[a], -1)
        Zm = np.moveaxis(Z, a, 0).reshape(T.shape[a], -1)
        if len(varying) > 1:
            for row in Tm:
                ctx.uf.union_all(row)
        out.set(jj[a], Tm[:, 0].copy(), Zm.all(axis=1))
    # A size computed at run time (``c // g`` from ``x.size()``) follows the cut only where the cut is.
    for k in sorted(dynamic):
        dep = _depends_on_channels(ctx, found[1][k])
        if dep and k not in out.labels:
            ctx.block(x, f"reshape with a size computed from channels ({node.name})")
            ctx.block(out, f"reshape with a size computed from channels ({node.name})")
            return TInfo(shape)
        if not dep and k in out.labels:
            ctx.block_ids(out.labels.pop(k), f"reshape with a fixed computed size ({node.name})")
            out.zero.pop(k)
    return out


def _depends_on_channels(ctx: Ctx, n: Any, depth: int = 0) -> bool:
    """Whether a run-time int is computed from the size of a channel dim (unknown: assume yes)."""
    if not isinstance(n, fx.Node):
        return False
    if depth > 12:
        return True
    v = ctx.values.get(n)
    if isinstance(v, TInfo):
        return bool(v.labels)
    if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int):
        src = n.args[0]
        if isinstance(src, fx.Node) and _is_size_of(src):
            t = ctx.info(src.args[0])
            return t is not None and ndim_dim(n.args[1], t.ndim) in t.labels
    if n.op == "call_method" and n.target == "size" and isinstance(arg(n, 1, "dim"), int):
        t = ctx.info(n.args[0])
        return t is not None and ndim_dim(arg(n, 1, "dim"), t.ndim) in t.labels
    if _is_size_of(n):
        t = ctx.info(n.args[0])
        return t is None or bool(t.labels)
    if n.op == "placeholder":
        return False
    return any(_depends_on_channels(ctx, a, depth + 1) for a in n.all_input_nodes)


def _is_size_of(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target == "size" and len(n.args) == 1 and not n.kwargs) or (
        n.op == "call_function" and n.target is builtins.getattr and n.args[1:] == ("shape",))


def _shape_args(node: fx.Node) -> tuple[int, list[Any]] | None:
    """Index in node.args where the target shape starts, and the shape as a list."""
    name = _op_name(node)
    if node.op == "call_method" and name in ("view", "reshape"):
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            return 1, list(rest[0])
        return -1, rest
    if node.op == "call_function" and name == "reshape":
        shp = arg(node, 1, "shape")
        return (1, list(shp)) if isinstance(shp, (list, tuple)) else None
    return None


def _reshape_shrink(s: Any, node: fx.Node) -> None:
    """Constant sizes of cut dims in view/reshape/unflatten become the new channel counts."""
    out = s.out_value(node)
    if not isinstance(out, TInfo):
        return
    changes = {d: s.keep_count(out, d) for d in out.labels if s.keep_count(out, d) != out.shape[d]}
    if not changes:
        return
    name = _op_name(node)
    if name == "unflatten":
        dim = ndim_dim(arg(node, 1, "dim"), len(out.shape) - len(arg(node, 2, "sizes")) + 1)
        sizes = list(arg(node, 2, "sizes"))
        for d, n in changes.items():
            k = d - dim
            if 0 <= k < len(sizes) and isinstance(sizes[k], int) and sizes[k] != -1:
                sizes[k] = n
        node.args = (node.args[0], dim, tuple(sizes))
        node.kwargs = {}
        return
    found = _shape_args(node)
    if found is None:
        return  # flatten/squeeze/unsqueeze compute their sizes from the input
    where, shp = found
    if len(shp) != len(out.shape):
        return
    for d, n in changes.items():
        if isinstance(shp[d], int) and shp[d] != -1:
            shp[d] = n
    if where == -1:
        node.args = (node.args[0], *shp)
    else:
        args = list(node.args)
        if len(args) > where:
            args[where] = tuple(shp)
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, "shape": tuple(shp)}


def _permute(ctx: Ctx, node: fx.Node) -> Any:
    x = ctx.info(node.args[0])
    shape = ctx.shape(node)
    if x is None or shape is None:
        return _unknown(ctx, node)
    rest = node.args[1:] if node.op == "call_method" else (arg(node, 1, "dims"),)
    dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    if len(dims) != x.ndim or not all(isinstance(d, int) for d in dims):
        return _unknown(ctx, node)
    out = TInfo(shape)
    for new, old in enumerate(dims):
        old = ndim_dim(old, x.ndim)
        if old in x.labels:
            out.set(new, x.labels[old], x.zero[old])
    return out


def _transpose(ctx: Ctx, node: fx.Node) -> Any:
    x = ctx.info(node.args[0])
    shape = ctx.shape(node)
    d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
    if x is None or shape is None or not isinstance(d0, int) or not isinstance(d1, int):
        return _unknown(ctx, node)
    d0, d1 = ndim_dim(d0, x.ndim), ndim_dim(d1, x.ndim)
    perm = list(range(x.ndim))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    out = TInfo(shape)
    for new, old in enumerate(perm):
        if old in x.labels:
            out.set(new, x.labels[old], x.zero[old])
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
            out.set(d + off, ids, x.zero[d])
        else:
            ctx.block_ids(ids, f"expand of a channel dim ({node.name})")
    return out


# ---------------------------------------------------------------------------------------------
# reductions, spatial ops, softmax
# ---------------------------------------------------------------------------------------------
def _reduce(kind: str) -> Callable[[Ctx, fx.Node], Any]:
    """sum over channels mixes them (zeros add nothing); mean/max over channels changes with the count."""

    def analyze(ctx: Ctx, node: fx.Node) -> Any:
        x = ctx.info(node.args[0])
        shape = ctx.shape(node)
        if x is None or shape is None:
            return _unknown(ctx, node)
        dims = arg(node, 1, "dim")
        keepdim = bool(arg(node, 2, "keepdim", False))
        if dims is None:
            red = list(range(x.ndim))
        elif isinstance(dims, int):
            red = [ndim_dim(dims, x.ndim)]
        elif isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims):
            red = [ndim_dim(d, x.ndim) for d in dims]
        else:
            return _unknown(ctx, node)
        out = TInfo(shape)
        for d, ids in x.labels.items():
            if d in red:
                if kind == "sum":
                    ctx.sink(x, d)
                else:
                    ctx.block_ids(ids, f"{kind} over a channel dim ({node.name})")
                continue
            nd = d if keepdim else d - sum(1 for r in red if r < d)
            out.set(nd, ids, x.zero[d])
        return out

    return analyze


def _spatial(n_spatial: Callable[[fx.Node, TInfo], int], zero_preserving: bool | Callable[[Ctx, fx.Node], bool] = True):
    """Pooling/interpolate/pad: channels pass through, the last ``n_spatial`` dims must not be channels."""

    def analyze(ctx: Ctx, node: fx.Node) -> Any:
        x = ctx.info(node.args[0])
        shape = ctx.shape(node)
        if x is None or shape is None or len(shape) != x.ndim:
            return _unknown(ctx, node)
        k = n_spatial(node, x)
        zp = zero_preserving(ctx, node) if callable(zero_preserving) else zero_preserving
        out = TInfo(shape)
        for d, ids in x.labels.items():
            if d >= x.ndim - k:
                ctx.block_ids(ids, f"{_op_name(node)} over a channel dim ({node.name})")
            else:
                out.set(d, ids, x.zero[d] if zp else None)
        return out

    return analyze


def _pool_dims(k: int) -> Callable[[fx.Node, TInfo], int]:
    return lambda node, x: k


def _all_but_two(node: fx.Node, x: TInfo) -> int:
    return max(x.ndim - 2, 0)


def _pad_dims(node: fx.Node, x: TInfo) -> int:
    pad = arg(node, 1, "pad")
    return len(pad) // 2 if isinstance(pad, (list, tuple)) else x.ndim


def _pad_zp(ctx: Ctx, node: fx.Node) -> bool:
    if node.op == "call_module":
        m = ctx.module(node)
        return float(getattr(m, "value", 0.0)) == 0.0
    mode = arg(node, 2, "mode", "constant")
    value = arg(node, 3, "value", None)
    return mode != "constant" or value is None or value == 0


def _pad_module_dims(node: fx.Node, x: TInfo) -> int:
    return x.ndim - 2 if x.ndim > 2 else x.ndim


def _softmax(ctx: Ctx, node: fx.Node) -> Any:
    x = ctx.info(node.args[0])
    if x is None:
        return _unknown(ctx, node)
    if node.op == "call_module":
        dim = ctx.module(node).dim
    else:
        dim = arg(node, 1, "dim")
    if not isinstance(dim, int):
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
# weight layers
# ---------------------------------------------------------------------------------------------
def _conv_out_zero(m: nn.modules.conv._ConvNd, in_zero: np.ndarray) -> np.ndarray:
    """Output channels that are exactly zero: no bias, and every non-zero weight reads a zero input.

    Works per group on the (groups, out/g, in/g) weight pattern, never on a dense out×in matrix
    (a depthwise conv with 4,000 channels would otherwise build a 16M-entry one).
    """
    g = m.groups
    cin, cout = m.in_channels, m.out_channels
    ig, og = cin // g, cout // g
    w = m.weight.detach()
    live_in = ~in_zero.reshape(g, ig)
    if live_in.all():  # the common case: one pass over the weight, no (out, in) pattern needed
        if m.transposed:
            reads_live = w.reshape(g, ig, og, -1).any(-1).any(1).cpu().numpy()
        else:
            reads_live = w.flatten(1).any(1).cpu().numpy()
    elif m.transposed:  # weight (cin, cout/g, k...): nz (cin, og)
        nz = w.flatten(2).any(-1).cpu().numpy()
        reads_live = (nz.reshape(g, ig, og) & live_in[:, :, None]).any(1)
    else:  # weight (cout, cin/g, k...): nz (cout, ig)
        nz = w.flatten(2).any(-1).cpu().numpy()
        reads_live = (nz.reshape(g, og, ig) & live_in[:, None, :]).any(2)
    no_bias = np.ones(cout, dtype=bool) if m.bias is None else ~_nz(m.bias)
    return no_bias & ~reads_live.reshape(cout)


def _linear_out_zero(m: nn.Linear, in_zero: np.ndarray) -> np.ndarray:
    """Output features that are exactly zero: no bias, and every non-zero weight reads a zero input."""
    w = m.weight.detach()
    if in_zero.any():
        w = w[:, torch.from_numpy(~in_zero).to(w.device)]
    reads_live = w.any(1).cpu().numpy()
    no_bias = np.ones(m.out_features, dtype=bool) if m.bias is None else ~_nz(m.bias)
    return no_bias & ~reads_live


def _conv(ctx: Ctx, node: fx.Node) -> Any:
    m = ctx.module(node)
    x = ctx.info(node.args[0])
    shape = ctx.shape(node)
    if x is None or shape is None:
        return _unknown(ctx, node)
    n_sp = len(m.kernel_size)
    cdim = x.ndim - n_sp - 1
    for d in list(x.labels):
        if d != cdim:
            ctx.block_ids(x.labels[d], f"{type(m).__name__} over a channel-labelled spatial dim ({node.name})")
    g = m.groups
    cin, cout = m.in_channels, m.out_channels
    ig, og = cin // g, cout // g
    xin = x.labels.get(cdim)
    in_zero = x.zero[cdim] if xin is not None else np.zeros(cin, dtype=bool)
    out_ids = ctx.module_ids(node.target, "out", cout)
    zero = _conv_out_zero(m, in_zero)
    if g == 1:
        if xin is not None:
            ctx.bind(node.target, "in", xin)
            ctx.sink(x, cdim)
    elif ig == 1:
        # depthwise-like: each input channel owns its og outputs; cut whole groups
        if xin is None:
            ctx.block_ids(out_ids, f"grouped {type(m).__name__} on channels strfx cannot cut ({node.name})")
        else:
            ctx.bind(node.target, "in", xin)
            ctx.uf.union_arrays(np.repeat(xin, og), out_ids)
    else:
        # grouped: cut the same positions in every group so that the group structure stays valid
        if xin is not None:
            ctx.bind(node.target, "in", xin)
            for col in xin.reshape(g, ig).T:
                ctx.uf.union_all(col)
            ctx.sink(x, cdim)
        for col in out_ids.reshape(g, og).T:
            ctx.uf.union_all(col)
    out = TInfo(shape)
    out.set(len(shape) - n_sp - 1, out_ids, zero)
    return out


def _in_out_keep(s: Any, node: fx.Node, in_dim: int, out_dim: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Keep-masks of a module's input and output channels (None: nothing cut there).

    ``in_dim``/``out_dim`` count from the end (-1 = last), as channel dims of conv and linear do.
    """
    x = s.info(node.args[0])
    out = s.out_value(node)
    return s.keep_of(x, x.ndim + in_dim), s.keep_of(out, out.ndim + out_dim)


def _conv_shrink(s: Any, node: fx.Node) -> None:
    m = s.module(node)
    if not s.first_visit(node):
        return
    n_sp = len(m.kernel_size)
    kin, kout = _in_out_keep(s, node, -n_sp - 1, -n_sp - 1)
    if kin is None and kout is None:
        return
    g = m.groups
    cin, cout = m.in_channels, m.out_channels
    ig, og = cin // g, cout // g
    kin = np.ones(cin, bool) if kin is None else kin
    kout = np.ones(cout, bool) if kout is None else kout
    w = m.weight.detach()
    if g == 1:
        w = w[kout][:, kin] if not m.transposed else w[kin][:, kout]
        new_g = 1
    elif ig == 1:
        if not np.array_equal(np.repeat(kin, og), kout):
            s.fail(node, "depthwise input and output cuts disagree")
        w = w[kout] if not m.transposed else w[kin]
        new_g = int(kin.sum())
    else:
        kin_g, kout_g = kin.reshape(g, ig), kout.reshape(g, og)
        if not ((kin_g == kin_g[0]).all() and (kout_g == kout_g[0]).all()):
            s.fail(node, "grouped conv cut differs between groups")
        w = w[kout][:, kin_g[0]] if not m.transposed else w[kin][:, kout_g[0]]
        new_g = g
    m.weight = nn.Parameter(w.clone().contiguous(), requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        m.bias = nn.Parameter(m.bias.detach()[kout].clone(), requires_grad=m.bias.requires_grad)
    m.in_channels, m.out_channels, m.groups = int(kin.sum()), int(kout.sum()), new_g


def _linear(ctx: Ctx, node: fx.Node) -> Any:
    m = ctx.module(node)
    x = ctx.info(node.args[0])
    shape = ctx.shape(node)
    if x is None or shape is None:
        return _unknown(ctx, node)
    last = x.ndim - 1
    xin = x.labels.get(last)
    in_zero = x.zero[last] if xin is not None else np.zeros(m.in_features, dtype=bool)
    if xin is not None:
        ctx.bind(node.target, "in", xin)
        ctx.sink(x, last)
    out_ids = ctx.module_ids(node.target, "out", m.out_features)
    out = TInfo(shape)
    bias_zero = m.bias is None or not _nz(m.bias).any()
    for d, ids in x.labels.items():
        if d != last:
            out.set(d, ids, x.zero[d] & bias_zero)
    out.set(len(shape) - 1, out_ids, _linear_out_zero(m, in_zero))
    return out


def _linear_shrink(s: Any, node: fx.Node) -> None:
    m = s.module(node)
    if not s.first_visit(node):
        return
    kin, kout = _in_out_keep(s, node, -1, -1)
    if kin is None and kout is None:
        return
    kin = np.ones(m.in_features, bool) if kin is None else kin
    kout = np.ones(m.out_features, bool) if kout is None else kout
    m.weight = nn.Parameter(m.weight.detach()[kout][:, kin].clone(), requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        m.bias = nn.Parameter(m.bias.detach()[kout].clone(), requires_grad=m.bias.requires_grad)
    m.in_features, m.out_features = int(kin.sum()), int(kout.sum())


# ---------------------------------------------------------------------------------------------
# per-channel modules: norms, gates, PReLU
# ---------------------------------------------------------------------------------------------
def _channel_dim(m: nn.Module, ndim: int) -> int:
    if isinstance(m, STRGate):
        return m.channel_dim % ndim
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return 1 if ndim == m._get_no_batch_dim() + 1 else 0
    if isinstance(m, nn.PReLU):
        return 1 if ndim >= 2 else 0
    return 1


def _per_channel_zero(m: nn.Module, in_zero: np.ndarray) -> np.ndarray:
    """Channels the module outputs as exactly zero (eval mode, running statistics)."""
    n = len(in_zero)
    never = np.zeros(n, dtype=bool)
    if isinstance(m, STRGate):
        return ~_nz(m.effective_weight()) | in_zero
    if isinstance(m, nn.PReLU):
        return in_zero.copy()
    if isinstance(m, STRBatchNorm):
        g = m.effective_weight().detach()
        off = m.offset.detach()
        zero = ~_nz(g) & ~_nz(off)
        if m.running_mean is not None:
            const = g * m.shift.detach() + off
            zero |= in_zero & ~_nz(m.running_mean) & ~_nz(const)
        return zero
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        affine = getattr(m, "affine", False)
        w = m.weight if affine else None
        b = m.bias if affine else None
        b_zero = np.ones(n, bool) if b is None else ~_nz(b)
        zero = never.copy()
        if w is not None:
            zero |= ~_nz(w) & b_zero
        stats_zero = np.ones(n, bool)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            stats_zero = ~_nz(m.running_mean)
        zero |= in_zero & stats_zero & b_zero
        return zero
    if isinstance(m, nn.GroupNorm):
        w = m.weight if m.affine else None
        b_zero = np.ones(n, bool) if not m.affine else ~_nz(m.bias)
        zero = never.copy()
        if w is not None:
            zero |= ~_nz(w) & b_zero
        per = n // m.num_groups
        group_zero = np.repeat(in_zero.reshape(m.num_groups, per).all(axis=1), per)
        return zero | (group_zero & b_zero)
    return never


def _per_channel(ctx: Ctx, node: fx.Node) -> Any:
    m = ctx.module(node)
    x = ctx.info(node.args[0])
    shape = ctx.shape(node)
    if x is None or shape is None or tuple(shape) != x.shape:
        return _unknown(ctx, node)
    cdim = _channel_dim(m, x.ndim)
    stats_over_other_dims = isinstance(m, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm))
    out = TInfo(shape)
    keeps_zero = isinstance(m, (STRGate, nn.PReLU))
    for d, ids in x.labels.items():
        if d == cdim:
            continue
        if stats_over_other_dims:
            ctx.block_ids(ids, f"{type(m).__name__} normalizes over channels ({node.name})")
        else:
            out.set(d, ids, x.zero[d] if keeps_zero else None)
    ids = x.labels.get(cdim)
    has_params = not isinstance(m, nn.PReLU) or m.num_parameters > 1
    if ids is None:
        return out
    if isinstance(m, nn.GroupNorm):
        for row in ids.reshape(m.num_groups, -1):
            ctx.uf.union_all(row)
    if has_params:
        ctx.bind(node.target, "c", ids)
    out.set(cdim, ids, _per_channel_zero(m, x.zero[cdim]))
    return out


def _slice_param(m: nn.Module, name: str, keep: np.ndarray) -> None:
    t = getattr(m, name, None)
    if t is None:
        return
    new = t.detach()[torch.as_tensor(keep)].clone()
    if isinstance(t, nn.Parameter):
        setattr(m, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(m, name, new)


def _per_channel_shrink(s: Any, node: fx.Node) -> None:
    m = s.module(node)
    if not s.first_visit(node):
        return
    x = s.info(node.args[0])
    if x is None:
        return
    keep = s.keep_of(x, _channel_dim(m, x.ndim))
    if keep is None:
        return
    n = int(keep.sum())
    if isinstance(m, nn.PReLU):
        if m.num_parameters > 1:
            _slice_param(m, "weight", keep)
            m.num_parameters = n
        return
    if isinstance(m, nn.GroupNorm):
        per = m.num_channels // m.num_groups
        groups = keep.reshape(m.num_groups, per)
        if not (groups == groups[:, :1]).all():
            s.fail(node, "GroupNorm cut splits a group")
        m.num_groups, m.num_channels = int(groups[:, 0].sum()), n
    for name in ("weight", "bias", "shift", "offset", "running_mean", "running_var"):
        _slice_param(m, name, keep)
    for attr in ("num_features", "num_channels"):
        if hasattr(m, attr) and not isinstance(m, nn.GroupNorm):
            setattr(m, attr, n)


def _layer_norm(ctx: Ctx, node: fx.Node) -> Any:
    x = ctx.info(node.args[0])
    shape = ctx.shape(node)
    if x is None or shape is None:
        return _unknown(ctx, node)
    if node.op == "call_module":
        m = ctx.module(node)
        k = len(m.normalized_shape)
        bias = m.bias
    else:
        ns = arg(node, 1, "normalized_shape")
        k = len(ns) if isinstance(ns, (list, tuple)) else 1
        bias = None
        b = arg(node, 3, "bias")
        if isinstance(b, fx.Node):
            bias = torch.ones(1)  # a bias we do not read: assume non-zero
    out = TInfo(shape)
    bias_zero = bias is None or not _nz(bias).any()
    for d, ids in x.labels.items():
        if d >= x.ndim - k:
            ctx.block_ids(ids, f"LayerNorm normalizes across these channels ({node.name})")
        else:
            out.set(d, ids, x.zero[d] & bias_zero)
    return out


def _mha(ctx: Ctx, node: fx.Node) -> Any:
    """Attention internals are left unpruned: its inputs' channels are blocked, never guessed."""
    for i in infos_of((node.args, node.kwargs), ctx):
        ctx.block(i, f"MultiheadAttention inputs are not pruned ({node.name})")
    return ctx.fresh_value(node)


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------
ZP, NZP = _elementwise(True), _elementwise(False)
R_ZP = Rule("elementwise", ZP)
R_NZP = Rule("elementwise (f(0) != 0)", NZP)
R_ADD = Rule("add/sub", _binary("add"))
R_MUL = Rule("mul", _binary("mul"))
R_DIV = Rule("div", _binary("div"))
R_CAT = Rule("cat", _cat(False))
R_STACK = Rule("stack", _cat(True))
R_SPLIT = Rule("split/chunk", _split, _split_shrink)
R_RESHAPE = Rule("reshape", _reshape, _reshape_shrink)
R_PERMUTE = Rule("permute", _permute)
R_TRANSPOSE = Rule("transpose", _transpose)
R_EXPAND = Rule("expand", _expand)
R_META = Rule("size/shape", _meta_only)
R_SOFTMAX = Rule("softmax", _softmax)
R_LN = Rule("layer_norm", _layer_norm)
R_SUM, R_MEAN, R_AMAX = Rule("sum", _reduce("sum")), Rule("mean", _reduce("mean")), Rule("amax", _reduce("max"))
R_MATMUL = Rule("matmul", _blocking("attention/matmul internals are not pruned"))


def _pool_rule(k: int) -> Rule:
    return Rule(f"pool{k}d", _spatial(_pool_dims(k)))


MODULE_RULES: dict[type, Rule] = {
    nn.modules.conv._ConvNd: Rule("conv", _conv, _conv_shrink),
    nn.Linear: Rule("linear", _linear, _linear_shrink),
    STRBatchNorm: Rule("STR-BN", _per_channel, _per_channel_shrink),
    STRGate: Rule("STR gate", _per_channel, _per_channel_shrink),
    nn.modules.batchnorm._BatchNorm: Rule("batchnorm", _per_channel, _per_channel_shrink),
    nn.modules.instancenorm._InstanceNorm: Rule("instancenorm", _per_channel, _per_channel_shrink),
    nn.GroupNorm: Rule("groupnorm", _per_channel, _per_channel_shrink),
    nn.PReLU: Rule("prelu", _per_channel, _per_channel_shrink),
    nn.LayerNorm: Rule("layernorm", _layer_norm),
    nn.MultiheadAttention: Rule("multihead attention", _mha),
    nn.Flatten: Rule("flatten", _reshape),
    nn.Unflatten: Rule("unflatten", _reshape),
    nn.Softmax: R_SOFTMAX,
    nn.LogSoftmax: R_SOFTMAX,
    nn.MaxPool1d: _pool_rule(1), nn.MaxPool2d: _pool_rule(2), nn.MaxPool3d: _pool_rule(3),
    nn.AvgPool1d: _pool_rule(1), nn.AvgPool2d: _pool_rule(2), nn.AvgPool3d: _pool_rule(3),
    nn.AdaptiveAvgPool1d: _pool_rule(1), nn.AdaptiveAvgPool2d: _pool_rule(2), nn.AdaptiveAvgPool3d: _pool_rule(3),
    nn.AdaptiveMaxPool1d: _pool_rule(1), nn.AdaptiveMaxPool2d: _pool_rule(2), nn.AdaptiveMaxPool3d: _pool_rule(3),
    nn.Upsample: Rule("upsample", _spatial(_all_but_two)),
    nn.modules.padding._ConstantPadNd: Rule("pad", _spatial(_pad_module_dims, _pad_zp)),
    nn.modules.padding._ReflectionPadNd: Rule("pad", _spatial(_pad_module_dims)),
    nn.modules.padding._ReplicationPadNd: Rule("pad", _spatial(_pad_module_dims)),
}
for _cls in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
             nn.Hardtanh, nn.Tanh, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.Identity,
             nn.modules.dropout._DropoutNd):
    MODULE_RULES[_cls] = R_ZP
for _cls in (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid):
    MODULE_RULES[_cls] = R_NZP
# Modules known by class name, without importing their package (torchvision.ops.StochasticDepth
# scales whole samples: element-wise on channels, zero stays zero).
MODULE_NAME_RULES: dict[str, Rule] = {"StochasticDepth": R_ZP}

FUNCTION_RULES: dict[Any, Rule] = {
    operator.add: R_ADD, operator.iadd: R_ADD, operator.sub: R_ADD, operator.isub: R_ADD,
    torch.add: R_ADD, torch.sub: R_ADD, torch.subtract: R_ADD,
    operator.mul: R_MUL, operator.imul: R_MUL, torch.mul: R_MUL, torch.multiply: R_MUL,
    operator.truediv: R_DIV, operator.itruediv: R_DIV, torch.div: R_DIV, torch.true_divide: R_DIV,
    operator.neg: R_ZP, torch.neg: R_ZP, torch.abs: R_ZP, operator.pow: Rule("pow", _elementwise(_pow_zp)),
    torch.cat: R_CAT, torch.concat: R_CAT, torch.concatenate: R_CAT, torch.stack: R_STACK,
    torch.split: R_SPLIT, torch.chunk: R_SPLIT,
    operator.getitem: Rule("getitem", _getitem),
    torch.reshape: R_RESHAPE, torch.flatten: R_RESHAPE, torch.squeeze: R_RESHAPE, torch.unsqueeze: R_RESHAPE,
    torch.permute: R_PERMUTE, torch.transpose: R_TRANSPOSE, torch.swapaxes: R_TRANSPOSE,
    torch.mean: R_MEAN, torch.sum: R_SUM, torch.amax: R_AMAX,
    torch.softmax: R_SOFTMAX, F.softmax: R_SOFTMAX, F.log_softmax: R_SOFTMAX,
    F.layer_norm: R_LN,
    builtins.getattr: R_META,
    torch.matmul: R_MATMUL, operator.matmul: R_MATMUL, torch.bmm: R_MATMUL, torch.einsum: R_MATMUL,
    F.interpolate: Rule("interpolate", _spatial(_all_but_two)),
    F.pad: Rule("pad", _spatial(_pad_dims, _pad_zp)),
    torch.clamp: Rule("clamp", _elementwise(_clamp_zp)), torch.clip: Rule("clamp", _elementwise(_clamp_zp)),
}
for _fn in (torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardtanh,
            F.leaky_relu, F.elu, F.selu, F.celu, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d,
            F.dropout3d, F.alpha_dropout, torch.dropout, F.hardshrink, F.softshrink, F.tanhshrink):
    FUNCTION_RULES[_fn] = R_ZP
for _fn in (torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.exp, F.softplus, F.logsigmoid, torch.cos):
    FUNCTION_RULES[_fn] = R_NZP
for _k, _fn in ((1, F.max_pool1d), (2, F.max_pool2d), (3, F.max_pool3d), (1, F.avg_pool1d), (2, F.avg_pool2d),
                (3, F.avg_pool3d), (1, F.adaptive_avg_pool1d), (2, F.adaptive_avg_pool2d), (3, F.adaptive_avg_pool3d),
                (1, F.adaptive_max_pool1d), (2, F.adaptive_max_pool2d), (3, F.adaptive_max_pool3d),
                (1, torch.max_pool1d), (2, torch.max_pool2d), (3, torch.max_pool3d), (1, torch.avg_pool1d),
                (1, torch.adaptive_avg_pool1d)):
    FUNCTION_RULES[_fn] = _pool_rule(_k)

METHOD_RULES: dict[str, Rule] = {
    "add": R_ADD, "add_": R_ADD, "sub": R_ADD, "sub_": R_ADD,
    "mul": R_MUL, "mul_": R_MUL, "div": R_DIV, "div_": R_DIV,
    "view": R_RESHAPE, "reshape": R_RESHAPE, "flatten": R_RESHAPE, "unflatten": R_RESHAPE,
    "squeeze": R_RESHAPE, "unsqueeze": R_RESHAPE,
    "permute": R_PERMUTE, "transpose": R_TRANSPOSE, "swapaxes": R_TRANSPOSE,
    "expand": R_EXPAND, "split": R_SPLIT, "chunk": R_SPLIT,
    "mean": R_MEAN, "sum": R_SUM, "amax": R_AMAX,
    "softmax": R_SOFTMAX, "log_softmax": R_SOFTMAX,
    "size": R_META, "dim": R_META, "numel": R_META,
    "clamp": Rule("clamp", _elementwise(_clamp_zp)), "clamp_min": Rule("clamp", _elementwise(_clamp_zp)),
    "pow": Rule("pow", _elementwise(_pow_zp)),
    "matmul": R_MATMUL, "bmm": R_MATMUL,
}
for _m in ("relu", "relu_", "tanh", "tanh_", "neg", "abs", "contiguous", "clone", "detach", "float", "to",
           "hardtanh"):
    METHOD_RULES[_m] = R_ZP
for _m in ("sigmoid", "sigmoid_", "exp"):
    METHOD_RULES[_m] = R_NZP

OP_RULES: dict[str, Rule] = {
    "placeholder": Rule("input", _placeholder),
    "get_attr": Rule("constant", _placeholder),
    "output": Rule("output", _output),
}


def lookup(ctx: Ctx, node: fx.Node) -> Rule | None:
    """The rule for ``node`` or None (then :data:`unknown_rule` applies)."""
    if node.op in OP_RULES:
        return OP_RULES[node.op]
    if node.op == "call_module":
        mod = ctx.module(node)
        for cls in type(mod).__mro__:
            if cls in MODULE_RULES:
                return MODULE_RULES[cls]
            if cls.__name__ in MODULE_NAME_RULES:
                return MODULE_NAME_RULES[cls.__name__]
        return None
    if node.op == "call_function":
        try:
            return FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    return None
