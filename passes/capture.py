"""Capture a model as one ATen graph with ``torch.export`` — the only front end strfx has.

``capture`` exports the model (non-strict by default, every submodule in eval mode so BatchNorm
uses its running statistics and dropout is off), runs ``run_decompositions({})`` to make the graph
functional (an in-place op through a view becomes explicit data flow, so no write can hide from the
analysis) and returns the unlifted ``GraphModule`` of ``ExportedProgram.module()``:

* parameters and buffers are ``get_attr`` nodes whose target is their qualified name in the
  user's model (``layer1.0.bn1.weight``), which is how a channel group maps back to parameters;
* every node carries its output as a fake tensor in ``node.meta["val"]`` (shapes, dtypes);
* ``node.meta["nn_module_stack"]`` names the module each op came from;
* keyword calls, computed dims and module classes are normalised away: ``conv(input=y)`` is an
  ``aten.conv2d`` like any other, ``BatchNormAct2d`` is a batch norm followed by an activation.

The graph is used to analyse and to cut, never to train: training runs the user's own module.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import traceback
import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from strfx.config import CaptureConfig
from strfx.errors import TraceError


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode, then each back to its own mode (mixed modes survive)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in modes:  # not .eval(): an exported program's module refuses it
            m.training = False
        yield
    finally:
        for m, training in modes:
            m.training = training


import strfx as _strfx  # noqa: E402

_LIB_DIRS = tuple(os.path.dirname(p) + os.sep for p in (torch.__file__, __file__, _strfx.__file__))


def _generated(filename: str) -> bool:
    return filename.startswith("<")  # <string>, <frozen ...>, <eval_with_key>: no source to point at


def _user_frame(err: BaseException, libraries: bool = False) -> str:
    """`` at file:line `code` `` of the user's code where capture failed, if torch.export says.

    With ``libraries``, a model from an installed package (HF transformers, timm) counts as the
    user's code: only torch's and strfx's own frames are skipped.
    """
    def outside(f: traceback.FrameSummary) -> bool:
        return not (f.filename.startswith(_LIB_DIRS) or _generated(f.filename)
                    or (not libraries and "site-packages" in f.filename))

    frames = [f for f in traceback.extract_tb(err.__traceback__) if outside(f)]
    if frames:
        f = frames[-1]
        return f" at {f.filename}:{f.lineno} `{(f.line or '').strip()}`"
    # torch.export's own messages quote the user's frame as 'File "x.py", line N'
    found = [m for m in re.finditer(r'File "([^"]+)", line (\d+)', str(err))
             if not m.group(1).startswith(_LIB_DIRS) and not _generated(m.group(1))]
    return f" at {found[-1].group(1)}:{found[-1].group(2)}" if found else ""


def _eager_failure(model: nn.Module, inputs: tuple[Any, ...]) -> BaseException | None:
    """Why the model itself fails on ``inputs`` (in eval mode, no grad), or None if it runs."""
    try:
        with eval_mode(model), torch.no_grad(), quiet():
            model(*inputs)
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward
        return err
    return None


def _first_line(err: BaseException) -> str:
    for line in str(err).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.export and the ONNX exporters log warnings, print progress and dump graphs while they work
    (and when they fail); a user gets strfx's one line instead."""
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _describe(inputs: tuple[Any, ...]) -> str:
    return ", ".join(f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}" if isinstance(x, torch.Tensor)
                     else type(x).__name__ for x in inputs)


def as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def export(model: nn.Module, example_inputs: Sequence[Any], config: CaptureConfig | None = None,
           dynamic_batch: bool | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` in eval mode, functional ATen ops; one-line :class:`TraceError` on failure."""
    config = config or CaptureConfig()
    inputs = as_inputs(example_inputs)
    dynamic = config.dynamic_batch if dynamic_batch is None else dynamic_batch
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1)
        shapes = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)
    try:
        with eval_mode(model), quiet():
            ep = torch.export.export(model, inputs, strict=config.strict, dynamic_shapes=shapes)
            return ep.run_decompositions({})
    except Exception as err:  # noqa: BLE001 - export raises many kinds; all become one clear line
        eager = _eager_failure(model, inputs)
        if eager is not None:  # not a capture problem: the model does not take these inputs
            raise TraceError(
                f"{type(model).__name__} fails on the example inputs{_user_frame(eager, libraries=True)}: "
                f"{_first_line(eager)}; pass inputs the model's own forward accepts "
                f"(given: {_describe(inputs)})") from err
        raise TraceError(
            f"torch.export cannot capture {type(model).__name__}{_user_frame(err)}: {_first_line(err)}; "
            "strfx needs a model torch.export can capture (no data-dependent Python control flow: use "
            "torch.cond, or make the branch depend on shapes only)"
        ) from err


def capture(model: nn.Module, example_inputs: Sequence[Any], config: CaptureConfig | None = None) -> fx.GraphModule:
    """The ATen ``GraphModule`` of ``model`` on ``example_inputs`` (``model`` is left unchanged).

    Parameters and buffers of the result are the model's own tensors (shared, not copied).
    """
    ep = export(model, example_inputs, config, dynamic_batch=False)
    gm = ep.module()
    gm.meta["strfx_capture"] = {"params": dict(ep.graph_signature.inputs_to_parameters),
                                "buffers": dict(ep.graph_signature.inputs_to_buffers)}
    return gm
