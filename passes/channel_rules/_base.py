"""Shared parts of the channel rules: the Rule record, small helpers, the graph boundary and fallbacks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from strfx.passes.channel_analysis import Ctx, TInfo, infos_of


aten = torch.ops.aten


@dataclass(frozen=True)
class Rule:
    """How one op maps channels (``analyze``) and how its constant arguments are cut (``shrink``)."""

    name: str
    analyze: Callable[[Ctx, fx.Node], Any]
    shrink: Callable[[Any, fx.Node], None] | None = None


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


def _unknown(ctx: Ctx, node: fx.Node) -> Any:
    touched = infos_of((node.args, node.kwargs), ctx)
    if any(i.labels for i in touched):
        name = op_name(node)
        ctx.unknown_ops.setdefault(name, node.name)
        for i in touched:
            ctx.block(i, f"unsupported op {name} ({node.name})")
    return ctx.fresh_value(node)


unknown_rule = Rule("unknown", _unknown)


def _data_dependent(ctx: Ctx, node: fx.Node) -> Any:
    name = op_name(node)
    for i in infos_of((node.args, node.kwargs), ctx):
        ctx.block(i, f"{name} with a data-dependent size ({node.name})")
    return ctx.fresh_value(node)


data_dependent_rule = Rule("data-dependent size", _data_dependent)


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
