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
import torch.fx as fx
from pydantic import BaseModel, Field
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from strfx.modules import STRBatchNorm, STRGate, str_channel_modules, str_weights, threshold_parameters


class LayerReport(BaseModel):
    """One STR-carrying tensor."""

    name: str = Field(description="Qualified name of the weight, STR-BN or gate.")
    kind: Literal["weight", "bn", "gate"]
    elements: int = Field(description="Weights (unstructured) or channels (structured).")
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
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(*inputs)
    finally:
        model.train(was_training)
    root = type(model).__name__
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key.startswith(root + "."):
            per_module[key[len(root) + 1:]] = int(sum(ops.values()))
    return int(counter.get_total_flops()), per_module


def _structured_producers(model: nn.Module) -> dict[str, str]:
    """STR-BN/gate module name → the call_module producer it thresholds (graph models only)."""
    out: dict[str, str] = {}
    if not isinstance(model, fx.GraphModule):
        return out
    for node in model.graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), (STRBatchNorm, STRGate)):
            src = node.args[0] if node.args else None
            if isinstance(src, fx.Node) and src.op == "call_module":
                out[node.target] = src.target
    return out


def _shrunk_flops(model: nn.Module, inputs: Sequence[Any], dense: int, zeros: bool,
                  fallback: int | None) -> int | None:
    """Structured mode: the FLOPs of the model with its dead channels really removed (exact, unlike
    the per-layer estimate, which misses the consumers of removed channels)."""
    if not zeros:
        return dense  # nothing is dead: shrinking would change nothing
    from strfx.errors import StrfxError
    from strfx.surgery import shrink

    try:
        small = shrink(model, inputs)
        return _per_module_flops(small, inputs)[0]
    except StrfxError:
        return fallback
    except Exception:  # noqa: BLE001 - a report (e.g. each epoch of training) must never fail on this
        return fallback


@torch.no_grad()
def report(model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor | None = None, name: str | None = None,
           shrunk_flops: bool = True) -> Report:
    """Report sparsity, thresholds, params and FLOPs of a model returned by :func:`strfx.sparsify`."""
    meta = getattr(model, "meta", {}).get("strfx", {}) if isinstance(model, fx.GraphModule) else {}
    if example_inputs is None:
        example_inputs = meta.get("example_inputs")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    mode = meta["config"].mode if "config" in meta else None

    layers: list[LayerReport] = []
    density: dict[str, float] = {}
    for qualname, strw in str_weights(model).items():
        owner, _, attr = qualname.rpartition(".")
        w = model.get_submodule(owner).parametrizations[attr]()  # thresholded weight
        zeros = int((w == 0).sum())
        layers.append(LayerReport(name=qualname, kind="weight", elements=w.numel(), zeros=zeros,
                                  sparsity=zeros / max(w.numel(), 1), threshold=float(strw.threshold().mean())))
        density[owner] = 1 - layers[-1].sparsity
    producers = _structured_producers(model)
    for mod_name, mod in str_channel_modules(model).items():
        g = mod.effective_weight()
        zeros = int((g == 0).sum())
        layers.append(LayerReport(name=mod_name, kind="bn" if isinstance(mod, STRBatchNorm) else "gate",
                                  elements=g.numel(), zeros=zeros, sparsity=zeros / max(g.numel(), 1),
                                  threshold=float(mod.threshold().mean())))
        if mod_name in producers:
            density[producers[mod_name]] = 1 - layers[-1].sparsity

    # Count what the forward pass uses: thresholded tensors instead of their raw parameters.
    thresholds = {id(p) for p in threshold_parameters(model)}
    effective = {id(mod.weight): mod.effective_weight() for mod in str_channel_modules(model).values()}
    for qualname in str_weights(model):
        owner, _, attr = qualname.rpartition(".")
        chain = model.get_submodule(owner).parametrizations[attr]
        effective[id(chain.original)] = chain()
    used = [effective.get(id(p), p) for p in model.parameters() if id(p) not in thresholds]
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
