"""``strfx inspect``: what each mode would do to every conv/linear layer, before doing it."""

from __future__ import annotations

from typing import Any, Sequence

from pydantic import BaseModel
from torch import nn
from torch.nn.utils import parametrize

from strfx.api import sparsify
from strfx.config import SparsifyConfig
from strfx.modules import channel_carriers


class PlanRow(BaseModel):
    layer: str
    type: str
    weight_shape: list[int]
    unstructured: str
    structured: str


def _structured_cover(model: nn.Module) -> dict[str, str]:
    """Producer module name → the STR-BN/importance vector that decides its output channels."""
    from strfx.report import carrier_producers

    cover: dict[str, str] = {}
    carriers = channel_carriers(model)
    producers_of = carrier_producers(model)
    for name, producers in sorted(producers_of.items(), key=lambda kv: getattr(carriers.get(kv[0]), "kind", "") == "depth"):
        carrier = carriers.get(name)
        if carrier is None:
            continue
        n = carrier.value().numel()
        if carrier.kind == "depth":  # a branch's gate comes on top of its units
            for prod in producers:
                cover[prod] = f"{cover[prod]} + depth gate" if prod in cover else "depth gate"
            continue
        label = f"STR-BN {name} ({n} ch)" if carrier.kind == "bn" else f"importance vector ({n} units)"
        for prod in producers:
            cover[prod] = label
    return cover


def plan(model: nn.Module, example_inputs: Sequence[Any], config: SparsifyConfig) -> list[PlanRow]:
    """One row per weight layer: what unstructured and structured STR would put on it."""
    results: dict[str, nn.Module | str] = {}
    for mode in ("unstructured", "structured"):
        try:
            results[mode] = sparsify(model, mode, config=config, verify=False, example_inputs=example_inputs)
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
        parametrized = parametrize.is_parametrized(mod, "weight")
        tensor = mod.parametrizations["weight"].original if parametrized else mod.weight
        rows.append(PlanRow(
            layer=name, type=(type(mod).__bases__[0] if parametrize.is_parametrized(mod) else type(mod)).__name__,
            weight_shape=list(tensor.shape),
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
    given = {f"{b} (parameter)" for b in analysis.biases_given}  # not the user's: shrink adds it (zero + constants)

    def member(m: str) -> str:
        return m.replace("(parameter)", "(parameter strfx adds: a zero bias that absorbs constant channels)") \
            if m in given else m

    return [GroupRow(group=g.id, channels=g.channels, dead=g.dead, members=[member(m) for m in g.members],
                     blocked_by=g.blocked_by) for g in analysis.groups]
