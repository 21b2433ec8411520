"""strfx: learnable sparsity (Soft Threshold Reparameterization) for any model torch.export can capture.

The public names below are imported on first use (PEP 562), so that ``import strfx`` — and with it
``strfx --help`` / ``strfx --version`` — does not pay for importing torch and torchvision.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
    from strfx.api import check_equivalent, param_groups, sparsify
    from strfx.config import SparsifyConfig, StrfxConfig, load_config
    from strfx.errors import StrfxError
    from strfx.export import ExportReport, export
    from strfx.report import Report, report
    from strfx.rewind import dead_masks, rewind
    from strfx.surgery import ShrinkReport, shrink

__version__ = "0.1.0"

_API = {
    "check_equivalent": "strfx.api", "param_groups": "strfx.api", "sparsify": "strfx.api",
    "SparsifyConfig": "strfx.config", "StrfxConfig": "strfx.config", "load_config": "strfx.config",
    "StrfxError": "strfx.errors",
    "ExportReport": "strfx.export", "export": "strfx.export",
    "Report": "strfx.report", "report": "strfx.report",
    "ShrinkReport": "strfx.surgery", "shrink": "strfx.surgery",
    "dead_masks": "strfx.rewind", "rewind": "strfx.rewind",
}

__all__ = sorted(_API)


class _Package(types.ModuleType):
    """The ``strfx`` module: public names load lazily; submodules never shadow a function of their name."""

    def __getattr__(self, name: str) -> Any:
        if name not in _API:
            raise AttributeError(f"module 'strfx' has no attribute {name!r}")
        importlib.import_module("strfx._torchvision")  # before anything can import torchvision
        value = getattr(importlib.import_module(_API[name]), name)
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the submodule strfx.export (or strfx.report) binds it on the package; the public
        # name is the function of the same name, as it was when this file imported everything eagerly.
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_API))


sys.modules[__name__].__class__ = _Package

class _TorchvisionShim:
    """``import torchvision`` after ``import strfx`` declares the missing operator schemas first
    (strfx/_torchvision.py says why), without strfx importing torch before it is needed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torchvision" and "torchvision" not in sys.modules:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            importlib.import_module("strfx._tvshim").prepare()
        return None  # the normal import goes on


if "torch" in sys.modules:  # torch is paid for already: make `import torchvision` safe right away
    importlib.import_module("strfx._torchvision")
elif "torchvision" not in sys.modules:
    sys.meta_path.insert(0, _TorchvisionShim())
