"""The one place strfx imports torchvision.

Why this exists: on CPU-only machines the only torchvision wheel matching the installed torch
may be a CUDA build whose compiled extension (``torchvision._C``) cannot load. torchvision
then still registers fake kernels for ``torchvision::nms``/``qnms`` at import time, which fails
with ``RuntimeError: operator torchvision::nms does not exist`` and makes *every* import of
torchvision fail, although models and transforms need none of its compiled ops.

We first try to load the compiled ops the way torchvision does. Only when that fails do we
declare the missing operator schemas (no kernels), so the import succeeds. Models and
transforms then work; nms, detection models and jpeg decoding do not (they raise when called).
On a machine with a matching torchvision build this module does nothing special.
"""

from __future__ import annotations

import importlib.util
import os

import torch

# Schemas as torchvision declares them (torchvision/csrc/ops/nms.cpp); only the ops whose fake
# kernels torchvision registers unconditionally at import time are needed.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_fallback_lib: torch.library.Library | None = None


def _compiled_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = list(spec.submodule_search_locations)[0]
    for name in os.listdir(folder):
        if name.startswith("_C") and name.endswith((".so", ".pyd")):
            try:
                torch.ops.load_library(os.path.join(folder, name))
                return True
            except (OSError, RuntimeError, ImportError):
                return False
    return False


def _declare_missing_schemas() -> None:
    global _fallback_lib
    missing = [op for op in _SCHEMAS if not hasattr(torch.ops.torchvision, op)]
    if not missing:
        return
    _fallback_lib = torch.library.Library("torchvision", "FRAGMENT")  # kept alive on purpose
    for op in missing:
        _fallback_lib.define(_SCHEMAS[op])


if not _compiled_ops_load():
    _declare_missing_schemas()

import torchvision  # noqa: E402

COMPILED_OPS = torchvision.extension._has_ops()

__all__ = ["torchvision", "COMPILED_OPS"]
