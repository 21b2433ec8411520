"""``strfx inspect``: what each mode would do to every conv/linear layer, before doing it."""

from __future__ import annotations

from typing import Any, Sequence

import torch.fx as fx
from pydantic import BaseModel
from torch import nn

from strfx.api import sparsify
from strfx.config import SparsifyConfig
from strfx.modules import STRBatchNorm, STRGate


class PlanRow(BaseModel):
    layer: str
    type: str
    weight_shape: list[int]
    unstructured: str
    structured: str


def _structured_cover(gm: fx.GraphModule) -> dict[str, str]:
    """Producer module name → the STR-BN/gate that thresholds its output channels."""
    cover: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        src = node.args[0] if node.args else None
        if isinstance(mod, (STRBatchNorm, STRGate)) and isinstance(src, fx.Node) and src.op == "call_module":
            kind = "STR-BN" if isinstance(mod, STRBatchNorm) else "gate"
            cover[src.target] = f"{kind} {node.target} ({mod.weight.numel()} ch)"
    return cover


def plan(model: nn.Module, example_inputs: Sequence[Any], config: SparsifyConfig) -> list[PlanRow]:
    """One row per weight layer: what unstructured and structured STR would put on it."""
    results: dict[str, fx.GraphModule | str] = {}
    for mode in ("unstructured", "structured"):
        try:
            results[mode] = sparsify(model, mode, config=config, verify=False)
        except Exception as err:  # noqa: BLE001 - show why a mode does not apply instead of failing
            results[mode] = str(err)
    unstructured, structured = results["unstructured"], results["structured"]
    if isinstance(unstructured, str):
        from strfx.errors import StrfxError

        raise StrfxError(unstructured)
    from strfx.modules import str_weights

    touched = str_weights(unstructured)
    cover = _structured_cover(structured) if not isinstance(structured, str) else {}
    rows = []
    for name, mod in unstructured.named_modules():
        if not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        parametrized = hasattr(mod, "parametrizations") and "weight" in mod.parametrizations
        tensor = mod.parametrizations["weight"].original if parametrized else mod.weight
        rows.append(PlanRow(
            layer=name, type=(type(mod).__bases__[0] if parametrized else type(mod)).__name__, weight_shape=list(tensor.shape),
            unstructured="STR on weight" if f"{name}.weight" in touched else "dense",
            structured=cover.get(name, "—" if not isinstance(structured, str) else structured),
        ))
    return rows


class GroupRow(BaseModel):
    """One channel group: channels that can only be removed together."""

    group: int
    channels: int
    dead: int
    members: list[str]
    blocked_by: list[str]


def channel_groups(model: nn.Module, example_inputs: Sequence[Any]) -> list[GroupRow]:
    """The channel groups of ``model`` from the channel analysis (shapes only, no real data)."""
    from strfx.surgery import analyze

    _, analysis = analyze(model, example_inputs)
    return [GroupRow(group=g.id, channels=g.channels, dead=g.dead, members=g.members, blocked_by=g.blocked_by)
            for g in analysis.groups]
