"""The shrink pass: cut every dead channel out of the captured ATen graph.

Takes the ``GraphModule`` of :func:`strfx.passes.capture.capture` (of a plain model: STR already
folded into its parameters) analysed by :func:`~strfx.passes.channel_analysis.analyze_channels`,
and changes it in place:

* every parameter, buffer or constant tensor whose dims carry channel ids is sliced to the kept
  channels (this is the whole cut of conv, linear, norms, embeddings, layer scales, ...);
* each op's ``shrink`` rule rewrites the constant arguments that name channel counts (view and
  expand sizes, split sizes, the ``groups`` of a depthwise conv, a group norm's group count), and
  statistics over cut channels (a mean, layer_norm, rms_norm) keep the original width as divisor;
  where they are is left in ``analysis.width_fixes`` for the eager model.

It returns what was cut per qualified parameter name, so the same cut can be applied to the
user's own eager module. Checking the result is the caller's job (:func:`strfx.shrink` always does).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from strfx.errors import StrfxError
from strfx.passes.channel_analysis import META_KEY, ChannelAnalysis, TInfo, _fetch, module_path, static_shape
from strfx.passes.channel_rules import lookup


class ShrinkError(StrfxError):
    """The cut of one op is inconsistent (a bug or an op the rules mis-describe)."""


class ShrinkCtx:
    """What shrink rules read: channel facts of nodes and the keep masks."""

    def __init__(self, gm: fx.GraphModule, analysis: ChannelAnalysis) -> None:
        self.gm = gm
        self.analysis = analysis

    def record_width(self, node: fx.Node, kind: str, old: int, new: int) -> None:
        """A statistic over cut channels (``kind``: mean, layer_norm, rms_norm) now divides by ``old``
        while it reads ``new`` channels; the eager model's module at that place needs the same fix."""
        self.analysis.width_fixes.append((module_path(node), kind, old, new))

    def info(self, arg: Any) -> TInfo | None:
        v = arg.meta.get(META_KEY) if isinstance(arg, fx.Node) else None
        return v if isinstance(v, TInfo) else None

    def shape(self, arg: Any) -> tuple[int, ...] | None:
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        return static_shape(val) if isinstance(val, torch.Tensor) else None

    def out_value(self, node: fx.Node) -> Any:
        return node.meta.get(META_KEY)

    def keep_of(self, info: TInfo | None, dim: int) -> np.ndarray | None:
        """Bool mask of kept indices along ``dim``, or None when nothing is cut there."""
        if info is None or dim not in info.labels:
            return None
        keep = self.analysis.keep(info.labels[dim])
        return None if keep.all() else keep

    def keep_count(self, info: TInfo, dim: int) -> int:
        if dim not in info.labels:
            return info.shape[dim]
        return int(self.analysis.keep(info.labels[dim]).sum())


def keep_masks(analysis: ChannelAnalysis) -> dict[str, dict[int, np.ndarray]]:
    """Qualified tensor name → dim → bool keep mask, for every tensor that loses channels."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for name, dims in analysis.params.items():
        for d, ids in dims.items():
            keep = analysis.keep(ids)
            if not keep.all():
                out.setdefault(name, {})[d] = keep
    return out


def cut_tensor(t: torch.Tensor, keeps: dict[int, np.ndarray]) -> torch.Tensor:
    """``t`` restricted to the kept indices of each dim (a new tensor; ``t`` is untouched), in ``t``'s memory
    format: a channels-last weight stays channels-last, so the layer's outputs keep the layout the model's
    own ``view`` calls were written for."""
    out = t.detach()
    for d, keep in keeps.items():
        out = out.index_select(d, torch.as_tensor(np.nonzero(keep)[0], device=out.device))
    return out.clone(memory_format=_memory_format(t))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter/buffer/attribute ``name`` of ``root`` by ``value`` (same kind)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    old = getattr(owner, leaf)
    if isinstance(old, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)


def bias_deltas(gm: nn.Module, analysis: ChannelAnalysis) -> dict[str, torch.Tensor]:
    """What each consumer's bias gains when its constant input channels are cut (qualified name → delta).

    A channel that is the constant ``k`` everywhere contributes ``k · Σ W[:, c, ...]`` to every
    output of a linear layer or of a conv that pads nothing; the analysis only lets such a channel
    go where every consumer is one of those (:class:`~strfx.passes.channel_analysis.FoldSite`).
    """
    deltas: dict[str, torch.Tensor] = {}
    for site, pos, const in analysis.folded():
        w = _fetch(gm, site.weight).detach()
        idx = torch.as_tensor(pos, device=w.device)
        shape = [1] * w.dim()
        shape[site.in_dim] = len(pos)
        k = torch.as_tensor(const, dtype=torch.float64, device=w.device).reshape(shape)
        contrib = w.index_select(site.in_dim, idx).to(torch.float64) * k
        delta = contrib.sum([d for d in range(w.dim()) if d != site.out_dim])
        deltas[site.bias] = deltas[site.bias] + delta if site.bias in deltas else delta
    return deltas


def apply_bias_deltas(root: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Add ``deltas`` to the (uncut) biases of ``root`` in place, in each bias' own dtype."""
    for name, delta in deltas.items():
        b = _fetch(root, name)
        set_tensor(root, name, (b.detach().to(torch.float64) + delta.to(b.device)).to(b.dtype))


def _all_zero(arg: Any) -> bool:
    info = arg.meta.get(META_KEY) if isinstance(arg, fx.Node) else None
    return isinstance(info, TInfo) and any(bool(z.all()) and len(z) > 0 for z in info.zero.values())


def _same_type(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape and va.dtype == vb.dtype


def _impure(node: fx.Node) -> bool:
    """Dead code elimination keeps only what has an effect: a metadata assert on a dead value, or an op
    that is random only through an argument (attention's dropout_p), goes with the value."""
    t = node.target
    if node.op == "call_function" and isinstance(t, torch._ops.OpOverload):
        if t is torch.ops.aten._assert_tensor_metadata.default:
            return False
        if torch.Tag.nondeterministic_seeded in t.tags and not t._schema.is_mutable:
            return False
    return node.is_impure()


def drop_zero_terms(gm: fx.GraphModule) -> set[str]:
    """``x + 0 → x`` where the analysis proved a whole operand zero (a residual branch whose depth gate
    or every channel died); what computed it is then dead code and goes, parameters included.
    Returns the qualified names of the parameters and buffers no longer used."""
    aten = torch.ops.aten
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.add.Tensor, aten.sub.Tensor) \
                or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
            continue
        a, b = node.args
        for zero, other in [(b, a)] + ([(a, b)] if node.target is aten.add.Tensor else []):
            if isinstance(other, fx.Node) and _all_zero(zero) and _same_type(other, node):
                node.replace_all_uses_with(other)
                gm.graph.erase_node(node)
                break
    gm.graph.eliminate_dead_code(is_impure_node=_impure)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    unused = {name for name, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
              if name not in used}
    for name in unused:
        owner, _, leaf = name.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, leaf)
    return unused


# A view of the cut graph becomes a reshape (a view wherever the strides allow, else a copy): cutting can
# change the layout a kernel returns (CPU attention picks its output layout by head size), and a view that
# was legal on the original strides would fail. The graph is functional, so a copy computes the same values.
_VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}


def shrink_graph(gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict[str, dict[int, np.ndarray]]:
    """Cut the dead channels of ``analysis`` out of ``gm`` (in place); returns the keep masks.

    Constant channels that are cut are first folded into their consumers' biases; what was added is
    left in ``analysis.bias_deltas`` so the same change can be made to the eager model.
    """
    analysis.bias_deltas = bias_deltas(gm, analysis)
    analysis.width_fixes = []
    apply_bias_deltas(gm, analysis.bias_deltas)
    cuts = keep_masks(analysis)
    for name, keeps in cuts.items():
        set_tensor(gm, name, cut_tensor(_fetch(gm, name), keeps))
    ctx = ShrinkCtx(gm, analysis)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        rule = lookup(node)
        if rule is not None and rule.shrink is not None:
            rule.shrink(ctx, node)
        if node.target in _VIEWS:  # see _VIEWS
            node.target = torch.ops.aten.reshape.default
    analysis.removed = drop_zero_terms(gm)
    gm.graph.lint()
    gm.recompile()
    return cuts
