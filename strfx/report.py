"""What STR did to a model: per-layer sparsity, thresholds, parameters and FLOPs.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (per module), never by hand.
Effective FLOPs scale each layer's dense FLOPs by the density of its thresholded weight in
unstructured mode and by the fraction of its output channels alive in structured mode (a fast
estimate that training's sparsity meter reproduces). In structured mode ``shrunk_flops`` is exact:
the FLOPs of the model after ``strfx.shrink`` removed its dead channels from producers and consumers.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.nn.utils import parametrize
from strfx.flops import FlopCounterMode, parametrizations_precomputed

from strfx.modules import STR_PARAMETRIZATIONS, STRUnit, channel_carriers, str_weights


class LayerReport(BaseModel):
    """One STR-carrying tensor."""

    name: str = Field(description="Qualified name of the weight, the STR-BN norm or the first layer an importance vector scales.")
    kind: Literal["weight", "bn", "gate", "depth", "rank"]
    elements: int = Field(description="Weights (unstructured), channels (structured) or the full rank (low-rank).")
    zeros: int = Field(description="Elements that are exactly zero after thresholding.")
    sparsity: float
    threshold: float = Field(description="g(s), the learned threshold (mean when per channel).")


class Report(BaseModel):
    """Totals and per-layer sparsity of a sparsified model."""

    model: str
    mode: str | None
    layers: list[LayerReport]
    elements: int = Field(description="Total elements under STR.")
    zeros: int
    sparsity: float = Field(description="zeros / elements over all STR layers.")
    params: int = Field(description="Parameters of the model (dense count).")
    nonzero_params: int = Field(description="Parameters that are not exactly zero (after thresholding).")
    dense_flops: int | None = Field(None, description="FLOPs of one forward on the example inputs.")
    effective_flops: int | None = Field(None, description="FLOPs left when zeros are skipped (see module doc).")
    shrunk_flops: int | None = Field(None, description="Structured mode: FLOPs of the shrunk model (exact); "
                                     "None when not computed or the model cannot be shrunk.")

    def table(self, title: str | None = None) -> Any:
        """The report as a table: ``print()`` shows it as text, a rich console with styles (the CLI)."""
        from strfx._table import Table

        t = Table(title=title or f"strfx report: {self.model} ({self.mode})", show_footer=True)
        t.add_column("layer", footer="total")
        t.add_column("kind")
        t.add_column("elements", justify="right", footer=f"{self.elements:,}")
        t.add_column("zeros", justify="right", footer=f"{self.zeros:,}")
        t.add_column("sparsity", justify="right", footer=f"{self.sparsity:.2%}")
        t.add_column("g(s)", justify="right")
        for layer in self.layers:
            t.add_row(layer.name, layer.kind, f"{layer.elements:,}", f"{layer.zeros:,}", f"{layer.sparsity:.2%}",
                      f"{layer.threshold:.3g}")
        t.caption = summary_line(self)
        return t


def summary_line(r: Report) -> str:
    parts = [f"params {r.params:,} ({r.nonzero_params:,} non-zero)"]
    if r.dense_flops:
        eff = r.effective_flops or r.dense_flops
        parts.append(f"FLOPs {r.dense_flops / 1e6:,.1f}M → {eff / 1e6:,.1f}M effective ({r.dense_flops / max(eff, 1):.2f}×)")
    return " · ".join(parts)


def _per_module_flops(model: nn.Module, inputs: Sequence[Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of the model as deployed: parametrized tensors are computed (and cached) before counting, so a
    low-rank weight's ``U·diag(σ')·Vᵀ`` and QR are not counted as the layer's work."""
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with parametrizations_precomputed(model), counter:
            model(*inputs)
    finally:
        model.train(was_training)
    root = type(model).__name__
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key.startswith(root + "."):
            per_module[key[len(root) + 1:]] = int(sum(ops.values()))
    return int(counter.get_total_flops()), per_module


def carrier_producers(model: nn.Module) -> dict[str, list[str]]:
    """Structured carrier name → the modules whose output channels it decides (for FLOPs estimates)."""
    out: dict[str, list[str]] = {}
    for owner, tensor, chain in _parametrized_tensors(model):
        for p in chain:
            if getattr(p, "role", None) == "norm":
                out[owner] = list(getattr(p, "producers", [])) or [owner]
    for name, carrier in channel_carriers(model).items():
        if carrier.kind in ("gate", "depth"):
            unit = carrier.raw
            for mod in model.modules():
                if isinstance(mod, STRUnit) and mod.weight is unit:
                    out[name] = list(getattr(mod, "producers", []))
    return out


def _parametrized_tensors(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    out = []
    for owner, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            out += [(owner, t, chain) for t, chain in mod.parametrizations.items()]
    return out


def count_params(model: nn.Module) -> int:
    """Parameters the model computes with (an STR-parametrized tensor counts as the tensor it computes;
    thresholds, importance vectors and low-rank factors are training state, not weights)."""
    return sum(t.numel() for t in used_tensors(model))


def used_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors the forward pass computes with: thresholded values instead of raw STR parameters;
    thresholds and importance vectors themselves are not counted."""
    used: dict[int, torch.Tensor] = {}
    inside = {id(m) for plist in model.modules() if isinstance(plist, parametrize.ParametrizationList)
              for m in plist.modules()}
    for mod in model.modules():
        if id(mod) in inside or isinstance(mod, (*STR_PARAMETRIZATIONS, STRUnit)):
            continue
        for p in mod._parameters.values():
            if p is not None:
                used[id(p)] = p
        if parametrize.is_parametrized(mod):
            for name in mod.parametrizations:
                t = getattr(mod, name)
                used[id(t)] = t
    return list(used.values())


def _shrunk_flops(model: nn.Module, inputs: Sequence[Any], dense: int, zeros: bool,
                  fallback: int | None, metric: str = "flops") -> int | None:
    """Structured mode: the FLOPs (or, ``metric="params"``, parameters) of the model with its dead channels
    really removed (exact, unlike the per-layer estimate, which misses the consumers of removed channels)."""
    if not zeros:
        return dense  # nothing is dead: shrinking would change nothing
    from strfx.errors import StrfxError
    from strfx.surgery import shrink

    try:
        small = shrink(model, inputs)
        return count_params(small) if metric == "params" else _per_module_flops(small, inputs)[0]
    except StrfxError:
        return fallback
    except Exception:  # noqa: BLE001 - a report (e.g. each epoch of training) must never fail on this
        return fallback


@torch.no_grad()
def report(model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor | None = None, name: str | None = None,
           shrunk_flops: bool = True) -> Report:
    """Report sparsity, thresholds, params and FLOPs of a model returned by :func:`strfx.sparsify`."""
    meta = getattr(model, "_strfx", {})
    if example_inputs is None:
        example_inputs = meta.get("example_inputs")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    mode = meta["config"].mode if "config" in meta else None

    layers: list[LayerReport] = []
    density: dict[str, float] = {}
    for qualname, strw in str_weights(model).items():
        owner, _, attr = qualname.rpartition(".")
        w = getattr(model.get_submodule(owner) if owner else model, attr)  # thresholded weight
        zeros = int((w == 0).sum())
        layers.append(LayerReport(name=qualname, kind="weight", elements=w.numel(), zeros=zeros,
                                  sparsity=zeros / max(w.numel(), 1), threshold=float(strw.threshold().mean())))
        density[owner] = 1 - layers[-1].sparsity
    producers = carrier_producers(model)
    for carrier_name, carrier in channel_carriers(model).items():
        g = carrier.value()
        zeros = int((g == 0).sum())
        layers.append(LayerReport(name=carrier_name, kind=carrier.kind, elements=g.numel(), zeros=zeros,
                                  sparsity=zeros / max(g.numel(), 1), threshold=float(carrier.threshold().mean())))
        for prod in producers.get(carrier_name, []):
            density[prod] = 1 - layers[-1].sparsity

    from strfx.lowrank import lowrank_parametrizations, ranks

    lowrank = lowrank_parametrizations(model)
    for lname, (rank, full) in ranks(model).items():
        strl = lowrank[lname][2]
        layers.append(LayerReport(name=lname, kind="rank", elements=full, zeros=full - rank,
                                  sparsity=(full - rank) / max(full, 1), threshold=float(strl.threshold().mean())))
    used = used_tensors(model)
    params = sum(t.numel() for t in used)
    nonzero = sum(int((t != 0).sum()) for t in used)

    dense = effective_flops = None
    if example_inputs is not None:
        dense, per_module = _per_module_flops(model, example_inputs)
        saved = sum(per_module.get(name, 0) * (1 - d) for name, d in density.items())
        effective_flops = int(round(dense - saved))
    exact = None
    if example_inputs is not None and mode == "structured" and shrunk_flops and dense is not None:
        exact = _shrunk_flops(model, example_inputs, dense, zeros=any(
            layer.zeros for layer in layers if layer.kind != "weight"), fallback=None)
    elements = sum(layer.elements for layer in layers)
    zeros = sum(layer.zeros for layer in layers)
    return Report(
        model=name or type(model).__name__, mode=mode, layers=layers, elements=elements, zeros=zeros,
        sparsity=zeros / max(elements, 1), params=params, nonzero_params=nonzero,
        dense_flops=dense, effective_flops=effective_flops, shrunk_flops=exact,
    )
