"""Rewind: keep the units (or weights) STR killed, take every other value from an earlier state.

STR learns *where* to be sparse by training the weights and the thresholds together; the rising
thresholds shrink every surviving weight too (``u' = u − g(s)``), and the strfx benchmarks measured
that this, not the choice of units, is what costs accuracy (docs/results.md, "Issue 14"; docs/lm.md):
the units STR chose, cut from the dense weights and fine-tuned, beat uniform and heuristic choices.
:func:`rewind` is that step as an API: the dead set of every STR tensor is read off the trained model,
the model is loaded with an earlier state dict (the pretrained weights, or the state when the
thresholds started rising), and the dead entries are written back as exact zeros, so
:func:`strfx.shrink` cuts exactly the units STR chose from weights the thresholds never touched.

It works on the STR tensors themselves, so it covers every mode whose units are entries of an STR
tensor: unstructured weights, STR-BN γ, importance vectors of channels, heads, hidden size and depth.
Low-rank mode is refused: a singular direction of the trained weight is not the same direction of
the earlier weight.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from strfx.errors import StrfxError
from strfx.lowrank import STRLowRank
from strfx.modules import STRWeight, _parametrized, _qual, soft_threshold, str_units


def _str_tensors(model: nn.Module) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    """Name → (the raw parameter STR thresholds, its thresholded value) for every STR tensor of ``model``."""
    out: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    seen: set[int] = set()  # a tied tensor (one raw parameter read by several modules) counts once
    for owner, tensor, chain in _parametrized(model):
        for p in chain:
            if isinstance(p, STRLowRank):
                raise StrfxError("rewind does not apply to low-rank STR: a singular direction of the trained "
                                 "weight is not a direction of the earlier one; fine-tune the shrunk model instead")
            if isinstance(p, STRWeight) and id(chain.original) not in seen:
                seen.add(id(chain.original))
                out[_qual(owner, tensor)] = (chain.original, soft_threshold(chain.original, p.s, p.fn))
    for name, unit in str_units(model).items():
        if id(unit.weight) not in seen:
            seen.add(id(unit.weight))
            out[f"{name}:unit"] = (unit.weight, unit.effective_weight())
    return out


@torch.no_grad()
def dead_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name → boolean mask of the entries of each STR tensor that are exactly zero (the dead units or weights)."""
    return {name: (value == 0).detach().clone() for name, (_, value) in _str_tensors(model).items()}


@torch.no_grad()
def rewind(model: nn.Module, state: Mapping[str, Any], masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Load ``state`` into the sparsified ``model`` (in place), keeping every entry STR killed at exactly zero.

    ``state`` is a ``model.state_dict()`` taken earlier in the same run (right after
    :func:`strfx.sparsify`, or when the thresholds started to rise); ``masks`` defaults to
    :func:`dead_masks` of ``model`` as it is now. Afterwards the thresholds are those of ``state``, every
    dead entry's raw value is 0 (its STR value is 0 whatever the threshold) and every other value comes
    from ``state``: :func:`strfx.shrink` then cuts exactly the units STR chose. Returns
    ``{"dead": entries kept at zero, "entries": STR entries, "tensors": STR tensors}``.
    """
    masks = dict(dead_masks(model) if masks is None else masks)
    missing = set(masks) - set(_str_tensors(model))
    if missing:
        raise StrfxError(f"rewind: masks name STR tensors this model does not have ({sorted(missing)[:3]}); "
                         f"take the masks from the same sparsified model")
    model.load_state_dict(dict(state), strict=True)
    dead = entries = 0
    for name, (raw, _) in _str_tensors(model).items():
        mask = masks[name].to(raw.device)
        if mask.shape != raw.shape:
            raise StrfxError(f"rewind: the mask of {name} has shape {tuple(mask.shape)}, the tensor "
                             f"{tuple(raw.shape)}; take the masks from the same sparsified model")
        raw.masked_fill_(mask, 0.0)
        dead += int(mask.sum())
        entries += mask.numel()
    for name, (_, value) in _str_tensors(model).items():  # a zero raw value is zero through any threshold
        if bool((value[masks[name].to(value.device)] != 0).any()):
            raise StrfxError(f"rewind: {name} is not zero where STR killed it after rewinding (internal error)")
    return {"dead": dead, "entries": entries, "tensors": len(masks)}
