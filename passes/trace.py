"""Trace a model with torch.fx and record every node's tensor shapes.

``trace`` keeps strfx's own STR modules and configured leaf modules as single ``call_module``
nodes. ``record_shapes`` runs the graph on *meta* tensors (no compute, no memory for activations
or weights) and stores ``node.meta["tensor_meta"]`` like ``torch.fx.passes.shape_prop.ShapeProp``;
the tensor metadata (unlike a FakeTensor) survives deepcopy and pickling. Meta tensors are 5-7x
faster than fake tensors here; graphs they cannot run (device-mixing constants, data-dependent
shapes) fall back to fake tensors, then to a real forward pass.

Models are traced in eval mode: branches that exist only in training (auxiliary heads) are not part
of the graph. Modules whose behaviour depends on the mode (``StochasticDepth``) are leaves by default
so the traced graph still switches with ``.train()``/``.eval()``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import traceback
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata
from torch.utils._pytree import tree_map

from strfx.config import TraceConfig
from strfx.errors import TraceError
from strfx.modules import STR_MODULES


class StrfxTracer(fx.Tracer):
    """A tracer whose leaves are torch.nn's modules, STR modules and the configured ``leaf_modules``."""

    def __init__(self, leaf_modules: Sequence[str] = ()) -> None:
        super().__init__()
        self.leaf_patterns = list(leaf_modules)

    def _matches(self, m: nn.Module, qualname: str) -> bool:
        cls = type(m)
        for pat in self.leaf_patterns:
            if pat in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}") or fnmatch.fnmatchcase(qualname, pat):
                return True
        return False

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, STR_MODULES) or self._matches(m, module_qualified_name):
            return True
        return super().is_leaf_module(m, module_qualified_name)


import strfx as _strfx  # noqa: E402

# Frames inside these packages are never "the user's line".
_LIB_DIRS = tuple(os.path.dirname(p) + os.sep for p in (torch.__file__, __file__, _strfx.__file__))


def _user_frame(err: BaseException) -> str:
    """``file:line: code`` of the deepest frame outside torch and strfx, where tracing failed."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(_LIB_DIRS)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} `{(f.line or '').strip()}`"


def trace(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | None = None,
    config: TraceConfig | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` (left unchanged) and, given example inputs, record shapes."""
    config = config or TraceConfig()
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        tracer = StrfxTracer(config.leaf_modules)
        try:
            with eval_mode(model):
                graph = tracer.trace(model, concrete_args=config.concrete_args or None)
        except Exception as err:  # noqa: BLE001 - FX raises many kinds; all become one clear line
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__}{_user_frame(err)}: {msg}; "
                "make the module containing it a leaf (sparsify.trace.leaf_modules) or fix the "
                "argument it depends on (sparsify.trace.concrete_args)"
            ) from err
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        gm.training = model.training  # the submodules are the model's own: their modes are left alone
    if example_inputs is not None:
        record_shapes(gm, example_inputs)
    return gm


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode, then each back to its own mode (mixed modes survive)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def _to_meta(value: Any) -> Any:
    return tree_map(lambda v: _extract_tensor_metadata(v) if isinstance(v, torch.Tensor) else v, value)


@contextlib.contextmanager
def _weights_on_meta(gm: fx.GraphModule) -> Iterator[None]:
    """Swap every parameter and buffer of ``gm`` for a meta tensor of the same shape, then put them back.

    Swapping in place (the way ``torch.nn.utils.stateless`` does) instead of copying the model keeps
    shape recording free of weight memory; the originals are restored even when propagation fails.
    """
    saved: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    try:
        for mod in gm.modules():
            for table in (mod._parameters, mod._buffers):
                for name, t in table.items():
                    if t is None or t.device.type == "meta":
                        continue
                    saved.append((table, name, t))
                    meta = torch.empty_like(t, device="meta")
                    table[name] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
        yield
    finally:
        for table, name, t in reversed(saved):
            table[name] = t


# Leaf modules whose output is shaped like their only input. Their meta kernels are Python
# decompositions (BatchNorm's is a third of a DenseNet's shape recording, LayerNorm's a third of a
# ViT's); the shape is known, and the checks below keep a mis-sized input an error. Exact types
# only: a subclass may override forward, so it runs its real (meta) kernels.
_SAME_SHAPE = {
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
}
_BATCHNORMS = {nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm}


def _same_shape(mod: nn.Module, x: torch.Tensor) -> bool:
    """True when ``mod(x)`` is known to be shaped (and typed) like ``x`` and valid for it."""
    kind = type(mod)
    if kind in _SAME_SHAPE:
        return True
    if kind in _BATCHNORMS:
        return x.ndim >= 2 and x.shape[1] == mod.num_features
    if kind is nn.LayerNorm:
        n = len(mod.normalized_shape)
        return x.ndim >= n and tuple(x.shape[-n:]) == tuple(mod.normalized_shape)
    if kind is nn.GroupNorm:
        return x.ndim >= 2 and x.shape[1] == mod.num_channels
    return False


class MetaShapeProp(ShapeProp):
    """``ShapeProp`` on meta tensors, with shape-preserving leaf modules answered without a kernel."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        mod = self.fetch_attr(target)
        x = args[0] if len(args) == 1 and not kwargs else None
        if isinstance(x, torch.Tensor) and x.device.type == "meta" and _same_shape(mod, x):
            return torch.empty_like(x)
        return super().call_module(target, args, kwargs)


def _on_meta(x: Any) -> Any:
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def record_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Store ``node.meta["tensor_meta"]`` for every node: on meta tensors, else fake, else real ones.

    Runs in eval mode so that BatchNorm running statistics are not touched.
    """
    with eval_mode(gm), torch.no_grad():
        try:
            with _weights_on_meta(gm):
                MetaShapeProp(gm).propagate(*tree_map(_on_meta, tuple(example_inputs)))
            return gm
        except Exception:  # noqa: BLE001 - e.g. a CPU constant made in forward(): try fake tensors
            pass
        try:
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=True)
            fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
            FakeTensorProp(gm, mode).propagate(*fake_inputs)
            for node in gm.graph.nodes:
                if "val" in node.meta:
                    node.meta["tensor_meta"] = _to_meta(node.meta.pop("val"))
        except Exception:  # noqa: BLE001 - an op without a fake kernel: compute for real instead
            ShapeProp(gm).propagate(*example_inputs)
    return gm
