"""strfx: learnable sparsity (Soft Threshold Reparameterization) for any torch.fx-traceable model."""

# First: makes `import torchvision` work after `import strfx` even where its compiled ops cannot load.
import strfx._torchvision  # noqa: F401,I001

from strfx.api import check_equivalent, param_groups, sparsify
from strfx.config import SparsifyConfig, StrfxConfig, load_config
from strfx.errors import StrfxError
from strfx.report import Report, report
from strfx.surgery import ShrinkReport, shrink

__version__ = "0.1.0"

__all__ = [
    "Report",
    "SparsifyConfig",
    "StrfxConfig",
    "ShrinkReport",
    "StrfxError",
    "check_equivalent",
    "load_config",
    "param_groups",
    "report",
    "shrink",
    "sparsify",
]
