"""Trace a model with torch.fx and record every node's tensor shapes.

``trace`` keeps strfx's own STR modules and configured leaf modules as single ``call_module``
nodes. ``record_shapes`` runs the graph on *fake* tensors (no real compute, no memory for
activations) and stores ``node.meta["tensor_meta"]`` like ``torch.fx.passes.shape_prop.ShapeProp``;
the tensor metadata (unlike a FakeTensor) survives deepcopy and pickling.

Models are traced in eval mode: branches that exist only in training (auxiliary heads) are not part
of the graph. Modules whose behaviour depends on the mode (``StochasticDepth``) are leaves by default
so the traced graph still switches with ``.train()``/``.eval()``.
"""

from __future__ import annotations

import fnmatch
import os
import traceback
from typing import Any, Sequence

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
        was_training = model.training
        model.eval()
        try:
            graph = tracer.trace(model, concrete_args=config.concrete_args or None)
        except Exception as err:  # noqa: BLE001 - FX raises many kinds; all become one clear line
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__}{_user_frame(err)}: {msg}; "
                "make the module containing it a leaf (sparsify.trace.leaf_modules) or fix the "
                "argument it depends on (sparsify.trace.concrete_args)"
            ) from err
        finally:
            model.train(was_training)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        gm.train(was_training)
    if example_inputs is not None:
        record_shapes(gm, example_inputs)
    return gm


def _to_meta(value: Any) -> Any:
    return tree_map(lambda v: _extract_tensor_metadata(v) if isinstance(v, torch.Tensor) else v, value)


def record_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Store ``node.meta["tensor_meta"]`` for every node, computing on fake tensors when possible.

    Falls back to a real forward pass (``ShapeProp``) for ops without a fake implementation.
    Runs in eval mode so that BatchNorm running statistics are not touched.
    """
    was_training = gm.training
    gm.eval()
    try:
        try:
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=True)
            fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
            FakeTensorProp(gm, mode).propagate(*fake_inputs)
            for node in gm.graph.nodes:
                if "val" in node.meta:
                    node.meta["tensor_meta"] = _to_meta(node.meta.pop("val"))
        except Exception:  # noqa: BLE001 - an op without a fake kernel: compute for real instead
            with torch.no_grad():
                ShapeProp(gm).propagate(*example_inputs)
    finally:
        gm.train(was_training)
    return gm
