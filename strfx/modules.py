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
* **Structured** — :class:`STRBatchNorm` (STR-BN) replaces a BatchNorm and :class:`STRGate` is a
  new per-channel gate node after a BN-free producer. Both change the dataflow, so they are real
  graph rewrites (module swap, node insertion), done by ``strfx.passes.insert_str``.
"""

from __future__ import annotations

from typing import Callable

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
    is 0 for conv/linear weights and 1 for transposed convs).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        s_init: float,
        fn: str = "sigmoid",
        per_channel: bool = False,
        channel_dim: int = 0,
    ) -> None:
        super().__init__()
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


def _channel_view(t: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[channel_dim] = t.numel()
    return t.reshape(shape)


class STRBatchNorm(_Thresholded):
    """STR-BN: ``y = γ' * (x̂ + β̂) + β₀`` with ``γ' = sign(γ) * relu(|γ| - g(s))``.

    ``x̂`` is the normalized input (running statistics as in ``nn.BatchNorm``). A channel whose γ'
    is zero outputs exactly ``β₀``, which is zero except for channels converted with ``|γ|`` below
    ``gamma_min``: dividing by such a γ to get β̂ = β/γ would blow β̂ (and its gradients) up, so
    those channels keep their β in the frozen buffer ``offset`` (β₀) and β̂ = 0 instead.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        s_init: float = -15.0,
        fn: str = "sigmoid",
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.weight = nn.Parameter(torch.ones(num_features))  # γ
        self.shift = nn.Parameter(torch.zeros(num_features))  # β̂
        self.register_buffer("offset", torch.zeros(num_features))  # β₀
        self._init_threshold((1,), s_init, fn)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.running_mean = None
            self.running_var = None
            self.num_batches_tracked = None

    @classmethod
    def from_batchnorm(
        cls, bn: nn.modules.batchnorm._BatchNorm, s_init: float, fn: str = "sigmoid", gamma_min: float = 1e-3
    ) -> "STRBatchNorm":
        """An STR-BN computing the same function as ``bn`` (up to g(s_init))."""
        if not bn.affine:
            raise ValueError("STR-BN needs an affine BatchNorm (it thresholds γ)")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.track_running_stats, s_init, fn)
        new.to(device=bn.weight.device, dtype=bn.weight.dtype)
        with torch.no_grad():
            gamma, beta = bn.weight.detach(), bn.bias.detach()
            small = gamma.abs() < gamma_min
            safe_gamma = torch.where(small, torch.ones_like(gamma), gamma)
            new.weight.copy_(soft_threshold_inverse(gamma, new.s, fn))  # so that γ' == γ
            new.shift.copy_(torch.where(small, torch.zeros_like(beta), beta / safe_gamma))
            new.offset.copy_(torch.where(small, beta, torch.zeros_like(beta)))
            if bn.track_running_stats:
                new.running_mean.copy_(bn.running_mean)
                new.running_var.copy_(bn.running_var)
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
        new.train(bn.training)
        return new

    def effective_weight(self) -> torch.Tensor:
        """γ' — zero entries are dead channels."""
        return soft_threshold(self.weight, self.s, self.fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same train/eval statistics rules as nn.modules.batchnorm._BatchNorm.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or self.running_mean is None
        # γ'(x̂ + β̂) + β₀ == γ'x̂ + (γ'β̂ + β₀): handing the per-channel γ' and γ'β̂ + β₀ to the native
        # batch_norm kernel fuses the affine part (no activation-sized temporaries saved for backward;
        # ~2× faster forward+backward than three elementwise ops after an affine-free batch_norm).
        gamma = self.effective_weight()
        return F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            gamma,
            gamma * self.shift + self.offset,
            use_batch_stats,
            factor,
            self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, fn={self.fn}"


class STRGate(_Thresholded):
    """A per-channel gate ``y = x * g'`` with ``g' = sign(g) * relu(|g| - g(s))``, ``g'`` init 1.

    Structured STR for producers without a BatchNorm (LayerNorm nets, MLPs, bias-only convs):
    unstructured STR on a per-channel importance vector. ``channel_dim`` is 1 for NC... tensors
    and -1 for channels-last ones (Linear outputs).
    """

    def __init__(self, num_channels: int, channel_dim: int, s_init: float = -15.0, fn: str = "sigmoid") -> None:
        super().__init__()
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        self._init_threshold((1,), s_init, fn)
        # raw gate such that the thresholded gate g' starts at exactly 1
        self.weight = nn.Parameter(soft_threshold_inverse(torch.ones(num_channels), self.s, fn))

    def effective_weight(self) -> torch.Tensor:
        return soft_threshold(self.weight, self.s, self.fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _channel_view(self.effective_weight(), x.dim(), self.channel_dim % x.dim())

    def extra_repr(self) -> str:
        return f"{self.num_channels}, channel_dim={self.channel_dim}, fn={self.fn}"


STR_MODULES: tuple[type[nn.Module], ...] = (STRBatchNorm, STRGate)


def str_weights(model: nn.Module) -> dict[str, STRWeight]:
    """Qualified name of each STR-parametrized weight (``"layer1.0.conv1.weight"``) → its STRWeight."""
    found: dict[str, STRWeight] = {}
    for mod_name, mod in model.named_modules():
        plist = getattr(mod, "parametrizations", None)
        if plist is None:
            continue
        for tensor_name, chain in plist.items():
            for p in chain:
                if isinstance(p, STRWeight):
                    found[f"{mod_name}.{tensor_name}" if mod_name else tensor_name] = p
    return found


def str_channel_modules(model: nn.Module) -> dict[str, STRBatchNorm | STRGate]:
    """Qualified name → every STR-BN and gate in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, STR_MODULES)}


def threshold_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every STR threshold ``s`` in ``model``."""
    params = [p.s for p in str_weights(model).values()]
    params += [m.s for m in str_channel_modules(model).values()]
    return params
