"""STR math and the modules that carry it.

STR (Kusupati et al., 2020) reparameterises a tensor ``W`` as

    W' = sign(W) * relu(|W| - g(s)),      g = sigmoid,

with a learnable threshold ``s``. Every element whose magnitude is below ``g(s)`` is exactly zero,
and SGD on ``s`` (pushed up by weight decay) learns how sparse each layer should be.

How each mode carries it, and why:

* **Unstructured** — :class:`STRWeight`, a ``torch.nn.utils.parametrize`` parametrization of a
  weight. A parametrization reaches every weight the same way, whether it is used by a
  ``call_module`` node, by a leaf module's internals (``nn.MultiheadAttention.in_proj_weight``)
  or by a functional ``F.linear`` through ``get_attr``; it needs no per-layer-kind forward, and
  ``remove_parametrizations(leave_parametrized=True)`` folds it into a plain weight.
* **Structured** — STR-BN (the STR-BN report): a BatchNorm's γ gets an :class:`STRWeight`
  (``role="norm"``) and its β an :class:`STRShift`, so the layer computes ``γ'·(x̂ + β̂)`` and a
  zero γ' makes the channel exactly zero. Channel groups with no BatchNorm get one
  :class:`STRUnit` importance vector ``u' = sign(u)·relu(|u| - g(s))``, applied by
  :class:`UnitScale` parametrizations to every parameter that writes the group's channels (rows of
  conv/linear weights and biases, γ/β of other norms). Everything is a parametrization of an
  existing parameter of the user's own modules: the model keeps its class and forward, so
  ``.train()``/``.eval()``, dropout, DDP and the model's own methods behave as before.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

THRESHOLD_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
}


def _shrink(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x - clamp(x, -t, t)``, bit for bit ``sign(x)·relu(|x| - t)``.

    A one-element threshold on CPU uses ``F.softshrink`` (one fused kernel instead of two). Its
    Python-float threshold would cost a device sync per layer on a GPU and a graph break under
    ``torch.compile``, so neither uses it.
    """
    if (t.numel() == 1 and x.device.type == "cpu" and type(t) is torch.Tensor  # not fake, not traced
            and not torch.compiler.is_compiling()):
        return F.softshrink(x, float(t))
    return x - torch.clamp(x, -t, t)


class _SoftThreshold(torch.autograd.Function):
    """STR's soft threshold with a hand-written backward.

    Autograd through the textbook formula keeps four weight-sized temporaries and runs six
    weight-sized kernels in backward. Here backward reads only the output ``y`` (which the conv
    keeps anyway): with ``σ = sign(y)``, ``∂x = g·[y ≠ 0]`` (the gradient passes where the weight
    survived) and ``∂t = -Σ g·σ``, reduced to ``t``'s shape.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = _shrink(x, t)
        ctx.save_for_backward(y)
        ctx.t_shape = t.shape
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (y,) = ctx.saved_tensors
        gx = gt = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.softshrink_backward(g, y, 0.0)  # g where y != 0, one kernel
        if ctx.needs_input_grad[1]:
            gt = -(g * torch.sign(y)).sum_to_size(ctx.t_shape)
        return gx, gt


def soft_threshold(x: torch.Tensor, s: torch.Tensor, fn: str = "sigmoid") -> torch.Tensor:
    """``sign(x) * relu(|x| - g(s))``: the STR reparameterisation (zeros where ``|x| <= g(s)``)."""
    t = THRESHOLD_FNS[fn](s)
    if torch.is_grad_enabled() and (x.requires_grad or t.requires_grad):
        return _SoftThreshold.apply(x, t)
    return _shrink(x, t)


def soft_threshold_inverse(y: torch.Tensor, s: torch.Tensor, fn: str = "sigmoid") -> torch.Tensor:
    """A raw tensor whose soft threshold is ``y``: ``sign(y) * (|y| + g(s))``.

    Inserting STR stores this instead of ``y`` so the model computes exactly what it computed
    before, whatever ``s_init`` is (the papers train from scratch and just accept the shift).
    Exact zeros stay exact zeros.
    """
    return torch.sign(y) * (y.abs() + THRESHOLD_FNS[fn](s.detach()))


class _Thresholded(nn.Module):
    """Shared parts of every STR carrier: the threshold ``s`` and ``g``."""

    s: nn.Parameter
    fn: str

    def _init_threshold(self, shape: tuple[int, ...], s_init: float, fn: str) -> None:
        if fn not in THRESHOLD_FNS:
            raise ValueError(f"unknown threshold function {fn!r}; known: {sorted(THRESHOLD_FNS)}")
        self.fn = fn
        self.s = nn.Parameter(torch.full(shape, float(s_init)))

    def threshold(self) -> torch.Tensor:
        """``g(s)``: magnitudes below this are zero."""
        return THRESHOLD_FNS[self.fn](self.s.detach())


class STRWeight(_Thresholded):
    """Parametrization ``W -> sign(W) * relu(|W| - g(s))`` for ``parametrize.register_parametrization``.

    ``s`` is one scalar per layer, or one per output channel (``per_channel=True``; ``channel_dim``
    is 0 for conv/linear weights and 1 for transposed convs). ``s`` is 1-D even when scalar:
    FSDP2 refuses 0-d parameters.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        s_init: float,
        fn: str = "sigmoid",
        per_channel: bool = False,
        channel_dim: int = 0,
        role: str = "weight",
    ) -> None:
        super().__init__()
        self.role = role  # "weight": unstructured STR; "norm": STR-BN γ
        shape: tuple[int, ...] = (1,)
        if per_channel:
            dims = [1] * weight.dim()
            dims[channel_dim] = weight.shape[channel_dim]
            shape = tuple(dims)
        self._init_threshold(shape, s_init, fn)
        self.channel_dim = channel_dim

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return soft_threshold(weight, self.s, self.fn)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Used by parametrize at registration and on assignment: keeps the weight's value."""
        return soft_threshold_inverse(weight, self.s, self.fn)


class STRShift(nn.Module):
    """Parametrization of a norm's β for STR-BN: ``β = γ'·β̂ + β₀``, so the layer is ``γ'(x̂ + β̂) + β₀``.

    ``γ'`` is read from the same module's STR-parametrized weight (``gamma``, the weight's
    ``ParametrizationList``, kept as a plain attribute: not a submodule, so no module cycle, and a
    deep copy of the model maps it to the copy's own list). Channels whose ``|γ|`` is below
    ``gamma_min`` at insertion keep their β in the frozen buffer ``offset`` (β₀) and β̂ = 0: dividing
    by a tiny γ would blow β̂ and its gradients up.
    """

    def __init__(self, gamma: nn.Module, gamma_min: float = 1e-3) -> None:
        super().__init__()
        object.__setattr__(self, "gamma", gamma)
        self.gamma_min = gamma_min
        self.register_buffer("offset", torch.zeros(gamma.original.shape, dtype=gamma.original.dtype,
                                                   device=gamma.original.device))

    def forward(self, shift: torch.Tensor) -> torch.Tensor:
        return self.gamma() * shift + self.offset

    @torch.no_grad()
    def right_inverse(self, beta: torch.Tensor) -> torch.Tensor:
        g = self.gamma()
        small = g.abs() < self.gamma_min
        self.offset.copy_(torch.where(small, beta, torch.zeros_like(beta)))
        return torch.where(small, torch.zeros_like(beta), beta / torch.where(small, torch.ones_like(g), g))


class STRUnit(_Thresholded):
    """A per-unit importance vector ``u' = sign(u)·relu(|u| - g(s))``, ``u'`` starting at exactly 1.

    STR on an importance vector (the STR-BN report's thesis): one per channel group with no
    BatchNorm; every :class:`UnitScale` of the group multiplies its parameter by it, so a zero entry
    makes the unit exactly zero wherever it is written.
    """

    def __init__(self, num_units: int, s_init: float = -15.0, fn: str = "sigmoid") -> None:
        super().__init__()
        self._init_threshold((1,), s_init, fn)
        self.weight = nn.Parameter(soft_threshold_inverse(torch.ones(num_units), self.s, fn))

    def effective_weight(self) -> torch.Tensor:
        return soft_threshold(self.weight, self.s, self.fn)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, fn={self.fn}"


class UnitScale(nn.Module):
    """Parametrization ``W -> W · u'[index]`` along ``dim``: the rows (or γ/β entries) of a writer.

    ``index[i]`` is the unit of the group that entry ``i`` of ``dim`` writes (a writer may cover
    part of a group, in any order, as after a concat or a channel shuffle).
    """

    def __init__(self, unit: STRUnit, index: torch.Tensor, dim: int) -> None:
        super().__init__()
        self.unit = unit
        self.dim = dim
        self.register_buffer("index", index.to(torch.long))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        shape = [1] * w.dim()
        shape[self.dim] = -1
        return w * self.unit.effective_weight()[self.index].reshape(shape).to(w.dtype)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """At insertion u' = 1, so the stored tensor is the weight itself."""
        return w


STR_PARAMETRIZATIONS = (STRWeight, STRShift, UnitScale)


class RemovedBranch(nn.Module):
    """What a removed residual branch leaves in the eager model: its output rebuilt from its input.

    ``kinds`` lists, per leaf of the module's output (``spec``, a pytree spec), "zero" (a branch that
    added nothing: zeros shaped like the input), "input" (a block that became the identity), "none", or
    ``("empty", shape, dtype)``: zeros of the recorded shape, for a value only removed code read.
    """

    def __init__(self, spec: Any, kinds: list[str], name: str = "") -> None:
        super().__init__()
        self.spec, self.kinds, self.name = spec, list(kinds), name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.utils._pytree import tree_unflatten

        x = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        leaves = [torch.zeros_like(x) if k == "zero" else x if k == "input" else
                  torch.zeros(k[1], dtype=k[2], device=x.device) if isinstance(k, tuple) else None for k in self.kinds]
        return tree_unflatten(leaves, self.spec)

    def extra_repr(self) -> str:
        return f"{self.name}: {', '.join(k if isinstance(k, str) else k[0] for k in self.kinds)}"


class WideLayerNorm(nn.LayerNorm):
    """A LayerNorm over the last dim that lost channels which were exactly zero (a pruned hidden size).

    Its statistics still count the ``full_width`` original channels: a removed channel added 0 to
    Σx and (0 − μ)² = μ² to the squared deviations, so μ = Σx / C and
    σ² = (Σ(x − μ)² + (C − C′)·μ²) / C give exactly the original output on the kept channels.
    """

    def __init__(self, normalized_shape: int, full_width: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.full_width = full_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.full_width
        mean = x.sum(-1, keepdim=True) / c
        d = x - mean
        var = ((d * d).sum(-1, keepdim=True) + (c - x.shape[-1]) * mean * mean) / c
        y = d * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_width={self.full_width}"


class WideRMSNorm(nn.RMSNorm):
    """An RMSNorm over the last dim that lost channels which were exactly zero: the mean square still
    divides by the ``full_width`` original channels (the removed ones added 0 to Σx²)."""

    def __init__(self, normalized_shape: int, full_width: int, eps: float | None = None,
                 elementwise_affine: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.full_width = full_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        y = x * torch.rsqrt((x * x).sum(-1, keepdim=True) / self.full_width + eps)
        return y * self.weight if self.weight is not None else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_width={self.full_width}"


def str_norm_(norm: nn.Module, s_init: float = -15.0, fn: str = "sigmoid", gamma_min: float = 1e-3,
              weight: str = "weight", bias: str = "bias") -> nn.Module:
    """Make ``norm`` an STR-BN in place: γ' = soft threshold of γ, β = γ'·β̂ + β₀; same function."""
    from torch.nn.utils import parametrize

    gamma = getattr(norm, weight)
    strw = STRWeight(gamma, s_init, fn, role="norm")
    strw.to(device=gamma.device, dtype=gamma.dtype)
    parametrize.register_parametrization(norm, weight, strw, unsafe=True)
    parametrize.register_parametrization(norm, bias, STRShift(norm.parametrizations[weight], gamma_min), unsafe=True)
    return norm


def _parametrized(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(module name, tensor name, ParametrizationList) of every parametrized tensor in ``model``."""
    out = []
    for mod_name, mod in model.named_modules():
        plist = getattr(mod, "parametrizations", None)
        if plist is None or not isinstance(plist, nn.ModuleDict):
            continue
        for tensor_name, chain in plist.items():
            out.append((mod_name, tensor_name, chain))
    return out


def _qual(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def str_weights(model: nn.Module, role: str | None = "weight") -> dict[str, STRWeight]:
    """Qualified name of each STR-thresholded tensor (``"layer1.0.conv1.weight"``) → its STRWeight.

    ``role="weight"``: unstructured STR on conv/linear weights; ``"norm"``: STR-BN γ; None: both.
    """
    found: dict[str, STRWeight] = {}
    for owner, tensor, chain in _parametrized(model):
        for p in chain:
            if isinstance(p, STRWeight) and (role is None or p.role == role):
                found[_qual(owner, tensor)] = p
    return found


def str_units(model: nn.Module) -> dict[str, STRUnit]:
    """Each distinct STR importance vector, named after the first tensor it scales."""
    found: dict[int, tuple[str, STRUnit]] = {}
    for owner, tensor, chain in _parametrized(model):
        for p in chain:
            if isinstance(p, UnitScale) and id(p.unit) not in found:
                label = getattr(p.unit, "label", None)  # a depth gate names its branch
                found[id(p.unit)] = (label or _qual(owner, tensor).rpartition(".")[0] or _qual(owner, tensor), p.unit)
    return {name: unit for name, unit in found.values()}


class Carrier:
    """One structured STR vector: an STR-BN γ' or an importance vector u'; zeros are dead units."""

    def __init__(self, name: str, kind: str, value: Callable[[], torch.Tensor], threshold: Callable[[], torch.Tensor],
                 raw: nn.Parameter) -> None:
        self.name, self.kind, self.value, self.threshold, self.raw = name, kind, value, threshold, raw


def channel_carriers(model: nn.Module) -> dict[str, Carrier]:
    """Name → every structured STR vector of ``model`` (STR-BN γ by its module, units by their first writer)."""
    out: dict[str, Carrier] = {}
    for owner, tensor, chain in _parametrized(model):
        for p in chain:
            if isinstance(p, STRWeight) and p.role == "norm":
                out[owner] = Carrier(owner, "bn", chain, p.threshold, chain.original)
    for name, unit in str_units(model).items():
        kind = "depth" if getattr(unit, "kind", "") == "depth" else "gate"
        out[name if name not in out else f"{name}.unit"] = Carrier(name, kind, unit.effective_weight,
                                                                    unit.threshold, unit.weight)
    return out


def threshold_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every STR threshold ``s`` in ``model`` (each once)."""
    params = {id(p.s): p.s for p in str_weights(model, role=None).values()}
    params.update({id(u.s): u.s for u in str_units(model).values()})
    return list(params.values())


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The raw vectors structured STR thresholds: STR-BN γ and importance vectors (each once)."""
    params = {id(c.raw): c.raw for c in channel_carriers(model).values()}
    return list(params.values())
