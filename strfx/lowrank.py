"""Low-rank STR: learn each layer's rank by soft-thresholding its singular values, then factor it.

A conv/linear weight ``W`` (``out × cols``, a conv's ``cols = in/groups · k·k``) is reparameterised as

    W = U · diag(σ') · Vᵀ,        σ' = relu(σ − t),        t = scale · g(s),   g = sigmoid,

with ``U`` (out × r₀), raw singular values ``σ`` (r₀) and ``V`` (cols × r₀), ``r₀ = min(out, cols)``,
all trainable, and one learnable threshold ``s`` per layer (shape ``(1,)``: FSDP2 refuses 0-d
parameters). A singular value below the threshold is exactly zero, so weight decay on ``s`` learns
how many ranks each layer keeps — STR on the importance vector "singular values".

Why ``relu(σ − t)`` and not STR's ``sign(σ)·relu(|σ| − t)``: a negative singular value is only a
sign flip of a column of ``U``; ``relu`` keeps ``σ' ≥ 0`` so the ``σ'`` are the layer's singular
values (when U, V are orthonormal) and a raw ``σ`` that SGD pushes below ``t`` is simply dead,
with zero gradient, exactly as a pruned weight is in unstructured STR.

Exact insertion: ``right_inverse`` takes the SVD of ``W`` (in float64) and stores ``σ + t``, so
thresholding gives back ``σ`` and the layer computes what it computed before whatever ``s_init`` is.
It returns the tuple ``(U, σ_raw, V)``: ``torch.nn.utils.parametrize`` keeps them as
``parametrizations.weight.original0/1/2`` (and ``s`` as ``parametrizations.weight.0.s``).

Orthogonality of ``U``, ``V`` (``LowRankConfig.orthogonality``, see docs/lowrank.md for the measurement):

* ``"none"`` — U and V are free; the factorisation (and so factoring) is exact either way, but the σ'
  are then not the singular values and thresholding them ranks directions badly (worst in the pilot);
* ``"qr"`` (default) — the forward uses the Q factor (signs fixed so that R has a positive diagonal) of the
  stored U and V, so they are exactly orthonormal in the forward — what
  ``torch.nn.utils.parametrizations.orthogonal`` would do, but inside this one parametrization
  (a parametrization cannot be nested on another one's ``originalN``);
* ``"penalty"`` — ``orthogonality_penalty(model)`` returns ``Σ w·(‖UᵀU − I‖² + ‖VᵀV − I‖²)``,
  which the training loop adds to its loss.

``factor_lowrank`` then replaces each layer of rank ``r`` by two: ``Linear(in, r, bias=False)`` →
``Linear(r, out)``; a conv → the same conv (stride, padding, dilation, groups) to ``r·groups``
channels → a grouped 1×1 conv; an LSTM/GRU's layer-0 input projection → a ``Linear(in, r)`` in
front of an RNN with ``input_size = r`` — only where that has fewer parameters, else the weight is
folded back into one dense tensor.
"""

from __future__ import annotations

import copy
import fnmatch
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from pydantic import ValidationError

from strfx.config import LowRankConfig, Orthogonality, _format_validation_error
from strfx.errors import ConfigError, VerificationError
from strfx.modules import THRESHOLD_FNS
from strfx.verify import max_rel_error

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
RNN_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.RNN)
TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------------------
# the parametrization


def _orthonormalize(x: torch.Tensor) -> torch.Tensor:
    """Q of ``x = QR`` with R's diagonal made non-negative, so an orthonormal ``x`` maps to itself."""
    q, r = torch.linalg.qr(x)
    d = torch.sign(torch.diagonal(r))
    return q * torch.where(d == 0, torch.ones_like(d), d)


class STRLowRank(nn.Module):
    """Parametrization ``(U, σ_raw, V) -> U·diag(relu(σ_raw − t))·Vᵀ`` reshaped to the weight's shape."""

    def __init__(self, weight: torch.Tensor, s_init: float = -15.0, fn: str = "sigmoid",
                 orthogonality: Orthogonality = "qr", relative_threshold: bool = False,
                 penalty_weight: float = 1e-3) -> None:
        super().__init__()
        if fn not in THRESHOLD_FNS:
            raise ValueError(f"unknown threshold function {fn!r}; known: {sorted(THRESHOLD_FNS)}")
        if weight.dim() < 2:
            raise ValueError(f"low-rank STR needs a matrix or conv weight, got shape {tuple(weight.shape)}")
        self.fn = fn
        self.orthogonality = orthogonality
        self.penalty_weight = penalty_weight
        self.shape = tuple(weight.shape)
        self.s = nn.Parameter(torch.full((1,), float(s_init), dtype=weight.dtype, device=weight.device))
        scale = 1.0
        if relative_threshold:
            scale = float(torch.linalg.matrix_norm(weight.detach().double().reshape(self.shape[0], -1), 2))
        self.register_buffer("scale", torch.full((1,), scale, dtype=weight.dtype, device=weight.device))

    @property
    def full_rank(self) -> int:
        return min(self.shape[0], _cols(self.shape))

    def threshold(self, s: torch.Tensor | None = None) -> torch.Tensor:
        """``scale · g(s)``: singular values below this are zero."""
        return self.scale * THRESHOLD_FNS[self.fn](self.s if s is None else s)

    def factors(self, u: torch.Tensor, sigma_raw: torch.Tensor, v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, σ', V)`` as the forward uses them (orthonormalized under ``qr``)."""
        if self.orthogonality == "qr":
            u, v = _orthonormalize(u), _orthonormalize(v)
        return u, F.relu(sigma_raw - self.threshold()), v

    def forward(self, u: torch.Tensor, sigma_raw: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        u, sigma, v = self.factors(u, sigma_raw, v)
        return ((u * sigma) @ v.T).reshape(self.shape)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SVD of ``weight`` with ``σ + t`` stored: used at registration and on assignment, keeps the value."""
        w = weight.detach().double().reshape(self.shape[0], -1)
        u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
        sigma_raw = sigma + self.threshold().detach().double()
        dt = weight.dtype
        return u.to(dt).contiguous(), sigma_raw.to(dt), vh.T.to(dt).contiguous()

    def extra_repr(self) -> str:
        return f"shape={self.shape}, fn={self.fn}, orthogonality={self.orthogonality}"


def _cols(shape: Sequence[int]) -> int:
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return n


# ---------------------------------------------------------------------------------------------------------
# finding and inserting


def lowrank_parametrizations(model: nn.Module) -> dict[str, tuple[nn.Module, str, STRLowRank]]:
    """Qualified weight name (``"fc1.weight"``) → (owning module, tensor name, its STRLowRank)."""
    found: dict[str, tuple[nn.Module, str, STRLowRank]] = {}
    for mod_name, mod in model.named_modules():
        plist = getattr(mod, "parametrizations", None)
        if plist is None:
            continue
        for tensor_name, chain in plist.items():
            if len(chain) and isinstance(chain[0], STRLowRank):
                found[f"{mod_name}.{tensor_name}" if mod_name else tensor_name] = (mod, tensor_name, chain[0])
    return found


def lowrank_threshold_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every low-rank threshold ``s`` (for the optimizer's threshold group: weight decay on it raises it)."""
    return [p.s for _, _, p in lowrank_parametrizations(model).values()]


def lowrank_sigma_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every raw singular-value vector ``σ_raw`` (``originalN`` 1): weight decay on them shrinks the σ toward
    the threshold, which in docs/lowrank.md is what actually lowers the ranks."""
    return [mod.parametrizations[t].original1 for mod, t, _ in lowrank_parametrizations(model).values()]


def current_factors(mod: nn.Module, tensor_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, σ', V)`` of a parametrized weight as its forward uses them (detached)."""
    chain = mod.parametrizations[tensor_name]
    p: STRLowRank = chain[0]
    with torch.no_grad():
        return p.factors(chain.original0, chain.original1, chain.original2)


def ranks(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Qualified weight name → (current rank = #σ' > 0, full rank)."""
    out = {}
    for name, (mod, tname, p) in lowrank_parametrizations(model).items():
        _, sigma, _ = current_factors(mod, tname)
        out[name] = (int((sigma > 0).sum()), p.full_rank)
    return out


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """``Σ w·(‖UᵀU − I‖² + ‖VᵀV − I‖²)`` over the layers with ``orthogonality="penalty"`` (add it to the loss)."""
    total: torch.Tensor | None = None
    for mod, tname, p in lowrank_parametrizations(model).values():
        if p.orthogonality != "penalty" or p.penalty_weight == 0:
            continue
        chain = mod.parametrizations[tname]
        for m in (chain.original0, chain.original2):
            eye = torch.eye(m.shape[1], dtype=m.dtype, device=m.device)
            term = p.penalty_weight * (m.T @ m - eye).pow(2).sum()
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


def _flat_weights_of(module: nn.Module) -> list[torch.Tensor | None]:
    return [getattr(module, wn) if hasattr(module, wn) else None for wn in module._flat_weights_names]


def _refresh_flat_weights(module: nn.Module, args: Any) -> None:
    """Pre-hook: nn.LSTM/GRU read ``_flat_weights``, filled at construction; re-read the parametrized weights.

    (Not ``_init_flat_weights``: its cuDNN ``flatten_parameters`` would rewrite computed tensors in place.
    On a GPU the RNN warns that its weights are not one contiguous chunk: a speed note, not an error.)
    """
    module._flat_weights = _flat_weights_of(module)


def _detach_flat_weights(module: nn.Module, args: Any, output: Any) -> None:
    """Post-hook: keep no autograd-graph tensors on the module between calls (deepcopy refuses them)."""
    module._flat_weights = [w.detach() if isinstance(w, torch.Tensor) else w for w in module._flat_weights]


def _excluded(names: Sequence[str], patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def break_even_rank(out: int, cols: int, groups: int = 1) -> int:
    """Largest rank r whose factored form has fewer weights than the dense one (0: none).

    Dense: ``out·cols``; factored: ``r·(groups·cols + out)`` (the first conv repeats V per group).
    """
    dense = out * cols
    per_rank = groups * cols + out
    return max(0, (dense - 1) // per_rank)


def _rnn_weight_names(rnn: nn.Module) -> list[str]:
    dirs = ["", "_reverse"] if rnn.bidirectional else [""]
    return [f"weight_ih_l{k}{d}" for k in range(rnn.num_layers) for d in dirs]


def selected_weights(model: nn.Module, config: LowRankConfig | None = None) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, tensor name) of every weight ``apply_lowrank`` would reparameterise."""
    cfg = config or LowRankConfig()
    picked: list[tuple[str, nn.Module, str]] = []
    # nn.MultiheadAttention reads out_proj.weight/.bias itself (F.multi_head_attention_forward): a factored
    # out_proj (two Linears) would break its forward, so it is never selected
    mha_out = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for name, mod in model.named_modules():
        if id(mod) in mha_out:
            continue
        if isinstance(mod, nn.Linear) or isinstance(mod, CONV_TYPES):
            tnames, groups = ["weight"], getattr(mod, "groups", 1)
        elif cfg.rnn and isinstance(mod, RNN_TYPES):
            tnames, groups = _rnn_weight_names(mod), 1
        else:
            continue
        for tname in tnames:
            if parametrize.is_parametrized(mod, tname):
                continue  # already carries STR or low-rank STR
            w = getattr(mod, tname)
            out, cols = w.shape[0], _cols(w.shape)
            qual = f"{name}.{tname}" if name else tname
            if _excluded([name, qual], cfg.exclude):
                continue
            r_star = break_even_rank(out, cols, groups)
            if r_star < 1 or r_star < cfg.min_rank_gain * min(out, cols):
                continue
            picked.append((name, mod, tname))
    return picked


def coerce_lowrank_config(config: LowRankConfig | dict[str, Any] | None) -> LowRankConfig:
    """A LowRankConfig from a config, a plain dict or None; a bad dict is a one-line ConfigError."""
    if isinstance(config, LowRankConfig):
        return config
    try:
        return LowRankConfig.model_validate(config or {})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, "lowrank")) from None


def apply_lowrank(model: nn.Module, config: LowRankConfig | dict[str, Any] | None = None) -> nn.Module:
    """Reparameterise ``model``'s selected weights in place (deep-copy first) and return it.

    The model computes the same function afterwards (exact up to float rounding of one SVD).
    """
    cfg = coerce_lowrank_config(config)
    hooked: set[int] = set()
    for _, mod, tname in selected_weights(model, cfg):
        w = getattr(mod, tname)
        p = STRLowRank(w, cfg.s_init, cfg.threshold_fn, cfg.orthogonality, cfg.relative_threshold, cfg.penalty_weight)
        parametrize.register_parametrization(mod, tname, p)
        if isinstance(mod, RNN_TYPES) and id(mod) not in hooked:
            mod.register_forward_pre_hook(_refresh_flat_weights)
            mod.register_forward_hook(_detach_flat_weights)
            with torch.no_grad():
                mod._flat_weights = _flat_weights_of(mod)
            hooked.add(id(mod))
    return model


def sparsify_lowrank(model: nn.Module, config: LowRankConfig | dict[str, Any] | None = None, *,
                     example_inputs: Sequence[Any] | torch.Tensor | None = None, verify: bool = True) -> nn.Module:
    """A deep copy of ``model`` with low-rank STR; checked against ``model`` on ``example_inputs`` if given."""
    cfg = coerce_lowrank_config(config)
    if not selected_weights(model, cfg):
        raise ConfigError(f"low-rank STR found no layer to reparameterise in {type(model).__name__}: it needs "
                          f"nn.Linear/Conv1d-3d/LSTM/GRU layers where a lower rank saves weights, not all excluded "
                          f"(exclude={cfg.exclude}, min_rank_gain={cfg.min_rank_gain})")
    new = apply_lowrank(copy.deepcopy(model), cfg)
    if verify and example_inputs is not None:
        _check(new, model, example_inputs, "low-rank STR insertion")
    return new


@torch.no_grad()
def _check(new: nn.Module, reference: nn.Module, inputs: Sequence[Any] | torch.Tensor, what: str) -> float:
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    modes = (new.training, reference.training)
    new.eval(), reference.eval()
    try:
        err = max_rel_error(new(*inputs), reference(*inputs))
    finally:
        new.train(modes[0]), reference.train(modes[1])
    if err > TOLERANCE:
        raise VerificationError(f"{what} changed the model's outputs: max relative error {err:.3g} > {TOLERANCE:g}")
    return err


# ---------------------------------------------------------------------------------------------------------
# report


class LowRankLayer(BaseModel):
    """One reparameterised weight: its rank and what factoring it costs (weights and FLOPs of the weight only)."""

    name: str
    kind: str  # "linear", "conv2d", "lstm", ...
    shape: tuple[int, int]  # (out, cols) of the matrix that is factored
    groups: int = 1
    full_rank: int
    rank: int  # number of non-zero σ'
    break_even_rank: int  # below this factoring saves weights
    params_dense: int
    params_after: int  # factored if that is smaller, else dense
    flops_dense: int | None = None  # on the example inputs (2 per multiply-add); None without them
    flops_after: int | None = None
    factored: bool  # factoring pays at the current rank (factor_lowrank: and was done)
    note: str = ""


class LowRankReport(BaseModel):
    """Per layer rank before → after, with totals over the reparameterised weights."""

    layers: list[LowRankLayer]
    params_dense: int
    params_after: int
    flops_dense: int | None
    flops_after: int | None


def _kind(mod: nn.Module) -> str:
    return type(mod).__name__.lower()


@torch.no_grad()
def _positions(model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor | None,
               modules: Sequence[nn.Module]) -> dict[int, int]:
    """id(module) → how many times its weight is applied (output pixels × batch, tokens, time steps × batch)."""
    if example_inputs is None:
        return {}
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    counts: dict[int, int] = {}

    def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(mod, RNN_TYPES):
            x = args[0].data if isinstance(args[0], PackedSequence) else args[0]
            n = x.numel() // mod.input_size
        else:
            ch = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            n = output.numel() // ch
        counts[id(mod)] = counts.get(id(mod), 0) + n

    handles = [m.register_forward_hook(hook) for m in {id(m): m for m in modules}.values()]
    was_training = model.training
    model.eval()
    try:
        model(*inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counts


def _rnn_layer0_plan(mod: nn.Module, names: dict[str, tuple[nn.Module, str, STRLowRank]], prefix: str
                     ) -> tuple[int, int, int] | None:
    """(R = Σ ranks of layer 0 over directions, dense weights, factored weights) for an RNN's layer-0 projection."""
    tnames = [t for t in _rnn_weight_names(mod) if t.startswith("weight_ih_l0")]
    keys = [f"{prefix}.{t}" if prefix else t for t in tnames]
    if not all(k in names for k in keys):
        return None
    r_total = 0
    for t in tnames:
        _, sigma, _ = current_factors(mod, t)
        r_total += int((sigma > 0).sum())
    gate = getattr(mod, tnames[0]).shape[0]
    dense = len(tnames) * gate * mod.input_size
    return r_total, dense, r_total * mod.input_size + len(tnames) * gate * r_total


def lowrank_report(model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor | None = None) -> LowRankReport:
    """Rank per reparameterised weight now, and the weights/FLOPs factoring at that rank would give.

    FLOPs (2 per multiply-add, the weight's matmul/conv only) need ``example_inputs``.
    """
    found = lowrank_parametrizations(model)
    pos = _positions(model, example_inputs, [m for m, _, _ in found.values()])
    rows: list[LowRankLayer] = []
    for name, (mod, tname, p) in found.items():
        _, sigma, _ = current_factors(mod, tname)
        r = int((sigma > 0).sum())
        out, cols = p.shape[0], _cols(p.shape)
        groups = getattr(mod, "groups", 1)
        dense = out * cols
        n = pos.get(id(mod))
        note = ""
        if isinstance(mod, RNN_TYPES):
            prefix = name.rsplit(".", 1)[0] if "." in name else ""
            plan = _rnn_layer0_plan(mod, found, prefix) if tname.startswith("weight_ih_l0") else None
            if plan is None:
                after, pays = dense, False
                note = "inner RNN layer: folded back to dense" if not tname.startswith("weight_ih_l0") else \
                    "not every direction is low-rank: folded back to dense"
            else:
                r_total, dense_all, fact_all = plan
                pays = fact_all < dense_all
                # this direction's share of the shared projection: its rank's columns, and its own R wide matrix
                after = (r * mod.input_size + out * r_total) if pays else dense
                if pays and r_total != r:
                    note = f"shares a {r_total}-wide input projection with the other direction"
            flops_d = None if n is None else 2 * n * dense
            flops_a = None if n is None else 2 * n * after
        else:
            fact = r * (groups * cols + out)
            pays = fact < dense
            after = fact if pays else dense
            flops_d = None if n is None else 2 * n * dense
            flops_a = None if n is None else 2 * n * after
        rows.append(LowRankLayer(
            name=name, kind=_kind(mod), shape=(out, cols), groups=groups, full_rank=p.full_rank, rank=r,
            break_even_rank=break_even_rank(out, cols, groups), params_dense=dense, params_after=after,
            flops_dense=flops_d, flops_after=flops_a, factored=pays, note=note))
    flops = [r.flops_dense for r in rows]
    have_flops = bool(rows) and all(f is not None for f in flops)
    return LowRankReport(
        layers=rows,
        params_dense=sum(r.params_dense for r in rows),
        params_after=sum(r.params_after for r in rows),
        flops_dense=sum(r.flops_dense for r in rows) if have_flops else None,  # type: ignore[misc]
        flops_after=sum(r.flops_after for r in rows) if have_flops else None,  # type: ignore[misc]
    )


# ---------------------------------------------------------------------------------------------------------
# factoring


class FactoredRNN(nn.Module):
    """An LSTM/GRU/RNN whose layer-0 input projection is low rank: ``rnn(proj(x), hx)``.

    Same call signature and outputs as the RNN it replaces (``(output, h_n)`` or ``(output, (h_n, c_n))``,
    ``batch_first``, unbatched and PackedSequence inputs).
    """

    def __init__(self, proj: nn.Linear, rnn: nn.Module, input_size: int) -> None:
        super().__init__()
        self.proj = proj
        self.rnn = rnn
        self.input_size = input_size
        self.hidden_size = rnn.hidden_size
        self.num_layers = rnn.num_layers
        self.batch_first = rnn.batch_first
        self.bidirectional = rnn.bidirectional

    def forward(self, input: Any, hx: Any = None) -> Any:
        if isinstance(input, PackedSequence):
            z: Any = PackedSequence(self.proj(input.data), input.batch_sizes, input.sorted_indices,
                                    input.unsorted_indices)
        else:
            z = self.proj(input)
        return self.rnn(z, hx)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child (a module used in two places is replaced in both)."""
    for parent in model.modules():
        for cname, child in list(parent._modules.items()):
            if child is old:
                parent._modules[cname] = new


def _unshare_class(mod: nn.Module) -> None:
    """Give a parametrized module its own copy of its injected class.

    ``parametrize`` injects one ``Parametrized<Cls>`` class per module and ``copy.deepcopy`` shares it
    with the copy; ``remove_parametrizations`` deletes the property from that class, which would
    silently break every deep copy (e.g. the reference a factoring is verified against).
    """
    cls = type(mod)
    if parametrize.is_parametrized(mod):
        body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        mod.__class__ = type(cls.__name__, cls.__bases__, body)


def _fold(mod: nn.Module, tname: str) -> None:
    _unshare_class(mod)
    parametrize.remove_parametrizations(mod, tname, leave_parametrized=True)
    keep_parameter(mod, tname)


def keep_parameter(mod: nn.Module, tname: str) -> None:
    """After folding a multi-tensor parametrization: the weight as a Parameter again.

    ``remove_parametrizations`` registers the computed tensor as a *buffer* when it does not require grad
    (always, under ``torch.no_grad()``), so the folded layer would silently stop training and drop out of
    parameter counts."""
    t = getattr(mod, tname)
    if not isinstance(t, nn.Parameter):
        delattr(mod, tname)
        mod.register_parameter(tname, nn.Parameter(t.detach().clone()))


def _factor_linear_or_conv(mod: nn.Module, u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> nn.Module:
    keep = sigma > 0
    u, sigma, v = u[:, keep], sigma[keep], v[:, keep]
    r = int(sigma.numel())
    dd = {"dtype": u.dtype, "device": u.device}
    bias = mod.bias
    if isinstance(mod, nn.Linear):
        first = nn.Linear(mod.in_features, r, bias=False, **dd)
        second = nn.Linear(r, mod.out_features, bias=bias is not None, **dd)
        first.weight.data.copy_(v.T)
        second.weight.data.copy_(u * sigma)
    else:
        g, k = mod.groups, mod.kernel_size
        cls = type(mod)
        first = cls(mod.in_channels, r * g, k, stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
                    groups=g, bias=False, padding_mode=mod.padding_mode, **dd)
        second = cls(r * g, mod.out_channels, 1, groups=g, bias=bias is not None, **dd)
        filt = v.T.reshape(r, mod.in_channels // g, *k)  # the same r filters applied to every group's inputs
        first.weight.data.copy_(filt.repeat(g, *([1] * (filt.dim() - 1))))
        second.weight.data.copy_((u * sigma).reshape(mod.out_channels, r, *([1] * len(k))))
    if bias is not None:
        second.bias.data.copy_(bias.detach())
    seq = nn.Sequential(first, second)
    seq.train(mod.training)
    return seq


@torch.no_grad()
def factor_dense(mod: nn.Module, rank: int) -> nn.Module | None:
    """A plain Linear/Conv whose weight has rank ≤ ``rank`` as two thinner layers (exact up to rounding), where
    that has fewer weights; else None. Used after a channel cut (structured mode with ``ranks``): the cut
    rows/columns of ``diag(u')·U·diag(σ')·Vᵀ`` keep its rank, so the truncated SVD reproduces them."""
    if not isinstance(mod, (nn.Linear, *CONV_TYPES)) or rank < 1:
        return None
    w = mod.weight.detach()
    mat = w.reshape(w.shape[0], -1)
    out, cols = mat.shape
    groups = getattr(mod, "groups", 1)
    r = min(rank, out, cols)
    if r * (groups * cols + out) >= out * cols:
        return None
    u, sigma, vh = torch.linalg.svd(mat.double(), full_matrices=False)
    dt = w.dtype
    return _factor_linear_or_conv(mod, u[:, :r].to(dt), sigma[:r].to(dt), vh[:r].T.to(dt).contiguous())


def _factor_rnn(mod: nn.Module, name: str) -> nn.Module:
    """Layer-0 input projection → Linear(in, R) + an RNN with input_size R (directions side by side, zero blocks)."""
    tnames = [t for t in _rnn_weight_names(mod) if t.startswith("weight_ih_l0")]
    parts = []
    for t in tnames:
        u, sigma, v = current_factors(mod, t)
        keep = sigma > 0
        parts.append((u[:, keep] * sigma[keep], v[:, keep]))
    r_total = sum(us.shape[1] for us, _ in parts)
    # fold everything (layer 0 too) to get plain tensors, then build the narrower RNN
    for t in list(mod.parametrizations.keys()):
        _fold(mod, t)
    dd = {"dtype": parts[0][0].dtype, "device": parts[0][0].device}
    kwargs: dict[str, Any] = {"num_layers": mod.num_layers, "bias": mod.bias, "batch_first": mod.batch_first,
                              "dropout": mod.dropout, "bidirectional": mod.bidirectional}
    if isinstance(mod, nn.LSTM):
        kwargs["proj_size"] = mod.proj_size
    if isinstance(mod, nn.RNN):
        kwargs["nonlinearity"] = mod.nonlinearity
    # every rank dead: the input adds nothing, but an RNN needs input_size ≥ 1 — one zero column keeps it exact
    width = max(r_total, 1)
    new_rnn = type(mod)(width, mod.hidden_size, **kwargs, **dd)
    state = {k: v for k, v in mod.state_dict().items() if k not in tnames}
    col = 0
    proj = nn.Linear(mod.input_size, width, bias=False, **dd)
    proj.weight.data.zero_()
    for t, (us, v) in zip(tnames, parts):
        r = us.shape[1]
        w = torch.zeros(us.shape[0], width, **dd)
        w[:, col:col + r] = us
        state[t] = w
        proj.weight.data[col:col + r] = v.T
        col += r
    new_rnn.load_state_dict(state)
    out = FactoredRNN(proj, new_rnn, mod.input_size)
    out.train(mod.training)
    return out


def factor_lowrank(model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor | None = None, *,
                   verify: bool = True) -> nn.Module:
    """Replace every low-rank-parametrized layer of ``model`` (in place) by its factored form, or fold it.

    Returns the model (a new module only when ``model`` itself is one low-rank layer).

    A layer is factored where that has fewer weights than the dense layer at its current rank, else its
    weight is folded back into one plain tensor. Returns ``model`` with the :class:`LowRankReport` of the
    layers as they were (``factored`` = what was done) on ``model.strfx_lowrank``. With ``example_inputs``
    (and ``verify``), the result is checked against the parametrized model (max relative error ≤ 1e-4).
    """
    rep = lowrank_report(model, example_inputs)
    reference = copy.deepcopy(model) if verify and example_inputs is not None else None
    by_name = {r.name: r for r in rep.layers}
    found = lowrank_parametrizations(model)
    done_rnns: set[int] = set()
    for name, (mod, tname, _) in found.items():
        row = by_name[name]
        if isinstance(mod, RNN_TYPES):
            if id(mod) in done_rnns:
                continue
            done_rnns.add(id(mod))
            prefix = name.rsplit(".", 1)[0] if "." in name else ""
            l0 = [r for r in rep.layers if r.name.startswith(f"{prefix}.weight_ih_l0" if prefix else "weight_ih_l0")]
            if l0 and all(r.factored for r in l0):
                new = _factor_rnn(mod, prefix)
                _replace(model, mod, new)
                model = new if mod is model else model
            else:
                for t in list(mod.parametrizations.keys()):
                    if isinstance(mod.parametrizations[t][0], STRLowRank):
                        _fold(mod, t)
                with torch.no_grad():
                    mod._flat_weights = _flat_weights_of(mod)
                for r in rep.layers:
                    if r.name.startswith(f"{prefix}." if prefix else "weight_ih"):
                        r.factored = False
            continue
        if row.factored:
            u, sigma, v = current_factors(mod, tname)
            new = _factor_linear_or_conv(mod, u, sigma, v)
            _replace(model, mod, new)
            model = new if mod is model else model
        else:
            _fold(mod, tname)
    model.strfx_lowrank = rep  # type: ignore[assignment]
    if reference is not None:
        _check(model, reference, example_inputs, "low-rank factoring")  # type: ignore[arg-type]
    return model


def plot_ranks(rep: LowRankReport, path: str | Path, title: str | None = None) -> Path:
    """Learned rank per layer (bars, % of full rank; the break-even rank as a tick), written atomically as PNG."""

    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt


    layers = rep.layers
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2), 4.2))
    xs = list(range(len(layers)))
    ax.bar(xs, [100 * lr.rank / lr.full_rank for lr in layers], color="tab:blue", label="learned rank (% of full)")
    ax.plot(xs, [100 * lr.break_even_rank / lr.full_rank for lr in layers], "_", color="tab:red", markersize=18,
            mew=2, label="break-even rank (factoring pays below)")
    for x, lr in zip(xs, layers):
        ax.annotate(f"{lr.rank}/{lr.full_rank}", (x, 100 * lr.rank / lr.full_rank), ha="center", va="bottom",
                    fontsize=7)
    ax.set_ylim(0, 110)
    ax.set_ylabel("rank (% of full rank)")
    ax.set_xticks(xs)
    ax.set_xticklabels([lr.name for lr in layers], rotation=60, ha="right", fontsize=8)
    saved = 1 - rep.params_after / rep.params_dense if rep.params_dense else 0.0
    ax.set_title(title or f"learned ranks ({saved:.1%} of the low-rank layers' weights removed by factoring)")
    ax.legend(loc="upper left", fontsize=8)
    from strfx.plot import save_figure

    return save_figure(fig, path)
