"""Insert STR into a traced model.

* ``unstructured``: every conv/linear weight (also weights used functionally through ``get_attr``
  and the projection weights inside ``nn.MultiheadAttention``) gets an :class:`~strfx.modules.STRWeight`
  parametrization. The graph's dataflow is unchanged; the weight a node reads is thresholded.
* ``structured``: every affine BatchNorm node is swapped for an :class:`~strfx.modules.STRBatchNorm`
  (STR-BN) computing the same function; every other conv/linear producer gets a new
  :class:`~strfx.modules.STRGate` node right after it (all its users re-pointed to the gate), unless
  its output is the model's output, goes straight into a normalization that would undo a zero, or
  (when shapes are recorded) belongs to channel groups the channel analysis blocks — gating those
  would sparsify channels that can never be removed.

Each touched node gets ``node.meta["strfx"]``: what was inserted and on which parameter.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from strfx.config import SparsifyConfig
from strfx.errors import NothingToSparsifyError
from strfx.modules import STRBatchNorm, STRGate, STRWeight

# Module kind -> (index of the output-channel dim in its weight, channel dim of its output).
WEIGHT_MODULES: dict[type[nn.Module], tuple[int, int]] = {
    nn.Conv1d: (0, 1),
    nn.Conv2d: (0, 1),
    nn.Conv3d: (0, 1),
    nn.ConvTranspose1d: (1, 1),
    nn.ConvTranspose2d: (1, 1),
    nn.ConvTranspose3d: (1, 1),
    nn.Linear: (0, -1),
}
# Functional op -> same, for weights read through get_attr.
WEIGHT_FUNCTIONS = {
    F.linear: (0, -1),
    F.conv1d: (0, 1),
    F.conv2d: (0, 1),
    F.conv3d: (0, 1),
    F.conv_transpose1d: (1, 1),
    F.conv_transpose2d: (1, 1),
    F.conv_transpose3d: (1, 1),
}
# A zero channel going into these does not stay zero, so a gate right before them is useless.
NORMALIZATIONS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class WeightSite:
    """A weight read by one node: ``owner.attr`` is the parameter, ``node`` the op using it."""

    node: fx.Node
    owner: str  # qualified name of the module holding the parameter ("" for the root)
    attr: str  # parameter name inside owner, may be dotted ("out_proj.weight")
    weight_channel_dim: int
    output_channel_dim: int | None  # None when the node's output is not channel-wise (MHA internals)

    @property
    def qualname(self) -> str:
        return f"{self.owner}.{self.attr}" if self.owner else self.attr


def _split(qualname: str) -> tuple[str, str]:
    owner, _, attr = qualname.rpartition(".")
    return owner, attr


def weight_sites(gm: fx.GraphModule) -> list[WeightSite]:
    """Every conv/linear weight in graph order (a weight used by two nodes appears twice)."""
    sites: list[WeightSite] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            kind = next((k for k in WEIGHT_MODULES if isinstance(mod, k)), None)
            if kind is not None:
                wdim, odim = WEIGHT_MODULES[kind]
                sites.append(WeightSite(node, node.target, "weight", wdim, odim))
            elif isinstance(mod, nn.MultiheadAttention):
                names = ["in_proj_weight"] if mod.in_proj_weight is not None else [
                    "q_proj_weight", "k_proj_weight", "v_proj_weight"]
                sites += [WeightSite(node, node.target, n, 0, None) for n in names]
                # MHA returns a tuple: its outputs are not gated here
                sites.append(WeightSite(node, node.target, "out_proj.weight", 0, None))
        elif node.op == "call_function" and node.target in WEIGHT_FUNCTIONS:
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                wdim, odim = WEIGHT_FUNCTIONS[node.target]
                owner, attr = _split(w.target)
                sites.append(WeightSite(node, owner, attr, wdim, odim))
    return sites


def _excluded(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _skip_by_position(sites: list[WeightSite], config: SparsifyConfig) -> set[int]:
    """Indices of sites left dense by keep_first_dense / keep_last_dense / exclude."""
    skip = {i for i, s in enumerate(sites) if _excluded(s.owner, config.exclude) or _excluded(s.qualname, config.exclude)}
    nodes = list(dict.fromkeys(s.node for s in sites))
    if nodes and config.keep_first_dense:
        skip |= {i for i, s in enumerate(sites) if s.node is nodes[0]}
    if nodes and config.keep_last_dense:
        skip |= {i for i, s in enumerate(sites) if s.node is nodes[-1]}
    return skip


def _insert_unstructured(gm: fx.GraphModule, config: SparsifyConfig) -> int:
    sites = weight_sites(gm)
    skip = _skip_by_position(sites, config)
    done: set[str] = set()
    for i, site in enumerate(sites):
        if i in skip or site.qualname in done:
            continue
        if not site.owner:
            site = _move_root_parameter(gm, site)
        owner_path, _, leaf_attr = site.qualname.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        weight = getattr(owner, leaf_attr)
        strw = STRWeight(weight, config.s_init, config.threshold_fn, config.per_channel_threshold, site.weight_channel_dim)
        strw.to(device=weight.device, dtype=weight.dtype)
        parametrize.register_parametrization(owner, leaf_attr, strw, unsafe=True)
        done.add(site.qualname)
        site.node.meta.setdefault("strfx", {}).setdefault("str_weights", []).append(site.qualname)
    return len(done)


def _move_root_parameter(gm: fx.GraphModule, site: WeightSite) -> WeightSite:
    """Move a weight owned by the GraphModule itself into a holder submodule.

    parametrize swaps the class of the module it parametrizes, which a GraphModule's generated
    ``__call__`` does not survive; a plain holder module takes the parametrization instead.
    """
    holder = nn.Module()
    holder.register_parameter("weight", getattr(gm, site.attr))
    name = f"{site.attr}_str"
    gm.add_submodule(name, holder)
    delattr(gm, site.attr)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == site.attr:
            node.target = f"{name}.weight"
    return WeightSite(site.node, name, "weight", site.weight_channel_dim, site.output_channel_dim)


def _swap_batchnorms(gm: fx.GraphModule, config: SparsifyConfig) -> int:
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or not mod.affine:
            continue
        if _excluded(node.target, config.exclude):
            continue
        new = STRBatchNorm.from_batchnorm(mod, config.s_init, config.threshold_fn, config.bn_gamma_min)
        owner_path, _, name = node.target.rpartition(".")
        setattr(gm.get_submodule(owner_path) if owner_path else gm, name, new)
        node.meta["strfx"] = {"str": "bn", "module": node.target}
        count += 1
    return count


def _gate_channels(gm: fx.GraphModule, site: WeightSite) -> int:
    owner = gm.get_submodule(site.owner) if site.owner else gm
    weight = owner.get_parameter(site.attr) if "." in site.attr else getattr(owner, site.attr)
    dim = site.weight_channel_dim
    groups = 1
    if site.node.op == "call_module":
        groups = getattr(gm.get_submodule(site.node.target), "groups", 1)
    return weight.shape[dim] * (groups if dim == 1 else 1)


def _needs_gate(gm: fx.GraphModule, node: fx.Node) -> bool:
    users = list(node.users)
    if any(u.op == "output" for u in users):
        return False  # the model's outputs cannot lose channels
    if len(users) == 1 and users[0].op == "call_module":
        nxt = gm.get_submodule(users[0].target)
        if isinstance(nxt, (STRBatchNorm, *NORMALIZATIONS)):
            return False  # STR-BN already thresholds these channels / a norm would undo the zero
    return True


def _unprunable_outputs(gm: fx.GraphModule, sites: list[WeightSite]) -> set[fx.Node]:
    """Producers whose every output channel is blocked by the channel analysis (e.g. a residual
    stream normalised by LayerNorm): a gate there would sparsify channels that can never be removed.
    Needs recorded shapes; without them every producer counts as prunable."""
    if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
        return set()
    from strfx.passes.channel_analysis import META_KEY, TInfo, analyze_channels

    analysis = analyze_channels(gm)
    blocked: set[fx.Node] = set()
    for site in sites:
        info = site.node.meta.get(META_KEY)
        if not isinstance(info, TInfo) or site.output_channel_dim is None:
            continue
        dim = site.output_channel_dim % info.ndim
        ids = info.labels.get(dim)
        if ids is None or all(int(r) in analysis.blocked for r in analysis.roots[ids]):
            blocked.add(site.node)
    for node in gm.graph.nodes:
        node.meta.pop(META_KEY, None)
    return blocked


def _insert_gates(gm: fx.GraphModule, config: SparsifyConfig) -> int:
    sites = [s for s in weight_sites(gm) if s.output_channel_dim is not None]
    skip = _skip_by_position(sites, config)
    last_node = sites[-1].node if sites else None
    unprunable = _unprunable_outputs(gm, sites)
    count = 0
    for i, site in enumerate(sites):
        node = site.node
        if i in skip or node is last_node or not _needs_gate(gm, node) or "strfx_gate" in node.meta:
            continue
        if node in unprunable:
            node.meta.setdefault("strfx", {})["no_gate"] = "every output channel is blocked by the channel analysis"
            continue
        gate = STRGate(_gate_channels(gm, site), site.output_channel_dim, config.s_init, config.threshold_fn)
        owner = gm.get_submodule(site.owner) if site.owner else gm
        gate.to(device=next(owner.parameters()).device)
        base = f"{node.target}_gate" if node.op == "call_module" else f"{node.name}_gate"
        name, k = base, 1
        while _has_submodule(gm, name):
            name, k = f"{base}{k}", k + 1
        gm.add_submodule(name, gate)
        with gm.graph.inserting_after(node):
            gate_node = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(gate_node, delete_user_cb=lambda u: u is not gate_node)
        if "tensor_meta" in node.meta:
            gate_node.meta["tensor_meta"] = node.meta["tensor_meta"]
        gate_node.meta["strfx"] = {"str": "gate", "module": name, "producer": node.name}
        node.meta["strfx_gate"] = name
        count += 1
    return count


def _has_submodule(gm: nn.Module, name: str) -> bool:
    try:
        gm.get_submodule(name)
        return True
    except AttributeError:
        return False


def insert_str(gm: fx.GraphModule, config: SparsifyConfig) -> fx.GraphModule:
    """Insert STR in place (the caller owns ``gm``) and return it."""
    if config.mode == "unstructured":
        if _insert_unstructured(gm, config) == 0:
            raise NothingToSparsifyError(
                f"unstructured mode found no conv/linear weight to sparsify in {gm.__class__.__name__} "
                f"(exclude={config.exclude}); check sparsify.exclude and the keep_*_dense options"
            )
    else:
        n = _swap_batchnorms(gm, config)
        if config.gates:
            n += _insert_gates(gm, config)
        if n == 0:
            raise NothingToSparsifyError(
                f"structured mode found nothing to gate in {gm.__class__.__name__}: no affine BatchNorm and no "
                "conv/linear producer whose channels could be removed; use --mode unstructured"
            )
    gm.graph.lint()
    gm.recompile()
    return gm
