"""``strfx.shrink``: analyse channels, cut the dead ones, and prove the smaller model is the same.

Verification is part of shrinking: the result is compared with the masked model on the example
inputs and on random inputs of the same shapes (max relative error ≤ ``TOLERANCE``). When they
differ, both graphs are replayed node by node and the error names the first node whose output
(restricted to the kept channels) diverges.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx
from pydantic import BaseModel, Field
from torch import nn

from strfx.api import TOLERANCE, _as_tuple
from strfx.errors import StrfxError, VerificationError
from strfx.modules import STR_MODULES, str_weights
from strfx.passes.channel_analysis import META_KEY, ChannelAnalysis, TInfo, analyze_channels
from strfx.passes.shrink import shrink_graph
from strfx.passes.trace import eval_mode, record_shapes, trace
from strfx.verify import max_rel_error


class ShrinkReport(BaseModel):
    """What shrinking removed and how closely the result matches the masked model."""

    params_before: int
    params_after: int
    channels: int = Field(description="Channels (union-find roots) over all groups.")
    channels_removed: int
    groups: int
    prunable_groups: int
    blocked_groups: int
    unknown_ops: dict[str, str] = Field(description="Op kind → first node of it that blocked channels.")
    weight_sparsity: float = Field(description="Fraction of exact zeros left in the shrunk conv/linear weights "
                                   "(unstructured STR: zeros that are not whole channels stay in dense weights).")
    max_error: float = Field(description="Max relative error, shrunk vs masked, over all checked inputs.")
    analysis_s: float
    shrink_s: float
    round_to: int = Field(default=1, description="Each group kept a multiple of this many channels (dead ones kept as zeros).")


def _has_shapes(model: nn.Module) -> bool:
    return isinstance(model, fx.GraphModule) and all(
        "tensor_meta" in n.meta for n in model.graph.nodes if n.op not in ("output",))


def _example_inputs(model: nn.Module, example_inputs: Any) -> tuple[Any, ...]:
    inputs = _as_tuple(example_inputs)
    if inputs is None and isinstance(model, fx.GraphModule):
        inputs = model.meta.get("strfx", {}).get("example_inputs")
    if inputs is None:
        raise StrfxError("shrink needs example inputs (the model was sparsified without them); pass example_inputs=")
    return tuple(inputs)


def random_like(inputs: Sequence[Any], seed: int) -> tuple[Any, ...]:
    """Random inputs with the shapes/dtypes of ``inputs`` (non-float inputs are kept)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            out.append(torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device))
        else:
            out.append(x)
    return tuple(out)


def _params(m: nn.Module) -> int:
    skip = {id(p) for s in str_weights(m).values() for p in s.parameters()}
    skip |= {id(mod.s) for mod in m.modules() if isinstance(mod, STR_MODULES)}
    return sum(p.numel() for p in m.parameters() if id(p) not in skip)


def _weight_sparsity(m: nn.Module) -> float:
    weights = [mod.weight for mod in m.modules() if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear))]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def structural_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are the *same* tensors.

    Shrinking never changes a tensor in place (it builds new, smaller ones), so the copy need not
    duplicate the weights: peak memory is the model plus the shrunk model, not three models.
    """
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        memo[id(t)] = t
    return copy.deepcopy(model, memo)


def _unshare(result: nn.Module, original: nn.Module) -> None:
    """Give ``result`` its own copy of every tensor it still shares with ``original``."""
    shared = {id(t) for t in [*original.parameters(), *original.buffers()]}
    for mod in result.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) in shared:
                mod._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None and id(b) in shared:
                mod._buffers[name] = b.clone()


def prepare(model: nn.Module, inputs: Sequence[Any], reuse_shapes: bool = False,
            share_modules: bool = False) -> fx.GraphModule:
    """A traced copy of ``model`` with shapes recorded (the user's model is never changed).

    With ``reuse_shapes`` the shapes :func:`strfx.sparsify` recorded for its own example inputs are
    kept. With ``share_modules`` (read-only analysis) the traced graph calls the model's own
    modules instead of deep copies; only the graph is new.
    """
    if not share_modules:
        work = structural_copy(model)
    elif isinstance(model, fx.GraphModule):
        work = fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
    else:
        work = model
    gm = work if isinstance(work, fx.GraphModule) else trace(work)
    if not (reuse_shapes and _has_shapes(gm)):
        record_shapes(gm, inputs)
    return gm


def analyze(model: nn.Module, example_inputs: Any = None) -> tuple[fx.GraphModule, ChannelAnalysis]:
    """Channel groups of ``model``, with the traced graph they refer to (sharing the model's modules)."""
    inputs = _example_inputs(model, example_inputs)
    gm = prepare(model, inputs, reuse_shapes=example_inputs is None, share_modules=True)
    return gm, analyze_channels(gm)


@torch.no_grad()
def shrink(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
           round_to: int = 1) -> fx.GraphModule:
    """Remove every provably dead channel of ``model`` and return a plain, smaller GraphModule.

    ``model`` is usually what :func:`strfx.sparsify` returned (after training), but any traceable
    model works: its dead channels (zero γ and β, zero filters, ...) are found from the parameters.
    With ``round_to`` > 1 a few dead channels are kept (as zeros, so the function is the same) to
    leave every channel group a multiple of ``round_to`` wide, which CPU/GPU kernels prefer.
    The result holds no STR modules or parametrizations and needs nothing from strfx to run. It is
    checked against ``model`` (eval mode) and :class:`VerificationError` names the first diverging
    node if it does not match. ``result.meta["strfx_shrink"]`` holds a :class:`ShrinkReport` dict.
    """
    if round_to < 1:
        raise StrfxError(f"round_to must be at least 1, got {round_to}")
    inputs = _example_inputs(model, example_inputs)
    t0 = time.perf_counter()
    gm = prepare(model, inputs, reuse_shapes=example_inputs is None)
    analysis = analyze_channels(gm)
    analysis.round_widths(round_to)
    t1 = time.perf_counter()
    try:
        shrink_graph(gm, analysis)
    except StrfxError:
        raise
    except Exception as err:  # noqa: BLE001 - a cut torch rejects is reported as a refusal, not a crash
        raise VerificationError(f"shrinking failed while cutting the graph: {type(err).__name__}: "
                                f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    t2 = time.perf_counter()
    _unshare(gm, model)
    err = verify_shrunk(gm, model, inputs, analysis)
    groups = analysis.groups
    rep = ShrinkReport(
        params_before=_params(model), params_after=_params(gm),
        channels=sum(g.channels for g in groups), channels_removed=analysis.dead_channels(),
        groups=len(groups), prunable_groups=sum(g.prunable for g in groups),
        blocked_groups=sum(not g.prunable for g in groups), unknown_ops=analysis.unknown_ops,
        weight_sparsity=_weight_sparsity(gm), max_error=err, analysis_s=t1 - t0, shrink_s=t2 - t1, round_to=round_to,
    )
    gm.meta = {"strfx_shrink": rep.model_dump()}
    for node in gm.graph.nodes:  # analysis facts are not part of the exported model
        node.meta.pop(META_KEY, None)
    return gm


def verify_shrunk(shrunk: fx.GraphModule, reference: nn.Module, inputs: Sequence[Any],
                  analysis: ChannelAnalysis) -> float:
    """Max relative error of ``shrunk`` vs ``reference`` on the example and two random inputs."""
    worst = 0.0
    for k, x in enumerate((tuple(inputs), random_like(inputs, 1), random_like(inputs, 2))):
        with eval_mode(shrunk), eval_mode(reference):
            expected = reference(*x)
            try:
                actual = shrunk(*x)
            except Exception as err:  # noqa: BLE001 - a shape error in the cut graph
                raise VerificationError(
                    f"the shrunk model fails to run: {_first_divergence(shrunk, reference, x, analysis) or err}"
                ) from err
        e = max_rel_error(actual, expected)
        if e > TOLERANCE:
            where = _first_divergence(shrunk, reference, x, analysis)
            what = "example" if k == 0 else "random"
            e64 = _float64_error(shrunk, reference, x)
            hint = "" if e64 is None else (
                f" (in float64 the error is {e64:.2g}: the cut is exact and float32 rounding is amplified by an "
                "ill-conditioned op there)" if e64 <= TOLERANCE * 1e-3 else f" (in float64: {e64:.2g})")
            raise VerificationError(
                f"shrunk model differs from the masked model on {what} inputs: max relative error {e:.3g} > "
                f"{TOLERANCE:g}; first diverging node: {where or 'the outputs'}{hint}"
            )
        worst = max(worst, e)
    return worst


def _float64_error(shrunk: nn.Module, reference: nn.Module, inputs: Sequence[Any]) -> float | None:
    """The same comparison in float64 (only on failure): tells a wrong cut from float32 rounding."""
    try:
        a, b = copy.deepcopy(shrunk).double().eval(), copy.deepcopy(reference).double().eval()
        x = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
        return max_rel_error(a(*x), b(*x))
    except Exception:  # noqa: BLE001 - a diagnosis only
        return None


def _run_all(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[dict[str, Any], str | None]:
    """Every node's output by name; the name of the node that raised, if one did."""
    env: dict[str, Any] = {}
    current: list[str | None] = [None]

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            current[0] = n.name
            out = super().run_node(n)
            env[n.name] = out
            return out

    with eval_mode(gm):
        try:
            Recorder(gm).run(*inputs)
            return env, None
        except Exception as err:  # noqa: BLE001
            return env, f"{current[0]} ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})"


def _cut(value: torch.Tensor, info: TInfo, analysis: ChannelAnalysis) -> torch.Tensor:
    for d, ids in info.labels.items():
        keep = analysis.keep(ids)
        if not keep.all():
            value = value.index_select(d, torch.as_tensor(np.nonzero(keep)[0], device=value.device))
    return value


def _first_divergence(shrunk: fx.GraphModule, reference: nn.Module, inputs: Sequence[Any],
                      analysis: ChannelAnalysis) -> str | None:
    """Replay both graphs; the first node (in the masked graph's order, matched by name) whose output,
    cut to the kept channels, differs from the shrunk graph's."""
    masked = reference if isinstance(reference, fx.GraphModule) else trace(reference)  # trace copies nothing
    ref, _ = _run_all(masked, inputs)
    got, failed = _run_all(shrunk, inputs)
    for node in masked.graph.nodes:
        if failed is not None and failed.startswith(node.name + " "):
            return failed
        info = analysis.values.get(node.name)
        a, b = ref.get(node.name), got.get(node.name)
        if not isinstance(info, TInfo) or not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        try:
            expected = _cut(a, info, analysis)
        except Exception:  # noqa: BLE001
            continue
        if max_rel_error(b, expected) > TOLERANCE:
            return f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"
    return failed


__all__ = ["ShrinkReport", "analyze", "random_like", "shrink", "structural_copy"]
