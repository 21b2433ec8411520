"""FLOPs as ``torch.utils.flop_counter`` counts them, with the formulas it lacks on the CPU.

torch 2.13 counts the fused attention kernels of CUDA (flash, efficient, cuDNN) but not
``aten._scaled_dot_product_flash_attention_for_cpu``, which ``F.scaled_dot_product_attention`` runs on
the CPU: attention's two matmuls vanished from every FLOPs number (15 % of a small Llama's), and the
target controller steered the rest. The same formula as the CUDA kernels is registered for it, once.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils import flop_counter


def _register() -> None:
    aten = torch.ops.aten
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", flop_counter.sdpa_flop),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", flop_counter.sdpa_backward_flop)):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry and op.default not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)


_register()
FlopCounterMode = flop_counter.FlopCounterMode


@contextlib.contextmanager
def parametrizations_precomputed(model: torch.nn.Module) -> Iterator[None]:
    """Count a parametrized model as deployed: every parametrized tensor is computed once and cached before
    the counting starts, so building a weight (a low-rank ``U·diag(σ')·Vᵀ``, its QR) is not the layer's work."""
    from torch.nn.utils import parametrize

    with torch.no_grad(), parametrize.cached():
        for mod in model.modules():
            if parametrize.is_parametrized(mod):
                for name in mod.parametrizations:
                    getattr(mod, name)
        yield
