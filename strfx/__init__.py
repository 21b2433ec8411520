"""strfx: learnable sparsity (Soft Threshold Reparameterization) for any torch.fx-traceable model."""

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
