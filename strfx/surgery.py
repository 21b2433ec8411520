"""``strfx.shrink``: analyse channels, cut the dead ones, and prove the smaller model is the same.

The pipeline, on one IR:

1. fold STR into plain parameters on a deep copy of the model (``fold_str``);
2. capture that copy with ``torch.export`` (:mod:`strfx.passes.capture`) and analyse its ATen graph;
3. cut the graph (:mod:`strfx.passes.shrink`): every tensor that carries a dead channel is sliced,
   constant sizes are rewritten;
4. apply the same cut to the eager copy by parameter name and fix the module attributes that name
   channel counts (``in_channels``, ``num_features``, ``normalized_shape``, ...), so the result is
   still the user's own class (its methods, ``generate``, ``save_pretrained`` keep working);
5. verify the eager result against the masked model; where the model's own forward hard-codes a
   size no attribute carries, the eager copy fails that check (in float32, or only in float64: a
   default attention scale taken from a cut head size moves near-uniform attention by 1e-6) and the
   cut ATen graph (a plain ``GraphModule`` that ``torch.export`` captures again for deployment) is the
   result instead, and the report says so in one line.

Verification is part of shrinking (:mod:`strfx.verify`): the result is compared with the masked
model on the example, random, large-magnitude and non-negative inputs, over the whole output
pytree, in float32 and in float64. When the cut graph differs, both graphs are replayed node by
node and the error names the first node whose output (restricted to the kept channels) diverges.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.fx as fx
from pydantic import BaseModel, Field
from torch import nn
from torch.nn.utils import parametrize

from strfx.errors import StrfxError, VerificationError, first_line
from strfx.modules import STR_PARAMETRIZATIONS, STRShift, channel_carriers
from strfx.passes.capture import as_inputs, capture, eval_mode
from strfx.passes.channel_analysis import META_KEY, ChannelAnalysis, TInfo, analyze_channels
from strfx.passes.shrink import apply_bias_deltas, cut_tensor, set_tensor, shrink_graph
from strfx.report import count_params
from strfx.verify import (NotEquivalentError, _to64, available_memory, check_equivalent, to_float64, max_rel_error,
                          verification_inputs)

TOLERANCE = 1e-4


class ShrinkReport(BaseModel):
    """What shrinking removed and how closely the result matches the masked model."""

    params_before: int
    params_after: int
    channels: int = Field(description="Channels (union-find roots) over all groups.")
    channels_removed: int
    groups: int
    prunable_groups: int
    blocked_groups: int
    unknown_ops: dict[str, str] = Field(description="ATen op → first node of it that blocked channels.")
    weight_sparsity: float = Field(description="Fraction of exact zeros left in the shrunk conv/linear weights "
                                   "(unstructured STR: zeros that are not whole channels stay in dense weights).")
    max_error: float = Field(description="Max relative error, shrunk vs masked, over all checked inputs (float32).")
    max_error64: float | None = Field(None, description="The same in float64 (the cut applied to a float64 copy); "
                                      "None when skipped (see notes).")
    verified_on: list[str] = Field(default_factory=list, description="The input kinds both models were compared on.")
    notes: list[str] = Field(default_factory=list, description="Checks that were skipped, and why.")
    analysis_s: float
    shrink_s: float
    round_to: int = Field(default=1, description="Each group kept a multiple of this many channels (dead ones kept as zeros).")
    uniform: bool = Field(default=False, description="Groups playing the same part in every layer kept the same width "
                          "(the widest one's; dead ones kept as zeros).")
    result: Literal["eager", "exported"] = Field(
        "eager", description="'eager': the user's own module class with smaller parameters; 'exported': the "
        "cut ATen graph (the model's forward hard-codes a size no module attribute carries).")
    note: str = Field("", description="Why the result is the exported graph, when it is.")
    constant_channels_folded: int = Field(0, description="Removed channels that were provably constant (e.g. BatchNorm "
                                          "γ = 0, β ≠ 0), folded into their consumers' biases first.")
    constant_channels_kept: list[str] = Field(default_factory=list, description="Provably constant channels kept, "
                                              "with why no consumer bias can absorb them exactly (e.g. zero padding).")


def example_inputs_of(model: nn.Module, example_inputs: Any = None) -> tuple[Any, ...]:
    """``example_inputs``, else the ones :func:`strfx.sparsify` recorded on the model."""
    if example_inputs is None:
        example_inputs = getattr(model, "_strfx", {}).get("example_inputs")
    if example_inputs is None:
        raise StrfxError("shrink needs example inputs (the model was not made by strfx.sparsify); pass example_inputs=")
    return as_inputs(example_inputs)


def random_like(inputs: Sequence[Any], seed: int) -> tuple[Any, ...]:
    """Random inputs with the shapes/dtypes of ``inputs`` (non-float inputs are kept)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            out.append(torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device))
        else:
            out.append(x)
    return tuple(out)


def _weight_sparsity(m: nn.Module) -> float:
    weights = [t for name, t in m.named_parameters() if name.endswith("weight") and t.dim() >= 2]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def _remove_parametrizations(model: nn.Module) -> None:
    """Replace every STR parametrization of ``model`` (in place) by the plain tensor it computes.

    ``parametrize.remove_parametrizations`` deletes the property from the module's class, which a
    deep copy shares with the original model; so each module gets its own class first. STR-BN's β
    reads γ', so β is folded before γ. Low-rank weights (structured mode with ``ranks``) fold to the
    dense weight they compute.
    """
    from strfx.lowrank import STRLowRank, keep_parameter

    kinds = (*STR_PARAMETRIZATIONS, STRLowRank)
    folded: set[int] = set()  # originals already folded (a tied weight is parametrized under each name)
    for _, mod in list(model.named_modules()):
        plist = getattr(mod, "parametrizations", None)
        if not isinstance(plist, nn.ModuleDict):
            continue
        names = [n for n in plist.keys() if any(isinstance(p, kinds) for p in plist[n])]
        if not names:
            continue
        cls = type(mod)
        if getattr(cls, "__module__", "") == "torch.nn.utils.parametrize":
            mod.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        names.sort(key=lambda n: not any(isinstance(p, STRShift) for p in plist[n]))
        for name in names:
            original = getattr(plist[name], "original", None)
            again = original is not None and id(original) in folded
            parametrize.remove_parametrizations(mod, name, leave_parametrized=not again)
            if original is not None:
                folded.add(id(original))
            else:  # a low-rank weight (U, σ, V): computed anew, registered as a buffer by torch
                keep_parameter(mod, name)


@torch.no_grad()
def fold_str(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with STR folded into plain parameters (same function, no strfx inside)."""
    from strfx.api import deepcopy_model

    plain = deepcopy_model(model)
    _remove_parametrizations(plain)
    if hasattr(plain, "_strfx"):
        del plain._strfx
    return plain


def analyze(model: nn.Module, example_inputs: Any = None) -> tuple[fx.GraphModule, ChannelAnalysis]:
    """Channel groups of ``model`` (STR folded), with the captured ATen graph they refer to."""
    inputs = example_inputs_of(model, example_inputs)
    return _capture_analysed(fold_str(model), inputs)


def _capture_analysed(plain: nn.Module, inputs: Sequence[Any]) -> tuple[fx.GraphModule, ChannelAnalysis]:
    """Capture and analyse ``plain`` (a copy strfx owns); bias-less layers that would absorb constant channels
    get a zero bias first.

    A channel that is a constant (network slimming's γ = 0, β ≠ 0) goes once its consumer adds the constant's
    contribution to its bias; a conv before a BatchNorm usually has none. A zero bias changes nothing the
    model computes, so such layers get one and the model is captured again; biases the new graph still does
    not read (a subclass whose forward ignores ``self.bias``) are taken away again.
    """
    gm = capture(plain, inputs)
    analysis = analyze_channels(gm)
    given = [name for name in sorted(analysis.bias_wanted) if _give_zero_bias(plain, name)]
    if not given:
        return gm, analysis
    gm = capture(plain, inputs)
    analysis = analyze_channels(gm)
    for name in given:
        owner = name.rpartition(".")[0]
        if name in analysis.bias_wanted:
            plain.get_submodule(owner).register_parameter("bias", None)
        else:
            analysis.biases_given.append(f"{owner}.bias" if owner else "bias")
    return gm, analysis


def _give_zero_bias(model: nn.Module, weight: str) -> bool:
    """Give the nn.Linear / nn.Conv*d owning ``weight`` a zero bias, if it has none; whether it did."""
    owner_name, _, leaf = weight.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return False
    if leaf != "weight" or not isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)) or owner.bias is not None \
            or getattr(owner, "transposed", False):
        return False
    w = owner.weight
    owner.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)
    return True


# Modules whose attributes name channel counts: how to read them back from the cut tensors.
def _fix_conv(m: nn.modules.conv._ConvNd) -> None:
    w = m.weight
    og_old, ig_old = m.out_channels // m.groups, m.in_channels // m.groups
    if m.transposed:  # (in, out/g, k...)
        n_in = w.shape[0]
        groups = n_in // ig_old if ig_old == 1 else m.groups
        m.in_channels, m.out_channels, m.groups = n_in, w.shape[1] * groups, groups
    else:  # (out, in/g, k...)
        n_out = w.shape[0]
        groups = n_out // og_old if ig_old == 1 and m.groups > 1 else m.groups
        m.in_channels, m.out_channels, m.groups = w.shape[1] * groups, n_out, groups


def _fix_linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _fix_norm(m: nn.Module) -> None:
    t = m.weight if getattr(m, "weight", None) is not None else getattr(m, "running_mean", None)
    if t is not None:
        m.num_features = t.shape[0]


def _fix_group_norm(m: nn.GroupNorm) -> None:
    per = m.num_channels // m.num_groups
    m.num_channels = m.weight.shape[0]
    m.num_groups = m.num_channels // per


def _fix_shape(m: nn.Module) -> None:
    if getattr(m, "weight", None) is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _fix_embedding(m: nn.Embedding) -> None:
    m.embedding_dim = m.weight.shape[1]


def _fix_prelu(m: nn.PReLU) -> None:
    m.num_parameters = m.weight.numel()


def _fix_rnn(m: nn.RNNBase) -> None:
    m.input_size = m.weight_ih_l0.shape[1]
    m._init_flat_weights()  # the fused kernels read this list, not the attributes


ATTRIBUTE_FIXES: list[tuple[type[nn.Module], Any]] = [
    (nn.modules.conv._ConvNd, _fix_conv),
    (nn.Linear, _fix_linear),
    (nn.modules.batchnorm._NormBase, _fix_norm),
    (nn.GroupNorm, _fix_group_norm),
    (nn.LayerNorm, _fix_shape),
    (nn.RMSNorm, _fix_shape),
    (nn.Embedding, _fix_embedding),
    (nn.PReLU, _fix_prelu),
    (nn.RNNBase, _fix_rnn),
]


def _fix_hf_conv1d(m: nn.Module) -> None:
    m.nf = m.weight.shape[1]  # HF's Conv1D: weight (in, out), output size ``nf``


def _fix_hf_gpt2_attention(m: nn.Module) -> None:
    """GPT-2 splits ``c_attn``'s output into q, k, v by ``split_size`` and counts heads from it."""
    split = m.c_attn.nf // 3
    m.split_size = m.embed_dim = split
    m.num_heads = split // m.head_dim


def _fix_qkv_attention(m: nn.Module) -> None:
    """timm's ``Attention`` (a fused ``qkv`` Linear, ``num_heads`` × ``head_dim``) counts heads from it."""
    qkv, head_dim = getattr(m, "qkv", None), getattr(m, "head_dim", None)
    if isinstance(qkv, nn.Linear) and isinstance(head_dim, int) and isinstance(getattr(m, "num_heads", None), int):
        m.num_heads = qkv.out_features // (3 * head_dim)
        if isinstance(getattr(m, "attn_dim", None), int):
            m.attn_dim = m.num_heads * head_dim


# Classes of other libraries, by name (strfx does not import them); fixed after their children.
ATTRIBUTE_FIXES_BY_NAME: dict[str, Any] = {"Conv1D": _fix_hf_conv1d, "GPT2Attention": _fix_hf_gpt2_attention,
                                           "Attention": _fix_qkv_attention}


_WIDTH_FIELDS = ("intermediate", "inner", "ffn", "d_ff", "mlp_dim")


def _hidden_keep(model: nn.Module, cuts: dict[str, dict[int, np.ndarray]]) -> np.ndarray | None:
    """The keep mask of a HF model's hidden size: the cut of its input embedding's columns."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except Exception:  # noqa: BLE001 - a model without input embeddings
        return None
    name = next((n for n, m in model.named_modules() if m is emb), None) if emb is not None else None
    return cuts.get(f"{name}.weight", {}).get(1) if name is not None else None


def _fix_hf_hidden(model: nn.Module, config: Any, fields: dict[str, Any], cuts: dict[str, dict[int, np.ndarray]],
                   widths: list[tuple[str, str, int, int]]) -> None:
    """``hidden_size`` follows a cut of the input embedding's columns; ``head_dim`` is then written out
    (it no longer equals hidden_size // heads) and an RMS norm's ε follows its rescaling."""
    keep = _hidden_keep(model, cuts)
    hidden, heads = fields.get("hidden_size"), fields.get("num_attention_heads")
    if keep is None or not isinstance(hidden, int) or len(keep) != hidden:
        return
    if hasattr(config, "head_dim") and heads and not fields.get("head_dim"):
        config.head_dim = hidden // heads
    config.hidden_size = int(keep.sum())
    scaled = {kind for _, kind, old, new in widths if old == hidden}
    if scaled == {"mean"}:
        for field in ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"):
            if isinstance(fields.get(field), float):
                setattr(config, field, fields[field] * hidden / config.hidden_size)


def _fix_hf_config(model: nn.Module, cuts: dict[str, dict[int, np.ndarray]],
                   widths: list[tuple[str, str, int, int]] = ()) -> None:
    """A HuggingFace config's MLP width, head counts and hidden size follow the cut where every layer
    kept the same width (so ``save_pretrained`` → ``from_pretrained`` rebuilds the shrunk model);
    per-layer widths leave it as it was."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    fields = config.to_dict()
    _fix_hf_hidden(model, config, fields, cuts, list(widths))
    hidden_keep = _hidden_keep(model, cuts)
    kept: dict[int, set[int]] = {}  # old size of a cut dim → its new sizes (the hidden size aside)
    for keeps in cuts.values():
        for keep in keeps.values():
            if hidden_keep is None or not np.array_equal(keep, hidden_keep):
                kept.setdefault(len(keep), set()).add(int(keep.sum()))
    for field, value in fields.items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if any(k in field for k in _WIDTH_FIELDS) and len(kept.get(value, ())) == 1:
            setattr(config, field, next(iter(kept[value])))
    # head counts: a projection of heads × head_dim rows lost whole heads
    heads = fields.get("num_attention_heads")
    hidden = fields.get("hidden_size")
    head_dim = fields.get("head_dim") or (hidden // heads if isinstance(hidden, int) and heads else None)
    if not head_dim:
        return
    for field in ("num_attention_heads", "num_key_value_heads"):
        value = fields.get(field)
        if isinstance(value, int) and len(kept.get(value * head_dim, ())) == 1:
            new = next(iter(kept[value * head_dim]))
            if new % head_dim == 0:
                setattr(config, field, new // head_dim)
                if hasattr(config, "head_dim"):
                    config.head_dim = head_dim  # no longer hidden_size // num_attention_heads



def _widen(parent: nn.Module, leaf: str, norm: nn.Module, full: int) -> None:
    """Swap ``norm`` (a plain nn.LayerNorm / nn.RMSNorm that lost channels) for its Wide* form."""
    from strfx.modules import WideLayerNorm, WideRMSNorm

    (n,) = norm.normalized_shape
    like = next(iter(norm.parameters()), torch.zeros(0))
    kw = {"device": like.device, "dtype": like.dtype}
    if isinstance(norm, nn.LayerNorm):
        wide: nn.Module = WideLayerNorm(n, full, norm.eps, norm.elementwise_affine, norm.bias is not None, **kw)
    else:
        wide = WideRMSNorm(n, full, norm.eps, norm.elementwise_affine, **kw)
    wide.load_state_dict(norm.state_dict())
    wide.train(norm.training)
    setattr(parent, leaf, wide)


def _fix_widths(model: nn.Module, fixes: list[tuple[str, str, int, int]]) -> str | None:
    """Statistics over a cut hidden size keep the original width as divisor, in the eager model.

    ``nn.LayerNorm``/``nn.RMSNorm`` (and subclasses that normalise the same way, as timm's do) become
    :class:`~strfx.modules.WideLayerNorm`/``WideRMSNorm``; a
    hand-written RMS norm (``x · rsqrt(mean(x²) + ε) · γ``, HF's LlamaRMSNorm) is made exact in its own
    class: with C′ of C channels, ``γ·√(C/C′)`` and ``ε·C/C′`` give the same output. Anything else
    is reported (then the cut graph is the result); verification judges every fix.
    """
    for path, kind, old, new in dict.fromkeys(fixes):
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            return f"a {kind} over the cut channels at {path or 'the root'} is not a module strfx can fix"
        if kind in ("layer_norm", "rms_norm") and isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) \
                and len(mod.normalized_shape) == 1:  # subclasses too (timm's LayerNorm): verification judges
            parent_name, _, leaf = path.rpartition(".")
            if not leaf:
                return f"the root module is a {type(mod).__name__} over the cut channels"
            _widen(model.get_submodule(parent_name) if parent_name else model, leaf, mod, old)
            continue
        eps_attr = next((a for a in ("variance_epsilon", "eps") if isinstance(getattr(mod, a, None), float)), None)
        weight = getattr(mod, "weight", None)
        if kind == "mean" and eps_attr and isinstance(weight, torch.Tensor) and weight.dim() == 1:
            set_tensor(mod, "weight", weight.detach() * math.sqrt(old / new))
            setattr(mod, eps_attr, getattr(mod, eps_attr) * old / new)
            continue
        return (f"{type(mod).__name__} at {path or 'the root'} computes a {kind} over the cut channels "
                "in its own forward")
    return None


def _fetch_attr(model: nn.Module, name: str) -> Any:
    owner, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, leaf)


def _drop_blocks(model: nn.Module, path: str, indices: list[int]) -> None:
    """Remove blocks that became the identity from the list that holds them; blocks that number
    themselves (HF's ``layer_idx``, for the KV cache) are renumbered, and a HF config's layer count and
    per-layer lists follow when the list is the model's stack of layers."""
    holder = model.get_submodule(path) if path else model
    before = len(holder)
    keep = [k for k in range(before) if k not in set(indices)]
    blocks = [holder[k] for k in keep]
    if isinstance(holder, nn.ModuleList):
        holder._modules.clear()
        holder.extend(blocks)
    else:
        names = list(holder._modules)
        holder._modules = type(holder._modules)((names[k], holder._modules[names[k]]) for k in keep)
    for new, block in enumerate(blocks):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int) and not isinstance(mod.layer_idx, bool):
                mod.layer_idx = new
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_hidden_layers", None) == before:
        config.num_hidden_layers = len(blocks)
        for field in ("layer_types",):
            value = getattr(config, field, None)
            if isinstance(value, list) and len(value) == before:
                setattr(config, field, [value[k] for k in keep])


def _cut_eager(model: nn.Module, cuts: dict[str, dict[int, np.ndarray]],
               deltas: dict[str, torch.Tensor] | None = None,
               widths: list[tuple[str, str, int, int]] | None = None,
               stubs: dict[str, nn.Module] | None = None) -> str | None:
    """Apply ``cuts`` (after the constant-channel ``deltas`` to biases) to the eager ``model`` in place;
    the reason it cannot, else None."""
    for name in deltas or {}:
        owner_name, _, leaf = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
            if not isinstance(getattr(owner, leaf), torch.Tensor):
                raise AttributeError(name)
        except AttributeError:
            return f"{name} is a constant made in forward(), not a module attribute"
    apply_bias_deltas(model, deltas or {})
    owners: dict[str, nn.Module] = {}
    aliases: dict[int, list[str]] = {}  # a tied tensor's names: all get the one cut tensor
    for n, t in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(t), []).append(n)
    for name, keeps in cuts.items():
        owner_name, _, leaf = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
            tensor = getattr(owner, leaf)
        except AttributeError:
            return f"{name} is a constant made in forward(), not a module attribute"
        if not isinstance(tensor, torch.Tensor):
            return f"{name} is not a tensor attribute"
        set_tensor(model, name, cut_tensor(tensor, keeps))
        owners[owner_name] = owner
        for alias in aliases.get(id(tensor), []):
            if alias != name:
                a_owner, _, a_leaf = alias.rpartition(".")
                setattr(model.get_submodule(a_owner) if a_owner else model, a_leaf, _fetch_attr(model, name))
                owners[a_owner] = model.get_submodule(a_owner) if a_owner else model
    _fix_hf_config(model, cuts, widths or [])
    # owners and the modules holding them, innermost first (a module's fix may read its children's)
    touched = {p for o in owners for p in [".".join(o.split(".")[:k]) for k in range(len(o.split(".")) + 1)]}
    for path in sorted(touched, key=lambda p: -len(p.split("."))):
        owner = model.get_submodule(path) if path else model
        fix = next((f for kind, f in ATTRIBUTE_FIXES if isinstance(owner, kind)), None) if path in owners else None
        fix = fix or next((ATTRIBUTE_FIXES_BY_NAME[c.__name__] for c in type(owner).__mro__
                           if c.__name__ in ATTRIBUTE_FIXES_BY_NAME), None)
        if fix is not None:
            fix(owner)
    live = [w for w in widths or [] if not any(w[0] == p or w[0].startswith(p + ".") for p in stubs or {})]
    why = _fix_widths(model, live)  # by the module paths of the capture: before blocks leave their lists
    if why is not None:
        return why
    dropped: dict[str, list[int]] = {}  # a block list → the indices of blocks that became the identity
    for path, stub in (stubs or {}).items():  # dead residual branches and blocks
        parent, _, leaf = path.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        if isinstance(holder, (nn.ModuleList, nn.Sequential)) and set(stub.kinds) <= {"input", "none"} \
                and stub.kinds[:1] == ["input"] and leaf in holder._modules:
            dropped.setdefault(parent, []).append(list(holder._modules).index(leaf))
        else:
            setattr(holder, leaf, stub)
    for parent, indices in dropped.items():
        _drop_blocks(model, parent, indices)
    return None



def _cut_model(model: nn.Module, inputs: Sequence[Any], round_to: int = 1,
               dead: np.ndarray | None = None, uniform: bool = False) -> tuple[nn.Module, fx.GraphModule, ChannelAnalysis, str | None]:
    """Fold, capture, analyse and cut ``model``: (eager result, cut graph, analysis, why the eager
    result cannot be used or None). ``dead`` imposes another run's verdicts (same graph, same ids)."""
    plain = fold_str(model)
    gm, analysis = _capture_analysed(plain, inputs)
    if dead is not None and len(dead) == len(analysis.dead):
        analysis.dead = dead.copy()
    else:
        if uniform:
            analysis.uniform_widths()
        analysis.round_widths(round_to)
    try:
        cuts = shrink_graph(gm, analysis)
    except StrfxError:
        raise
    except Exception as err:  # noqa: BLE001 - a cut torch rejects is reported as a refusal, not a crash
        raise VerificationError(f"shrinking failed while cutting the graph: {first_line(err)}") from err
    for node in gm.graph.nodes:  # analysis facts are not part of the shrunk model
        node.meta.pop(META_KEY, None)
    # A plain GraphModule (the exported program's module refuses .train()/.eval()); the graph is the
    # inference graph, named after the user's class.
    gm = fx.GraphModule(gm, gm.graph, type(plain).__name__)
    gm.train(model.training)
    stubs = _removed_branches(plain, inputs, analysis.removed)
    if isinstance(stubs, str):
        return plain, gm, analysis, stubs
    return plain, gm, analysis, _cut_eager(plain, cuts, analysis.bias_deltas, analysis.width_fixes, stubs)


def _removed_branches(model: nn.Module, inputs: Sequence[Any], removed: set[str]) -> dict[str, nn.Module] | str:
    """Module path → the :class:`~strfx.modules.RemovedBranch` standing in for each outermost module
    whose every tensor the cut graph no longer uses (a dead residual branch or a whole block), or why
    the eager model cannot lose them. What each returns is read off one run of the uncut ``model``:
    zeros shaped like its input (a branch that adds nothing) or its input (a block now the identity)."""
    from torch.utils._pytree import tree_flatten

    from strfx.modules import RemovedBranch

    if not removed:
        return {}
    names_of: dict[int, list[str]] = {}  # a tied tensor is gone only when none of its names is used
    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names_of.setdefault(id(t), []).append(n)
    dead: list[str] = []
    for path, mod in model.named_modules():
        tensors = [*mod.parameters(), *mod.buffers()]
        gone = all(all(n in removed for n in names_of.get(id(t), [])) for t in tensors)
        if path and tensors and gone and not any(path.startswith(d + ".") for d in dead):
            dead.append(path)
    seen: dict[str, tuple[Any, Any]] = {}

    def hook(path: str) -> Any:
        def record(_mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
            seen.setdefault(path, (x, out))
        return record

    handles = [model.get_submodule(p).register_forward_hook(hook(p), with_kwargs=True) for p in dead]
    try:
        with torch.no_grad(), eval_mode(model):
            model(*as_inputs(inputs))
    finally:
        for h in handles:
            h.remove()
    stubs: dict[str, nn.Module] = {}
    for path in dead:
        if path not in seen:
            continue  # never called: nothing stands in for it
        x, out = seen[path]
        leaves, spec = tree_flatten(out)
        kinds = []
        for leaf in leaves:
            if leaf is None:
                kinds.append("none")
            elif isinstance(leaf, torch.Tensor) and x is not None and torch.equal(leaf, x):
                kinds.append("input")
            elif isinstance(leaf, torch.Tensor) and x is not None and leaf.shape == x.shape:
                kinds.append("zero")  # zero, or a value only dead code read (verification judges)
            elif isinstance(leaf, torch.Tensor):  # read by dead code only (rotary tables of removed attention)
                kinds.append(("empty", tuple(leaf.shape), leaf.dtype))
            else:
                return f"{path} is removed from the graph but returns {type(leaf).__name__}"
        stubs[path] = RemovedBranch(spec, kinds, type(model.get_submodule(path)).__name__)
    return stubs


def _float64_reference(model: nn.Module) -> nn.Module | str:
    """A float64 copy of the masked model, or why there is none (memory, a dtype baked in)."""
    need = 3 * 8 * sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    free = available_memory()
    if free is not None and need > free:
        return f"float64 check skipped: it needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB is available"
    try:
        return to_float64(copy.deepcopy(model))
    except Exception as err:  # noqa: BLE001
        return f"float64 check skipped: the model cannot be copied to float64 ({first_line(err)})"


@torch.no_grad()
def shrink(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
           round_to: int = 1, uniform: bool = False) -> nn.Module:
    """Remove every provably dead channel of ``model`` and return a plain, smaller model.

    ``model`` is usually what :func:`strfx.sparsify` returned (after training), but any model
    ``torch.export`` captures works: its dead channels (zero γ and β, zero filters, ...) are found
    from the parameters. With ``round_to`` > 1 a few dead channels are kept (as zeros, so the
    function is the same) to leave every channel group a multiple of ``round_to`` wide, and with
    ``uniform`` every layer the same number of heads, neurons, ... (the widest layer's: what a HF
    config can describe; budgets are per layer otherwise), which
    CPU/GPU kernels prefer. The result is the model's own class with smaller parameters where the
    model allows it, else the cut ATen graph; it holds no STR and needs nothing from strfx to run, but
    for a cut hidden size's LayerNorm/RMSNorm (:class:`~strfx.modules.WideLayerNorm`, which keeps the
    original width as divisor).

    It is verified against ``model`` (eval mode) on the example, a fresh random, a large-magnitude
    and a non-negative input with exact zeros, in float32 (≤ 1e-4) and in float64 (≤ 1e-9, the same
    cut applied to a float64 copy, so a wrong cut cannot hide under float32 rounding); a mismatch is a
    :class:`VerificationError` naming the input, the output and the first diverging node.
    ``result.strfx_shrink`` holds the :class:`ShrinkReport` dict.
    """
    if round_to < 1:
        raise StrfxError(f"round_to must be at least 1, got {round_to}")
    inputs = example_inputs_of(model, example_inputs)
    ranks: dict[str, int] = {}
    if _has_lowrank(model):
        if not channel_carriers(model):
            return _factor(model, inputs)
        ranks = _learned_ranks(model)  # structured mode with ranks: channels are cut first, then ranks
    sets = verification_inputs(inputs)
    t0 = time.perf_counter()
    plain, gm, analysis, note = _cut_model(model, inputs, round_to, uniform=uniform)
    factored = _factor_ranks(plain, ranks) if note is None else []
    t1 = time.perf_counter()
    if note is None:
        try:  # the user's own class, if its forward runs with the new sizes and gives the same outputs
            check_equivalent(plain, model, sets, float64=False, what="the eager shrunk model", against="the masked model")
        except VerificationError as err:
            note = f"the eager model fails after the cut ({str(err)[:160]})"
    result: nn.Module = plain if note is None else gm
    notes: list[str] = []
    ref64 = _float64_reference(model)
    cand64 = gm64 = None
    if isinstance(ref64, str):
        notes.append(ref64)
        ref64 = None
    else:
        try:
            plain64, gm64, _, _ = _cut_model(ref64, tuple(_to64(inputs)), dead=analysis.dead)
            if result is plain:
                _factor_ranks(plain64, ranks)
            cand64 = plain64 if result is plain else gm64
        except Exception as err:  # noqa: BLE001 - e.g. a dtype baked into the model
            notes.append(f"float64 check skipped: the model does not run in float64 ({first_line(err)})")
            ref64 = None

    def judge(candidate: nn.Module, candidate64: nn.Module | None) -> Any:
        return check_equivalent(candidate, model, sets, what="the shrunk model", against="the masked model",
                                float64=candidate64 is not None, candidate64=candidate64, reference64=ref64)

    try:
        try:
            eq = judge(result, cand64)
        except NotEquivalentError as err:
            if result is not plain or gm64 is None:
                raise
            # the eager class agrees in float32 only: its forward recomputes something from a cut size that no
            # attribute carries (timm iFormer's F.scaled_dot_product_attention takes its default 1/sqrt(d) from
            # the cut q), which the cut graph writes out; the graph is the exact result
            note = f"the eager model differs after the cut in float64 ({str(err)[:160]})"
            result = gm
            eq = judge(result, gm64)
    except NotEquivalentError as err:
        where = _first_divergence(gm, model, err.inputs, analysis) if result is gm else None
        raise VerificationError(f"{err}; first diverging node: {where}" if where else str(err)) from err
    except VerificationError as err:
        where = _first_divergence(gm, model, inputs, analysis) if result is gm else None
        raise VerificationError(f"the shrunk model fails to run: {where or err}") from err
    t2 = time.perf_counter()
    if ranks:
        notes.append(f"{len(factored) if result is plain else 0} of {len(ranks)} low-rank layers factored at their "
                     f"learned rank after the channel cut" + ("" if result is plain else " (the cut graph keeps them dense)"))
    groups = analysis.groups
    rep = ShrinkReport(
        params_before=count_params(model), params_after=count_params(result),
        channels=sum(g.channels for g in groups), channels_removed=analysis.dead_channels(),
        groups=len(groups), prunable_groups=sum(g.prunable for g in groups),
        blocked_groups=sum(not g.prunable for g in groups), unknown_ops=analysis.unknown_ops,
        weight_sparsity=_weight_sparsity(result), max_error=eq.float32_error, max_error64=eq.float64_error,
        verified_on=eq.inputs, notes=notes + eq.notes,
        analysis_s=t1 - t0, shrink_s=t2 - t1, round_to=round_to, uniform=uniform,
        result="eager" if result is plain else "exported", note=note or "",
        constant_channels_folded=analysis.folded_channels(), constant_channels_kept=analysis.constant_channels_kept(),
    )
    result.strfx_shrink = rep.model_dump()
    return result


def _has_lowrank(model: nn.Module) -> bool:
    from strfx.lowrank import lowrank_parametrizations

    return bool(lowrank_parametrizations(model))


def _learned_ranks(model: nn.Module) -> dict[str, int]:
    """Module name → the learned rank (number of non-zero σ') of each low-rank Linear/Conv."""
    from strfx.lowrank import RNN_TYPES, lowrank_parametrizations, ranks

    names = {id(m): n for n, m in model.named_modules()}
    found = lowrank_parametrizations(model)
    return {names[id(found[w][0])]: r for w, (r, _) in ranks(model).items() if not isinstance(found[w][0], RNN_TYPES)}


def _factor_ranks(plain: nn.Module, ranks: dict[str, int]) -> list[str]:
    """Replace each cut layer named in ``ranks`` (in place) by its factored form where that saves weights."""
    from strfx.lowrank import _replace, factor_dense

    done = []
    for name, rank in ranks.items():
        try:
            mod = plain.get_submodule(name)
        except AttributeError:  # removed with a dead branch
            continue
        new = factor_dense(mod, rank)
        if new is not None:
            _replace(plain, mod, new)
            done.append(name)
    return done


def _factor(model: nn.Module, inputs: tuple[Any, ...]) -> nn.Module:
    """Low-rank mode: each layer becomes two thinner ones at its learned rank (strfx.lowrank)."""
    from strfx.lowrank import factor_lowrank

    t0 = time.perf_counter()
    plain = copy.deepcopy(model)
    if hasattr(plain, "_strfx"):
        del plain._strfx
    small = factor_lowrank(plain, inputs, verify=False)
    eq = check_equivalent(small, model, verification_inputs(inputs), what="the factored model",
                          against="the low-rank model", float64=False)
    layers = small.strfx_lowrank.layers
    rep = ShrinkReport(
        params_before=count_params(model), params_after=count_params(small), channels=0, channels_removed=0,
        groups=0, prunable_groups=0, blocked_groups=0, unknown_ops={}, weight_sparsity=_weight_sparsity(small),
        max_error=eq.float32_error, verified_on=eq.inputs,
        notes=eq.notes + [f"{sum(r.factored for r in layers)} of {len(layers)} low-rank layers factored"],
        analysis_s=0.0, shrink_s=time.perf_counter() - t0, result="eager",
    )
    small.strfx_shrink = rep.model_dump()
    return small


def _clone(x: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in x)


def _run_all(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[dict[str, Any], str | None]:
    """Every node's output by name; the name of the node that raised, if one did."""
    env: dict[str, Any] = {}
    current: list[str | None] = [None]

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            current[0] = n.name
            out = super().run_node(n)
            env[n.name] = out
            return out

    try:
        flat = [t for t in _clone(inputs)]
        Recorder(gm).run(*flat)
        return env, None
    except Exception as err:  # noqa: BLE001
        return env, f"{current[0]} ({first_line(err)})"


def _cut(value: torch.Tensor, info: TInfo, analysis: ChannelAnalysis) -> torch.Tensor:
    for d, ids in info.labels.items():
        keep = analysis.keep(ids)
        if not keep.all():
            value = value.index_select(d, torch.as_tensor(np.nonzero(keep)[0], device=value.device))
    return value


def _first_divergence(shrunk: fx.GraphModule, reference: nn.Module, inputs: Sequence[Any],
                      analysis: ChannelAnalysis) -> str | None:
    """Replay the masked and the cut graph; the first node (matched by name) whose output, cut to the
    kept channels, differs."""
    try:
        masked = capture(fold_str(reference), inputs)
    except StrfxError:
        return None
    ref, _ = _run_all(masked, inputs)
    got, failed = _run_all(shrunk, inputs)
    for node in masked.graph.nodes:
        if failed is not None and failed.startswith(node.name + " "):
            return failed
        info = analysis.values.get(node.name)
        a, b = ref.get(node.name), got.get(node.name)
        if not isinstance(info, TInfo) or not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        try:
            expected = _cut(a, info, analysis)
        except Exception:  # noqa: BLE001
            continue
        if max_rel_error(b, expected) > TOLERANCE:
            return f"{node.name} ({getattr(node.target, '__name__', node.target)})"
    return failed


__all__ = ["ShrinkReport", "analyze", "fold_str", "random_like", "shrink"]
