"""Element-wise ops (ATen's ``pointwise`` tag) and broadcasting: which operand zeros survive."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from strfx.passes.channel_analysis import Ctx, TInfo, Writer
from strfx.passes.channel_rules._base import (
    _copy, _eval_const, _fresh, _is_tensor_node, _nz_along, _per_index, _unknown, arg, aten, op_name, short_name
)


_SAMPLES = {torch.bool: (True, False, True, False), "int": (1, -3, 7, 2), "float": (-2.5, 0.7, 3.0, 1e4)}


def _sample(val: torch.Tensor, trial: int) -> torch.Tensor:
    kind = torch.bool if val.dtype == torch.bool else ("float" if val.is_floating_point() else "int")
    return torch.tensor(_SAMPLES[kind][trial], dtype=val.dtype)


def _zero_image(ctx: Ctx, node: fx.Node, zero_operands: set[int]) -> bool:
    """Whether the op gives exactly 0 whenever the operands in ``zero_operands`` are 0.

    Asked of the op itself, never assumed: it runs on one-element tensors, zeros at those operands
    and several non-zero values at the other tensor operands, with the node's constant arguments
    (``hardtanh(x, 0.5, 2.0)`` maps 0 to 0.5, so it is not zero-preserving; ``mul`` is whatever the
    other factor is). A one-element constant operand keeps its value (``clamp(x, min_buf, max_buf)``
    with buffers at ±inf is zero-preserving; with buffers at 0.5 it is not).
    """
    def other(a: fx.Node, trial: int) -> torch.Tensor:
        t = ctx.tensor(a)
        return t.detach().reshape(()) if t is not None and t.numel() == 1 else _sample(a.meta["val"], trial)

    for trial in range(4):
        args = [(torch.zeros((), dtype=a.meta["val"].dtype) if k in zero_operands else other(a, trial))
                if _is_tensor_node(a) else a for k, a in enumerate(node.args)]
        kwargs = {key: other(a, trial) if _is_tensor_node(a) else a for key, a in node.kwargs.items()}
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
        # used here must keep every index, whatever another use of it ties (a shared layer scale) — unless
        # this is f(parameter) element by element and every use of it is followed (_tie_const's chains)
        own = node if [a for _, a in operands] == [*node.all_input_nodes] and len(operands) == 1 else None
        for k, a in operands:
            if ctx.param_name(a) is not None:
                for dd in range(ctx.info(a).ndim if ctx.info(a) is not None else 0):
                    if ctx.info(a).shape[dd] > 1:
                        ctx.pin(a, dd, f"{short_name(node)} on values strfx does not follow ({node.name})", own)
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
        tied = [_tie_const(ctx, a, dd, ids, node) for _, a, dd in params]
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


def _tie_const(ctx: Ctx, a: fx.Node, dim: int, ids: np.ndarray, user: fx.Node) -> tuple[str, int] | None:
    """Label ``dim`` of the constant operand ``a`` with ``ids``, and the parameter it comes from.

    Only the parameter itself is cut, so a constant computed in ``forward`` can follow a cut only
    when it is that parameter reshaped, broadcast, indexed along another dim or mapped element by
    element (``gamma.view(1, -1, 1, 1)``, ``gamma[:, None, None]``, ``cls_token.expand(B, -1, -1)``,
    timm EfficientViM's ``sigmoid(alpha).view(4, -1, 1, 1)[0]``): then every node of the chain is
    labelled too (their size arguments are rewritten), and each link is recorded as followed (an
    element-wise node's pin on the parameter is lifted only if all its uses are). Returns (parameter
    name, its dim), or None when it cannot.
    """
    chain: list[tuple[fx.Node, int]] = []
    node = a
    while isinstance(node, fx.Node) and node.op == "call_function":
        packet = getattr(node.target, "overloadpacket", None)
        src = node.args[0] if node.args else None
        elementwise = isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags
        if packet not in _SHAPE_ONLY and packet not in (aten.expand, aten.select) and not elementwise \
                or not isinstance(src, fx.Node) or node.all_input_nodes != [src]:
            return None
        out_shape, in_shape = ctx.shape(node), ctx.shape(src)
        if out_shape is None or in_shape is None:
            return None
        chain.append((node, dim))
        if packet is aten.select:  # another dim indexed away: the dims from it on move up by one
            dim = dim + (dim >= int(node.args[1]) % len(in_shape))
        elif elementwise and packet not in _SHAPE_ONLY:  # f(p) element by element: p's dims are the output's
            if in_shape != out_shape:
                return None
        elif packet is aten.expand:  # dims align on the right; a broadcast dim is not a channel dim
            d_in = dim - (len(out_shape) - len(in_shape))
            if d_in < 0 or in_shape[d_in] != out_shape[dim]:
                return None
            dim = d_in
        elif in_shape != out_shape:  # a reshape keeps a dim whole where as many elements come before it
            before = math.prod(out_shape[:dim])
            same = [i for i, n in enumerate(in_shape) if n == out_shape[dim] and math.prod(in_shape[:i]) == before]
            if not same:
                return None
            dim = same[0]
        node = src
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    ctx.tie(node, dim, ids)
    for n, d in chain:
        ctx.early_users.setdefault(n, {u for u in n.users if u in ctx.values})
        ctx.tie(n, d, ids)
    ctx.tie_sites.add(user)
    for (n, _), later in zip(chain, [user] + [n for n, _ in chain]):
        ctx.followed.setdefault(n, set()).add(later)
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
