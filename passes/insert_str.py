"""Insert STR into the user's own model, guided by its captured ATen graph.

The graph only *finds* where STR goes; STR itself is attached to the eager module as
``torch.nn.utils.parametrize`` parametrizations of existing parameters, found by the qualified
names the graph's ``get_attr`` nodes carry:

* ``unstructured``: every weight read by a convolution or linear op gets an
  :class:`~strfx.modules.STRWeight` (also weights used functionally, and the projections inside
  ``nn.MultiheadAttention``);
* ``structured``: for every channel group the analysis can prune, each op that *writes* the group's
  channels with per-channel parameters gets STR there — STR-BN (an ``STRWeight`` on γ and an
  :class:`~strfx.modules.STRShift` on β) for a batch norm, and otherwise one
  :class:`~strfx.modules.STRUnit` importance vector per group, applied by
  :class:`~strfx.modules.UnitScale` to the rows of conv/linear weights and biases, the γ/β of other
  norms and the columns of embeddings. A writer whose output only feeds a norm is left alone: the
  norm would undo a zero there, and STR goes on the norm instead.

Insertion is exact by construction (each parametrization stores what gives back the parameter's
value) and :func:`strfx.sparsify` checks it on the example inputs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import operator
import re
import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from strfx.config import SparsifyConfig
from strfx.errors import NothingToSparsifyError
from strfx.modules import STRUnit, STRWeight, UnitScale, str_norm_
from strfx.passes.channel_analysis import ChannelAnalysis, Writer

aten = torch.ops.aten
_CONVS = {aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten.conv_transpose1d, aten.conv_transpose2d,
          aten.conv_transpose3d}


def _owner(qualname: str) -> tuple[str, str]:
    owner, _, attr = qualname.rpartition(".")
    return owner, attr


def _excluded(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _transposed(node: fx.Node) -> bool:
    packet = node.target.overloadpacket
    if packet is aten.convolution:
        return bool(node.args[6])
    return packet in (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)


def weight_sites(gm: fx.GraphModule) -> list[tuple[fx.Node, str, int]]:
    """(op node, qualified weight name, output-channel dim of the weight) of every conv/linear weight
    (also ``x @ W`` products with a 2-D parameter, as in HF's Conv1D)."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        packet = node.target.overloadpacket
        if packet in _CONVS or packet is aten.linear:
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                sites.append((node, w.target, 1 if packet in _CONVS and _transposed(node) else 0))
        elif packet in (aten.addmm, aten.mm, aten.matmul):  # x @ W with a 2-D parameter (HF Conv1D)
            w = node.args[2] if packet is aten.addmm else node.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr" and w.meta["val"].dim() == 2:
                sites.append((node, w.target, 1))
    return sites


def _skip(names: list[str], config: SparsifyConfig) -> set[int]:
    """Indices left dense by ``exclude`` / ``keep_first_dense`` / ``keep_last_dense``."""
    skip = {i for i, n in enumerate(names) if _excluded(_owner(n)[0], config.exclude) or _excluded(n, config.exclude)}
    if names and config.keep_first_dense:
        skip.add(0)
    if names and config.keep_last_dense:
        skip.add(len(names) - 1)
    return skip


def _module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def register(model: nn.Module, name: str, parametrization: nn.Module) -> None:
    """Parametrize the tensor ``name`` of ``model``, and every other name of the same tensor.

    A tied weight (HF's ``lm_head.weight`` is ``wte.weight``) is read by two modules; STR must act
    on both reads, so each alias gets the same parametrization over the one shared ``original``.
    """
    owner, attr = _owner(name)
    mod = _module(model, owner)
    tensor = getattr(mod, attr)
    aliases = [n for n, t in model.named_parameters(remove_duplicate=False) if t is tensor and n != name]
    parametrize.register_parametrization(mod, attr, parametrization, unsafe=True)
    if not aliases:
        return
    original = mod.parametrizations[attr].original
    for alias in aliases:
        a_owner, a_attr = _owner(alias)
        a_mod = _module(model, a_owner)
        parametrize.register_parametrization(a_mod, a_attr, parametrization, unsafe=True)
        a_mod.parametrizations[a_attr].original = original


def insert_unstructured(model: nn.Module, gm: fx.GraphModule, config: SparsifyConfig) -> int:
    names = list(dict.fromkeys(name for _, name, _ in weight_sites(gm)))
    dims = {name: dim for _, name, dim in weight_sites(gm)}
    skip = _skip(names, config)
    count = 0
    for i, name in enumerate(names):
        if i in skip:
            continue
        owner, attr = _owner(name)
        weight = getattr(_module(model, owner), attr)
        strw = STRWeight(weight, config.s_init, config.threshold_fn, config.per_channel_threshold, dims[name])
        strw.to(device=weight.device, dtype=weight.dtype)
        register(model, name, strw)
        count += 1
    return count


def _covered(w: Writer, norm_nodes: set[fx.Node]) -> bool:
    """Whether every use of the writer's output is a norm (which would undo a zero written here)."""
    users = list(w.node.users)
    return bool(users) and all(u in norm_nodes or (u.target is operator.getitem and u.args[1] != 0) for u in users)


def _owned(model: nn.Module) -> set[str]:
    """Qualified names of the model's own parameters and buffers (tied ones under every name; a parametrized
    tensor under its plain name), as opposed to constants torch.export lifted from a forward's caches."""
    names = set()
    for n, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        n = ("." + n).replace(".parametrizations.", ".")[1:]
        names.add(re.sub(r"\.original\d*$", "", n))  # original, or original0/1 of a two-tensor parametrization
    return names


def insert_structured(model: nn.Module, analysis: ChannelAnalysis, config: SparsifyConfig) -> int:
    norm_nodes = {w.node for w in analysis.writers if w.kind in ("batch_norm", "norm")}
    # a norm's input may pass through getitem-free ops only in the ATen graph; its users are direct
    # only the model's own parameters carry STR: a tensor torch.export lifted as a constant (a bias table a
    # forward cached on the module, e.g. timm's EfficientFormerV2) is cut in the graph but gated nowhere
    owned = _owned(model)
    writers = [dataclasses.replace(w, params=[p for p in w.params if p[0] in owned])
               for w in analysis.writers if analysis.prunable(w.ids)]
    covered = {id(w) for w in writers if w.kind not in ("batch_norm", "norm") and _covered(w, norm_nodes)}
    producers: dict[fx.Node, list[str]] = {}
    for w in writers:
        if id(w) in covered and w.params:
            for u in w.node.users:
                producers.setdefault(u, []).append(_owner(w.params[0][0])[0])
    names = [w.params[0][0] if w.params else "" for w in writers]
    skip = _skip(names, config)
    units: dict[int, tuple[STRUnit, dict[int, int]]] = {}
    done: set[str] = set()
    count = 0
    for i, w in enumerate(writers):
        if i in skip or id(w) in covered or not w.params or not w.affine or w.params[0][0] in done:
            continue
        owner = _owner(w.params[0][0])[0]
        if w.kind == "batch_norm" and len(w.params) == 2:
            mod = _module(model, owner)
            gamma_attr, beta_attr = _owner(w.params[0][0])[1], _owner(w.params[1][0])[1]
            str_norm_(mod, config.s_init, config.threshold_fn, config.bn_gamma_min, gamma_attr, beta_attr)
            mod.parametrizations[gamma_attr][0].producers = producers.get(w.node, [])
            done.update(name for name, _ in w.params)
            count += 1
            continue
        if not config.gates:
            continue
        group = analysis.group_of(w.ids)
        if group not in units:
            unit_roots = sorted({int(r) for v in writers if analysis.group_of(v.ids) == group for r in analysis.roots[v.ids]})
            unit = STRUnit(len(unit_roots), config.s_init, config.threshold_fn)
            unit.producers = []
            units[group] = (unit, {r: k for k, r in enumerate(unit_roots)})
            count += 1
        unit, position = units[group]
        index = torch.as_tensor(np.array([position[int(r)] for r in analysis.roots[w.ids]], dtype=np.int64))
        for name, dim in w.params:
            if name in done:
                continue
            p_owner, attr = _owner(name)
            mod = _module(model, p_owner)
            tensor = getattr(mod, attr)
            scale = UnitScale(unit, index.to(tensor.device), dim)
            unit.to(device=tensor.device)
            register(model, name, scale)
            done.add(name)
        unit.producers.append(owner)
    return count


_PASS_THROUGH = {aten.clone, aten.alias, aten._to_copy, aten.contiguous, aten.dropout, aten.view, aten._unsafe_view,
                 aten.reshape, aten.permute, aten.transpose, aten.t, aten.mul, aten.div, aten.squeeze, aten.unsqueeze,
                 aten.flatten, aten.expand}


def _last_writer(node: fx.Node, writers: dict[fx.Node, Writer]) -> Writer | None:
    """The conv/linear whose output ``node`` is, through reshapes, casts, dropout and scaling by
    constants (layer scale): zero there makes ``node`` zero."""
    for _ in range(32):
        if node in writers:
            w = writers[node]
            return w if w.kind in ("conv", "linear") else None
        if node.op != "call_function" or getattr(node.target, "overloadpacket", None) not in _PASS_THROUGH:
            return None
        flowing = [a for a in node.all_input_nodes if a.op != "get_attr" and not _constant(a)]
        if len(flowing) != 1:
            return None
        node = flowing[0]
    return None


def _constant(node: fx.Node) -> bool:
    """Whether ``node`` depends on parameters and constants only (no input)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.op == "placeholder":
            return False
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return True


def _branch(skip: fx.Node, end: fx.Node, limit: int = 20_000) -> set[fx.Node] | None:
    """The nodes between ``skip`` and ``end`` (``end`` computed from ``skip``), or None if it is not."""
    seen: set[fx.Node] = set()
    todo, found = [end], False
    while todo:
        n = todo.pop()
        if n is skip:
            found = True
            continue
        if n in seen or n.op in ("placeholder", "get_attr"):
            continue
        seen.add(n)
        if len(seen) > limit:
            return None
        todo.extend(n.all_input_nodes)
    return seen if found else None


def residual_branches(gm: fx.GraphModule, analysis: ChannelAnalysis) -> list[tuple[fx.Node, Writer, list[Writer]]]:
    """(residual add, the branch's last conv/linear, every conv/linear of the branch) for each
    ``x + f(x)`` whose ``f`` ends in a conv/linear layer."""
    writers = {w.node: w for w in analysis.writers}
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.add.Tensor or len(node.args) != 2:
            continue
        shapes = [getattr(a.meta.get("val"), "shape", None) if isinstance(a, fx.Node) else None for a in node.args]
        if shapes[0] is None or shapes[0] != shapes[1] or node.kwargs.get("alpha", 1) != 1:
            continue
        for skip, branch in (node.args, node.args[::-1]):
            last = _last_writer(branch, writers)
            inside = _branch(skip, last.node) if last is not None else None
            if last is not None and inside is not None:
                out.append((node, last, [writers[n] for n in inside if n in writers
                                         and writers[n].kind in ("conv", "linear")]))
                break
    return out


def insert_depth(model: nn.Module, gm: fx.GraphModule, analysis: ChannelAnalysis, config: SparsifyConfig) -> int:
    """A scalar STR gate on each residual branch's last conv/linear (its weight and bias): the branch
    is the identity's partner ``x + g'·f(x)``; at g' = 0 it is exactly zero and shrink removes it."""
    count = 0
    owned = _owned(model)
    for _, last, inside in residual_branches(gm, analysis):
        owners = [_owner(w.params[0][0])[0] for w in inside if w.params]
        if not last.params or any(_excluded(o, config.exclude) for o in owners) \
                or any(name not in owned for name, _ in last.params):  # a lifted constant cannot be gated
            continue
        unit = STRUnit(1, config.s_init, config.threshold_fn)
        unit.kind, unit.producers = "depth", owners
        parts = [o.split(".") for o in owners]
        common = [p[0] for p in zip(*parts) if len(set(p)) == 1]
        unit.label = ".".join(common + ["depth"]) if common else f"{_owner(last.params[0][0])[0]}.depth"
        for name, dim in last.params:
            owner, attr = _owner(name)
            tensor = getattr(_module(model, owner), attr)
            unit.to(device=tensor.device)
            register(model, name, UnitScale(unit, torch.zeros(tensor.shape[dim], dtype=torch.long,
                                                             device=tensor.device), dim))
        count += 1
    return count


def insert_str(model: nn.Module, gm: fx.GraphModule, config: SparsifyConfig,
               analysis: ChannelAnalysis | None = None) -> nn.Module:
    """Attach STR to ``model`` in place (the caller owns it: :func:`strfx.sparsify` passes a deep copy)."""
    if config.mode == "unstructured":
        if insert_unstructured(model, gm, config) == 0:
            raise NothingToSparsifyError(
                f"unstructured mode found no conv/linear weight to sparsify in {type(model).__name__} "
                f"(exclude={config.exclude}); check sparsify.exclude and the keep_*_dense options"
            )
    else:
        assert analysis is not None
        count = insert_structured(model, analysis, config)
        if config.depth and config.gates:
            count += insert_depth(model, gm, analysis, config)
        if count == 0:
            raise NothingToSparsifyError(
                f"structured mode found nothing to gate in {type(model).__name__}: no channel group that "
                "could ever be removed (see `strfx inspect MODEL --groups` for what blocks them); "
                "use --mode unstructured"
            )
    return model

