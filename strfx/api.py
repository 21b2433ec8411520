"""The Python API: ``sparsify``, ``param_groups`` (``report`` lives in strfx.report)."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from strfx.config import SparsifyConfig, coerce_sparsify_config
from strfx.errors import StrfxError, VerificationError
from strfx.modules import norm_parameters, threshold_parameters
from strfx.passes import analyze_channels, capture, eval_mode, insert_str
from strfx.verify import max_rel_error

TOLERANCE = 1e-4


def _as_tuple(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def deepcopy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies tensors a forward pass left on modules (attention-bias caches
    computed with gradients on: non-leaf tensors refuse deepcopy), as detached tensors."""
    memo: dict[int, Any] = {}

    def visit(value: Any, depth: int = 0) -> None:  # caches are often dicts (timm's LeViT: device → bias table)
        if isinstance(value, torch.Tensor):
            if value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
        elif depth < 3 and isinstance(value, dict):
            for v in value.values():
                visit(v, depth + 1)
        elif depth < 3 and isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth + 1)

    for mod in model.modules():
        for value in vars(mod).values():
            if not isinstance(value, nn.Module):
                visit(value)
    return copy.deepcopy(model, memo)


def sparsify(
    model: nn.Module,
    mode: str | None = None,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    config: SparsifyConfig | dict[str, Any] | None = None,
    verify: bool = True,
) -> nn.Module:
    """A deep copy of ``model`` — same class, same forward — with STR attached as parametrizations.

    ``mode`` ("unstructured", "structured" or "lowrank") overrides ``config.mode``. The model is captured with
    ``torch.export`` on ``example_inputs`` to find where STR goes (conv/linear weights; channel
    groups and the parameters that write them); the copy is then trained like the original
    (``.train()``/``.eval()``, dropout, DDP, ``torch.compile`` and its own methods behave as before).
    With ``verify`` the copy is checked against ``model`` on the example inputs (max relative error
    ≤ 1e-4, else :class:`VerificationError`). ``model`` itself is not modified.
    """
    cfg = coerce_sparsify_config(config, mode=mode)
    inputs = _as_tuple(example_inputs)
    if inputs is None:
        raise StrfxError("sparsify needs example_inputs: strfx captures the model with torch.export on them "
                         "to find where STR goes (e.g. example_inputs=(torch.randn(1, 3, 224, 224),))")
    if cfg.mode == "lowrank":  # per-layer singular values: no channel coupling to analyse
        from strfx.lowrank import sparsify_lowrank

        result = sparsify_lowrank(model, cfg.lowrank, example_inputs=inputs, verify=verify)
        result._strfx = {"config": cfg, "example_inputs": inputs}
        return result
    result = deepcopy_model(model)  # the user's model stays untouched (parametrize mutates modules)
    gm = capture(model, inputs, cfg.capture)
    analysis = analyze_channels(gm) if cfg.mode == "structured" else None
    if cfg.ranks:  # singular values first: the channel carriers then scale the rows of U·diag(σ')·Vᵀ
        from strfx.lowrank import apply_lowrank

        lowrank = cfg.lowrank.model_copy(update={"rnn": False})
        if "relative_threshold" not in cfg.lowrank.model_fields_set:  # ranks die by the thresholds rising (σ is not
            lowrank.relative_threshold = True  # decayed with the channels), so they must be relative to σ_max
        apply_lowrank(result, lowrank)
    insert_str(result, gm, cfg, analysis)
    result._strfx = {"config": cfg, "example_inputs": inputs}
    if verify:
        check_equivalent(result, model, inputs, what=f"{cfg.mode} STR insertion")
    return result


def sparsify_config(model: nn.Module) -> SparsifyConfig | None:
    """The configuration :func:`sparsify` used for ``model`` (None for other models)."""
    return getattr(model, "_strfx", {}).get("config")


@torch.no_grad()
def check_equivalent(new: nn.Module, reference: nn.Module, inputs: Sequence[Any], what: str) -> float:
    """Compare ``new`` with ``reference`` in eval mode; raise a one-line error beyond tolerance."""
    with eval_mode(new), eval_mode(reference):
        err = max_rel_error(new(*[t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]),
                            reference(*[t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]))
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
    (``threshold_decay``, default ``weight_decay``). ``norm_decay`` applies to the raw vectors
    structured STR thresholds: STR-BN γ, importance vectors and (low-rank mode) singular values
    (default ``weight_decay``; in structured mode with ``ranks`` the singular values are weights). Everything
    else gets ``weight_decay``, as in the paper.
    """
    from strfx.lowrank import lowrank_sigma_parameters, lowrank_threshold_parameters

    thresholds = threshold_parameters(model) + lowrank_threshold_parameters(model)
    norms = norm_parameters(model)
    if not norms:  # low-rank mode: the singular values are what the decay shrinks under the thresholds; with
        norms = lowrank_sigma_parameters(model)  # channels too (ranks), shrinking both would shrink every weight twice
    special = {id(p) for p in thresholds + norms}
    rest = list({id(p): p for p in model.parameters() if id(p) not in special}.values())
    groups = [
        {"name": "weights", "params": rest, "weight_decay": weight_decay},
        {"name": "thresholds", "params": thresholds,
         "weight_decay": weight_decay if threshold_decay is None else threshold_decay},
        {"name": "norms", "params": norms, "weight_decay": weight_decay if norm_decay is None else norm_decay},
    ]
    return [g for g in groups if g["params"]]
