"""Channel-dependency analysis on the ATen graph: which channels go together, and which are dead.

Runs on the ``GraphModule`` of :func:`strfx.passes.capture.capture`. Every labelled dimension of
every tensor in the graph — activations *and* parameters — gets one integer *channel id* per index
(``TInfo.labels[dim]``). Ids are born where channels are born (conv/linear/embedding outputs) and
flow with the per-op rules of :mod:`strfx.passes.channel_rules`; an op that couples channels
(residual add, grouped conv, channel shuffle, a weight used twice) unions their ids, and an op that
reads a parameter along a channel dim labels that parameter's dim with the same ids. After the
walk, one union-find root = one *channel*: the set of (tensor, dim, index) positions that can only
be removed together, parameters included — so cutting a channel is slicing every tensor that
carries its id, and a group maps back to the user's parameters by their qualified names.

A channel is **dead** when it is not blocked (an op the registry does not understand, a model
output, a LayerNorm over it, ...) and every position of it that is *consumed* by a channel-mixing
op (conv/linear input, a sum over channels) is provably exactly zero from the parameters alone
(``TInfo.zero``). Everything runs on the shapes in ``node.meta["val"]``; no data passes through
the model. Cost is linear in the number of (node, channel) positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import re

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from strfx.errors import StrfxError

META_KEY = "strfx_channels"


@dataclass
class TInfo:
    """What the analysis knows about one tensor value: channel ids, provably-zero and provably-constant
    slices per dim.

    ``const[dim][i]`` is the value every entry of index ``i`` along ``dim`` provably has, NaN where
    unknown; a zero slice is the constant 0. Only rules that know the op maps constants to constants
    pass ``const`` (a BatchNorm with γ = 0 outputs β, ``relu(β)`` is ``max(β, 0)``); everything else
    gets the zeros only.
    """

    shape: tuple[int, ...]
    labels: dict[int, np.ndarray] = field(default_factory=dict)
    zero: dict[int, np.ndarray] = field(default_factory=dict)
    const: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def set(self, dim: int, ids: np.ndarray, zero: np.ndarray | None = None,
            const: np.ndarray | None = None) -> None:
        self.labels[dim] = ids
        self.zero[dim] = np.zeros(len(ids), dtype=bool) if zero is None else zero
        c = np.where(self.zero[dim], 0.0, np.nan)
        if const is not None:
            c = np.where(self.zero[dim], 0.0, np.asarray(const, dtype=np.float64))
            self.zero[dim] = self.zero[dim] | (c == 0)  # the constant 0 (relu of a β ≤ 0) is a zero channel
        self.const[dim] = c

    def const_of(self, dim: int) -> np.ndarray:
        """Per index of ``dim``: its constant value, NaN where unknown."""
        c = self.const.get(dim)
        return c if c is not None else np.where(self.zero[dim], 0.0, np.nan)


@dataclass
class FoldSite:
    """A consumer that can absorb a constant input channel into its bias exactly.

    ``out = W ⋆ x + b``: a channel of ``x`` that is the constant ``k`` everywhere adds
    ``k · Σ W[:, c, ...]`` to every output (linear, or a conv that pads nothing), so the channel can
    go once that sum is added to ``b``. ``bias`` None: the layer takes a bias but has none (a conv before a
    BatchNorm); the caller may give its module a zero bias and analyse again (``ChannelAnalysis.bias_wanted``).
    """

    node: str
    weight: str
    bias: str | None
    in_dim: int
    out_dim: int


class UnionFind:
    """Union-find over channel ids, deferred: unions are recorded as id arrays and solved once.

    Rules only add unions during the walk (nobody asks for a root before the end), so the edges
    are kept as numpy arrays and :meth:`roots` finds the components with vectorised
    hook-and-compress rounds; a Python ``union`` per channel was a third of the analysis time.
    """

    def __init__(self) -> None:
        self.size = 0
        self._a: list[np.ndarray] = []
        self._b: list[np.ndarray] = []

    def new(self, n: int) -> np.ndarray:
        start, self.size = self.size, self.size + n
        return np.arange(start, start + n, dtype=np.int64)

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union ``a[i]`` with ``b[i]`` for every i."""
        self._a.append(np.asarray(a, dtype=np.int64).reshape(-1))
        self._b.append(np.asarray(b, dtype=np.int64).reshape(-1))

    def union_all(self, ids: np.ndarray) -> None:
        """Union every id of ``ids`` into one channel."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(flat) > 1:
            self.union_arrays(np.full(len(flat) - 1, flat[0]), flat[1:])

    def roots(self) -> np.ndarray:
        """``roots[id]``: the smallest id of its component."""
        r = np.arange(self.size, dtype=np.int64)
        if not self._a:
            return r
        a, b = np.concatenate(self._a), np.concatenate(self._b)
        while True:
            ra, rb = r[a], r[b]
            differ = ra != rb
            if not differ.any():
                return r
            a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
            lo = np.minimum(ra, rb)
            np.minimum.at(r, np.maximum(ra, rb), lo)  # hook the larger root under the smaller
            while True:  # compress: every id points at its root again
                nxt = r[r]
                if np.array_equal(nxt, r):
                    break
                r = nxt


@dataclass
class Writer:
    """An op that writes channels with per-channel parameters (where structured STR can act)."""

    node: fx.Node
    kind: str  # "conv", "linear", "embedding", "batch_norm", "norm", "layer_norm", "param" (x + p, cat)
    ids: np.ndarray  # channel ids of its output along the written dim
    params: list[tuple[str, int]]  # (qualified parameter name, dim) written per channel
    affine: bool = True  # a norm with γ/β (else it cannot carry STR)


class Ctx:
    """The state rules read and write while the analysis walks the graph in order."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.uf = UnionFind()
        self.values: dict[fx.Node, Any] = {}
        self.blocked: list[tuple[np.ndarray, str]] = []
        self.live: list[np.ndarray] = []
        self.unknown_ops: dict[str, str] = {}
        self.writers: list[Writer] = []
        # site, ids, constant values, positions along the consumed dim
        self.folds: list[tuple[FoldSite, np.ndarray, np.ndarray, np.ndarray]] = []
        self.const_kept: list[tuple[np.ndarray, str]] = []  # constant channels a consumer cannot absorb
        self.bias_wanted: set[str] = set()  # weights whose layer could absorb constants if it had a bias
        self.pins: list[tuple[TInfo, int, str, fx.Node | None]] = []  # parameter dims read by values strfx does
        # not follow; with a node: unless every use of that node's value is followed (see followed_everywhere)
        self.followed: dict[fx.Node, set[fx.Node]] = {}  # a value computed from a parameter -> users following it
        self.tie_sites: set[fx.Node] = set()  # the ops whose operand chain _tie_const followed to a parameter
        self.early_users: dict[fx.Node, set[fx.Node]] = {}  # chain node -> its users analysed before it was tied
        self._consts: dict[fx.Node, Any] = {}
        self.preferred_axis: dict[fx.Node, int] = {}  # reshape → output dim to cut (attention heads)

    # --- reading the graph -------------------------------------------------------------
    def value(self, arg: Any) -> Any:
        return self.values.get(arg) if isinstance(arg, fx.Node) else None

    def info(self, arg: Any) -> TInfo | None:
        v = self.value(arg)
        return v if isinstance(v, TInfo) else None

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        return static_shape(node.meta.get("val"))

    def fresh_value(self, node: fx.Node) -> Any:
        """Unlabelled TInfo(s) shaped like the node's recorded output (tuples kept as tuples)."""
        return _unlabelled(node.meta.get("val"))

    def param_name(self, arg: Any) -> str | None:
        """Qualified name of the parameter/buffer ``arg`` reads directly (a ``get_attr`` node)."""
        return arg.target if isinstance(arg, fx.Node) and arg.op == "get_attr" else None

    def const(self, arg: Any) -> Any:
        """The concrete value of ``arg`` when it depends on parameters and constants only, else None.

        Parameter-only subgraphs (a parametrization, a weight computed in ``forward``) are evaluated
        once, so rules can test what is exactly zero.
        """
        if not isinstance(arg, fx.Node):
            return arg
        if arg in self._consts:
            return self._consts[arg]
        value = None
        if arg.op == "get_attr":
            value = _fetch(self.gm, arg.target)
        elif arg.op == "call_function" and arg.all_input_nodes and len(arg.all_input_nodes) < 16:
            inputs = [self.const(n) for n in arg.all_input_nodes]
            if all(v is not None for v in inputs):
                try:
                    with torch.no_grad():
                        args, kwargs = fx.node.map_arg((arg.args, arg.kwargs), self.const)
                        value = arg.target(*args, **kwargs)
                except Exception:  # noqa: BLE001 - not foldable: treat as unknown
                    value = None
        self._consts[arg] = value
        return value

    def tensor(self, arg: Any) -> torch.Tensor | None:
        v = self.const(arg)
        return v if isinstance(v, torch.Tensor) else None

    # --- facts --------------------------------------------------------------------------
    def tie(self, arg: Any, dim: int, ids: np.ndarray) -> None:
        """Label ``dim`` of a parameter/constant tensor with ``ids`` (union with an earlier label)."""
        info = self.info(arg)
        if info is None:
            return
        dim = dim % info.ndim if info.ndim else 0
        if info.shape[dim] != len(ids):
            self.block_ids(ids, f"a parameter of {getattr(arg, 'name', arg)} does not match its channels")
            return
        if dim in info.labels:
            self.uf.union_arrays(info.labels[dim], ids)
        else:
            info.set(dim, ids)

    def pin(self, arg: Any, dim: int, reason: str, unless_followed: fx.Node | None = None) -> None:
        """``dim`` of parameter ``arg`` is read by channels strfx does not follow: never cut it.

        A weight shared by two calls (one conv applied to the raw input and to a feature map) is
        labelled by the call that follows channels; the other call needs every index of that dim,
        so fresh blocked ids are tied there and the union blocks whatever the other call ties.
        """
        info = self.info(arg)
        if info is not None and info.ndim:
            self.pins.append((info, dim % info.ndim, reason, unless_followed))  # resolved after the walk: only a dim
            # another call labels is blocked (no extra group for a stem conv's input channels)

    def followed_everywhere(self, node: fx.Node) -> bool:
        """Whether every use of ``node``'s value follows its channels (``sigmoid(alpha)`` read only through
        ``.view(4, -1, 1, 1)[k]`` by per-channel products). Users analysed after a chain tied ``node`` saw its
        labels, and their rules follow or block them; each one analysed before must be a link of a followed
        chain: the op that tied it, or a node followed everywhere itself."""
        early = self.early_users.get(node)
        if early is None:
            return False
        links = self.followed.get(node, set())
        return all(u in links and (u in self.tie_sites or self.followed_everywhere(u)) for u in early)

    # --- facts --------------------------------------------------------------------------
    def new(self, n: int) -> np.ndarray:
        return self.uf.new(n)

    def block(self, value: Any, reason: str, dims: Iterable[int] | None = None) -> None:
        """Every channel of ``value`` (optionally only ``dims``) can never be removed."""
        for info in _infos(value):
            for d, ids in info.labels.items():
                if dims is None or d in dims:
                    self.blocked.append((ids, reason))

    def block_ids(self, ids: np.ndarray, reason: str) -> None:
        self.blocked.append((ids, reason))

    def sink(self, info: TInfo | None, dim: int, fold: FoldSite | None = None, why_not: str = "") -> None:
        """``info``'s positions along ``dim`` are mixed into other channels: they must be zero to go,
        or constant where the consumer (``fold``) absorbs a constant into its bias exactly."""
        if info is None or dim not in info.labels:
            return
        ids, zero = info.labels[dim], info.zero[dim]
        const = info.const_of(dim)
        constant = ~zero & np.isfinite(const)
        if fold is not None and fold.bias is None and constant.any():
            self.bias_wanted.add(fold.weight)
            fold = None
        if fold is not None and constant.any():
            self.folds.append((fold, ids[constant], const[constant], np.nonzero(constant)[0]))
            self.live.append(ids[~zero & ~constant])
            return
        if constant.any():
            self.const_kept.append((ids[constant], why_not or "its consumer cannot absorb a constant into a bias"))
        self.live.append(ids[~zero])

    def out_ids(self, arg: Any, dim: int, n: int) -> np.ndarray:
        """Output-channel ids of an op writing through parameter ``arg`` along ``dim``.

        A weight used by two calls gives both outputs the same channels (they must be cut alike).
        """
        info = self.info(arg)
        if info is not None and info.ndim:
            dim = dim % info.ndim
            if dim in info.labels and len(info.labels[dim]) == n:
                return info.labels[dim]
        return self.new(n)


def static_shape(val: Any) -> tuple[int, ...] | None:
    """``val.shape`` as ints, or None where a size is symbolic (a data-dependent ``nonzero`` / ``.tolist()``
    size, which has no value to read: ``int()`` of it raises)."""
    shape = getattr(val, "shape", None)
    if shape is None or free_unbacked_symbols(shape):
        return None
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        return None


def data_dependent(node: fx.Node) -> bool:
    """Whether ``node`` reads or makes a tensor whose size is only known at run time."""
    vals = [node.meta.get("val")] + [a.meta.get("val") for a in node.all_input_nodes]
    return any(isinstance(t, torch.Tensor) and free_unbacked_symbols(t.shape)
               for v in vals for t in (v if isinstance(v, (tuple, list)) else (v,)))


def _fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _unlabelled(tm: Any) -> Any:
    if tm is None:
        return None
    if hasattr(tm, "shape") and hasattr(tm, "dtype"):
        shape = static_shape(tm)
        return TInfo(shape) if shape is not None else None  # symbolic sizes: not analysed
    if isinstance(tm, (tuple, list)):
        return tuple(_unlabelled(t) for t in tm)
    if isinstance(tm, dict):
        return {k: _unlabelled(v) for k, v in tm.items()}
    return None


def _infos(value: Any) -> Iterable[TInfo]:
    if isinstance(value, TInfo):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _infos(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _infos(v)


def infos_of(args: Any, ctx: Ctx) -> list[TInfo]:
    """Every TInfo reachable from (possibly nested) node arguments."""
    out: list[TInfo] = []
    fx.node.map_arg(args, lambda n: out.extend(_infos(ctx.values.get(n))) or n)
    return out


@dataclass
class ChannelGroup:
    """Channels that must be removed together, with where they live and why some cannot go."""

    id: int
    channels: int
    dead: int
    members: list[str]
    blocked_by: list[str]

    @property
    def prunable(self) -> bool:
        return not self.blocked_by


@dataclass
class ChannelAnalysis:
    """Result of :func:`analyze_channels`; also stored per node in ``node.meta["strfx_channels"]``."""

    values: dict[str, Any]  # node name -> TInfo / tuple of TInfo / None
    roots: np.ndarray  # channel id -> its channel (union-find root)
    blocked: dict[int, str]  # root -> first reason
    dead: np.ndarray  # bool per id: the channel of this id is removable
    groups: list[ChannelGroup]
    group_of_root: dict[int, int]
    unknown_ops: dict[str, str]
    params: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # qualified name -> dim -> ids
    writers: list[Writer] = field(default_factory=list)
    folds: list[tuple[FoldSite, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    const_kept: list[tuple[np.ndarray, str]] = field(default_factory=list)
    bias_wanted: set[str] = field(default_factory=set)  # weights whose bias-less layer keeps constant channels
    biases_given: list[str] = field(default_factory=list)  # zero biases the caller gave bias-less layers (names)
    bias_deltas: dict[str, Any] = field(default_factory=dict)  # set by the shrink pass: what it added to biases
    # set by the shrink pass: (module path, kind, original width, kept width) of statistics over cut channels
    width_fixes: list[tuple[str, str, int, int]] = field(default_factory=list)
    removed: set[str] = field(default_factory=set)  # set by the shrink pass: tensors of removed branches

    def folded(self) -> list[tuple[FoldSite, np.ndarray, np.ndarray]]:
        """(consumer, positions along its input dim, constants) of the constant channels that are cut."""
        out = []
        for site, ids, const, pos in self.folds:
            gone = self.dead[ids]
            if gone.any():
                out.append((site, pos[gone], const[gone]))
        return out

    def folded_channels(self) -> int:
        """How many removed channels were constants folded into consumer biases."""
        roots = {int(r) for _, ids, _, _ in self.folds for r in self.roots[ids[self.dead[ids]]]}
        return len(roots)

    def constant_channels_kept(self) -> list[str]:
        """One line per reason a provably constant channel stays (its consumer cannot absorb it)."""
        counts: dict[str, set[int]] = {}
        for ids, why in self.const_kept:
            roots = {int(r) for r in self.roots[ids] if int(r) not in self.blocked and not self.dead[r]}
            if roots:
                counts.setdefault(why, set()).update(roots)
        return [f"{len(r)} constant channel(s) kept: {why}" for why, r in counts.items()]

    def group_of(self, ids: np.ndarray) -> int | None:
        """The group of a set of channel ids (the first one's), or None."""
        if len(ids) == 0:
            return None
        return self.group_of_root.get(int(self.roots[ids[0]]))

    def prunable(self, ids: np.ndarray) -> bool:
        """Whether any of these channels could ever be removed (not blocked)."""
        return any(int(r) not in self.blocked for r in self.roots[ids])

    def keep(self, ids: np.ndarray) -> np.ndarray:
        return ~self.dead[ids]

    def dead_channels(self) -> int:
        return int(sum(g.dead for g in self.groups))

    def _keep_back(self, group: ChannelGroup, chans: list[int], dead_root: np.ndarray, keep: int) -> int:
        """Keep dead channels of ``group`` (lowest ids first) until ``keep`` channels stay; how many."""
        dead = [r for r in chans if dead_root[r]]
        alive = len(chans) - len(dead)
        extra = max(0, min(keep, len(chans)) - alive)
        for r in dead[:extra]:
            dead_root[r] = False
        group.dead -= extra
        return extra

    def _channels_by_group(self) -> dict[int, list[int]]:
        by_group: dict[int, list[int]] = {}
        for r, g in self.group_of_root.items():
            by_group.setdefault(g, []).append(r)
        return {g: sorted(rs) for g, rs in by_group.items()}

    def uniform_widths(self) -> int:
        """Keep back dead channels so that groups playing the same part in every layer keep the same width.

        Siblings are groups of equal width whose members are the same parameters up to layer indices
        (``layers.3.mlp.up_proj.weight`` ~ ``layers.7.mlp.up_proj.weight``): each keeps as many channels
        as the widest of them kept. Keeping a dead channel is exact, so this only gives back some of the
        saving, for what HF configs and the Sheared-LLaMA recipe need (one width per unit kind).
        Returns how many dead channels were kept back.
        """
        by_group = self._channels_by_group()
        siblings: dict[tuple[Any, ...], list[ChannelGroup]] = {}
        for group in self.groups:
            params = sorted({re.sub(r"\.\d+\.", ".*.", m.split(" ")[0]) for m in group.members if m.endswith("(parameter)")})
            if params and group.prunable:
                siblings.setdefault((group.channels, *params), []).append(group)
        dead_root = self.dead.copy()
        kept_back = 0
        for groups in siblings.values():
            if len(groups) < 2:
                continue
            widest = max(g.channels - g.dead for g in groups)
            for g in groups:
                kept_back += self._keep_back(g, by_group.get(g.id, []), dead_root, widest)
        self.dead = dead_root[self.roots]
        return kept_back

    def round_widths(self, multiple: int) -> int:
        """Keep back dead channels so each group keeps a multiple of ``multiple`` channels (or all).

        Keeping a dead channel is always exact (it is zero wherever it is consumed), so this only
        trades a little of the saving for widths that vectorised kernels run at full speed (a conv
        with 61 output channels can be slower than one with 64). Returns how many were kept back.
        """
        if multiple <= 1:
            return 0
        dead_root = self.dead.copy()  # for a root r, dead[r] is its channel's verdict
        by_group = self._channels_by_group()
        kept_back = 0
        for group in self.groups:
            if not group.dead:
                continue
            chans = by_group.get(group.id, [])
            alive = len(chans) - group.dead
            kept_back += self._keep_back(group, chans, dead_root, -(-alive // multiple) * multiple)
        self.dead = dead_root[self.roots]
        return kept_back


def module_path(node: fx.Node) -> str:
    """The module an ATen node came from (``layer1.0.conv1``), or '' for the root."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return re.sub(r"^L\['self'\]\.?", "", path) if isinstance(path, str) else ""


def _members(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "get_attr":
        return f"{node.target} (parameter)"
    if node.op == "call_function":
        op = getattr(node.target, "__name__", str(node.target))
        where = module_path(node)
        return f"{where or node.name} ({op})"
    return f"{node.name} ({node.op})"


def analyze_channels(gm: fx.GraphModule, keep_one: bool = True) -> ChannelAnalysis:
    """Run the channel rules over a captured ``gm`` (shapes in ``node.meta["val"]``) and find dead channels."""
    from strfx.passes.channel_rules import data_dependent_rule, lookup, mark_head_splits, unknown_rule

    if not any("val" in n.meta for n in gm.graph.nodes):
        raise StrfxError("channel analysis needs the graph of strfx.passes.capture (shapes in node.meta['val'])")
    ctx = Ctx(gm)
    ctx.preferred_axis = mark_head_splits(gm)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "call_function" and data_dependent(node):
                rule = data_dependent_rule  # no rule can reason about a size it cannot read
            else:
                rule = lookup(node) or unknown_rule
            ctx.values[node] = rule.analyze(ctx, node)

    for info, dim, reason, node in ctx.pins:
        if dim in info.labels and not (node is not None and ctx.followed_everywhere(node)):
            ctx.block_ids(info.labels[dim], reason)
    roots = ctx.uf.roots()
    n_ids = len(roots)
    blocked: dict[int, str] = {}  # channel -> the first reason recorded for it
    if ctx.blocked:
        first = np.full(n_ids, len(ctx.blocked), dtype=np.int64)
        np.minimum.at(first, np.concatenate([roots[ids] for ids, _ in ctx.blocked]),
                      np.repeat(np.arange(len(ctx.blocked)), [len(ids) for ids, _ in ctx.blocked]))
        for r in np.nonzero(first < len(ctx.blocked))[0].tolist():
            blocked[r] = ctx.blocked[first[r]][1]
    live = np.zeros(n_ids, dtype=bool)
    for ids in ctx.live:
        live[roots[ids]] = True
    removable_root = np.ones(n_ids, dtype=bool)
    removable_root[list(blocked)] = False
    removable_root &= ~live

    pieces: list[tuple[fx.Node, int, int, np.ndarray]] = []  # node, output index, dim, ids
    for node, value in ctx.values.items():
        for k, info in enumerate(_infos(value)):
            for d, ids in info.labels.items():
                pieces.append((node, k, d, ids))

    if keep_one:  # never remove every channel of a dimension: a zero-size tensor is not a model
        changed = True
        while changed:
            changed = False
            for _, _, _, ids in pieces:
                r = roots[ids]
                if len(r) and removable_root[r].all():
                    removable_root[r[0]] = False
                    changed = True
    dead = removable_root[roots]

    # Group graph: pieces are nodes; a piece links to the first piece each of its channels was seen
    # in. Few edges per piece, so this stays linear in the number of positions.
    n_pieces = len(pieces)
    pos_root = np.concatenate([roots[ids] for *_, ids in pieces]) if pieces else np.zeros(0, np.int64)
    pos_piece = np.repeat(np.arange(n_pieces), [len(ids) for *_, ids in pieces])
    first_piece = np.full(n_ids, n_pieces, dtype=np.int64)
    np.minimum.at(first_piece, pos_root, pos_piece)
    edges = np.unique(pos_piece * n_pieces + first_piece[pos_root])
    src, dst = edges // max(n_pieces, 1), edges % max(n_pieces, 1)
    graph = nx.Graph()
    graph.add_nodes_from(range(n_pieces))
    graph.add_edges_from(zip(src[src != dst].tolist(), dst[src != dst].tolist()))
    first_piece[first_piece == n_pieces] = -1
    comps = sorted(nx.connected_components(graph), key=min)
    comp_of_piece = np.zeros(len(pieces), dtype=np.int64)
    for gid, comp in enumerate(comps):
        comp_of_piece[list(comp)] = gid
    seen_roots = np.nonzero(first_piece >= 0)[0]
    root_group = comp_of_piece[first_piece[seen_roots]]
    by_group: list[list[int]] = [[] for _ in comps]
    for r, g in zip(seen_roots.tolist(), root_group.tolist()):
        by_group[g].append(r)
    groups: list[ChannelGroup] = []
    group_of_root: dict[int, int] = dict(zip(seen_roots.tolist(), root_group.tolist()))
    for gid, comp in enumerate(comps):
        chans = by_group[gid]
        members = list(dict.fromkeys(_members(pieces[i][0], gm) for i in sorted(comp)))
        reasons = list(dict.fromkeys(blocked[r] for r in chans if r in blocked))
        groups.append(ChannelGroup(gid, len(chans), int(removable_root[chans].sum()), members, reasons))

    params: dict[str, dict[int, np.ndarray]] = {}
    for node, value in ctx.values.items():
        node.meta[META_KEY] = value
        if node.op == "get_attr" and isinstance(value, TInfo) and value.labels:
            params[node.target] = dict(value.labels)
    return ChannelAnalysis(
        values={n.name: v for n, v in ctx.values.items()}, roots=roots, blocked=blocked, dead=dead,
        groups=groups, group_of_root=group_of_root, unknown_ops=ctx.unknown_ops, params=params,
        writers=ctx.writers, folds=ctx.folds, const_kept=ctx.const_kept,
        bias_wanted=ctx.bias_wanted,
    )
