"""The Python API: ``sparsify``, ``param_groups`` (``report`` lives in strfx.report)."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from strfx.config import SparsifyConfig, coerce_sparsify_config
from strfx.errors import VerificationError
from strfx.modules import str_channel_modules, threshold_parameters
from strfx.passes import insert_str, trace
from strfx.passes.trace import eval_mode
from strfx.verify import max_rel_error

TOLERANCE = 1e-4


def _as_tuple(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def sparsify(
    model: nn.Module,
    mode: str | None = None,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    config: SparsifyConfig | dict[str, Any] | None = None,
    verify: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` and return a GraphModule with STR inserted; ``model`` itself is not modified.

    ``mode`` ("unstructured" or "structured") overrides ``config.mode``. With ``example_inputs``,
    shapes are recorded on the graph and the result is checked against the original model on them
    (max relative error ≤ 1e-4, else :class:`VerificationError`).
    """
    cfg = coerce_sparsify_config(config, mode=mode)
    inputs = _as_tuple(example_inputs)
    original = copy.deepcopy(model)  # the user's model stays untouched (parametrize mutates modules)
    gm = trace(original, inputs, cfg.trace)
    insert_str(gm, cfg)
    gm.meta["strfx"] = {"config": cfg, "example_inputs": inputs}
    if verify and inputs is not None:
        check_equivalent(gm, model, inputs, what=f"{cfg.mode} STR insertion")
    return gm


@torch.no_grad()
def check_equivalent(new: nn.Module, reference: nn.Module, inputs: Sequence[Any], what: str) -> float:
    """Compare ``new`` with ``reference`` in eval mode; raise a one-line error beyond tolerance."""
    with eval_mode(new), eval_mode(reference):
        err = max_rel_error(new(*inputs), reference(*inputs))
    if err > TOLERANCE:
        raise VerificationError(f"{what} changed the model's outputs: max relative error {err:.3g} > {TOLERANCE:g}")
    return err


def param_groups(
    model: nn.Module,
    weight_decay: float = 5e-5,
    threshold_decay: float | None = None,
    norm_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for STR training, each with a ``name``.

    In STR, weight decay on the thresholds ``s`` is what raises them and so drives sparsity up
    (``threshold_decay``, default ``weight_decay``). ``norm_decay`` applies to STR-BN γ and gate
    vectors (default ``weight_decay``). Everything else gets ``weight_decay``, as in the paper.
    """
    thresholds = threshold_parameters(model)
    norms = [m.weight for m in str_channel_modules(model).values()]
    special = {id(p) for p in thresholds + norms}
    rest = [p for p in model.parameters() if id(p) not in special]
    groups = [
        {"name": "weights", "params": rest, "weight_decay": weight_decay},
        {"name": "thresholds", "params": thresholds,
         "weight_decay": weight_decay if threshold_decay is None else threshold_decay},
        {"name": "norms", "params": norms, "weight_decay": weight_decay if norm_decay is None else norm_decay},
    ]
    return [g for g in groups if g["params"]]
