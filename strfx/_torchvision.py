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

from strfx._tvshim import prepare

prepare()

import torchvision  # noqa: E402

COMPILED_OPS = torchvision.extension._has_ops()

__all__ = ["torchvision", "COMPILED_OPS"]
