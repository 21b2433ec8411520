"""Declare torchvision's missing operator schemas before torchvision imports (see strfx/_torchvision.py).

Kept apart from ``strfx._torchvision`` so that the import hook ``strfx`` installs can run it while
``import torchvision`` is under way, without importing torchvision itself.
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


def prepare() -> None:
    """Load torchvision's compiled ops, or declare their schemas where they cannot load (idempotent)."""
    if not _compiled_ops_load():
        _declare_missing_schemas()
