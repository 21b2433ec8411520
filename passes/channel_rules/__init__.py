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

The rules live in one module per op family (``pointwise``, ``select``, ``shapes``, ``reductions``,
``attention``, ``weights``, ``norms``; shared parts in ``_base``); the table is here.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from strfx.passes.channel_rules._base import (
    Rule, _blocking, _fresh, _no_value, _output, aten, data_dependent_rule, unknown_rule
)
from strfx.passes.channel_rules.pointwise import _identity, _like, _new_tensor, _pointwise
from strfx.passes.channel_rules.select import _cat, _getitem, _select, _slice, _split, _split_shrink, _unbind
from strfx.passes.channel_rules.shapes import (
    _expand, _permute, _reshape, _sizes_shrink, _transpose, _unflatten_shrink
)
from strfx.passes.channel_rules.reductions import (
    _all_but_two, _fixed, _pad_dims, _pad_zp, _reduce, _roll_dims, _softmax, _spatial, _vector_norm
)
from strfx.passes.channel_rules.attention import _sdpa, _sdpa_shrink, mark_head_splits
from strfx.passes.channel_rules.weights import _conv, _conv_shrink, _embedding, _linear, _matmul, _rnn
from strfx.passes.channel_rules.norms import (
    NORMS, _group_norm_shrink, _last_dims_norm, _last_dims_norm_shrink, _mean_shrink, _norm, _prelu
)

__all__ = ["RULES", "Rule", "data_dependent_rule", "lookup", "mark_head_splits", "unknown_rule"]


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
# CompositeImplicit aliases of element-wise ops (``torch.multiply``, ``Tensor.negative``): torch.export keeps
# them as called, untagged.
for _name in ("multiply", "divide", "subtract", "true_divide", "floor_divide", "negative", "absolute", "arccos",
              "arcsin", "arctan", "arctan2", "arctanh", "arccosh", "arcsinh", "clip", "fix", "greater",
              "greater_equal", "less", "less_equal", "not_equal", "rsub", "float_power", "special_expit",
              "special_erf", "special_erfc", "special_exp2", "special_expm1", "special_log1p", "special_round",
              "special_sinc", "special_ndtr", "special_logit", "special_xlogy", "special_i0"):
    RULES[getattr(aten, _name)] = R_POINTWISE
for _op in (aten.lstm.input, aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input):  # not the packed-sequence
    RULES[_op] = Rule("rnn", _rnn)  # overloads (``.data``), whose arguments differ
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
