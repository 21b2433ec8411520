"""Numerical comparison of model outputs: how every surgery is judged."""

from __future__ import annotations

from typing import Any

import torch


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Tensors of a model output (tensor, tuple/list, dict, namedtuple), in a stable order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in flatten_outputs(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten_outputs(o)]
    return []


def max_rel_error(actual: Any, expected: Any) -> float:
    """max |a - e| / max |e| over all output tensors (0 when both are all zero).

    Relative to the largest magnitude of each expected tensor, so values near zero do not blow it up.
    """
    a_list, e_list = flatten_outputs(actual), flatten_outputs(expected)
    if len(a_list) != len(e_list):
        return float("inf")
    worst = 0.0
    for a, e in zip(a_list, e_list):
        if a.shape != e.shape:
            return float("inf")
        a, e = a.detach().double(), e.detach().double()
        if not torch.isfinite(a).all() or not torch.isfinite(e).all():
            if not torch.equal(torch.nan_to_num(a), torch.nan_to_num(e)):
                return float("inf")
            continue
        scale = e.abs().max().item()
        diff = (a - e).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst
