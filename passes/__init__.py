"""strfx's graph passes over the ATen graph of ``torch.export``, one file each. A pass writes what it
learns into ``node.meta`` (the ``torch.fx.passes.shape_prop`` convention)."""

from .capture import capture, eval_mode, export
from .channel_analysis import analyze_channels
from .insert_str import insert_str
from .shrink import shrink_graph

__all__ = ["analyze_channels", "capture", "eval_mode", "export", "insert_str", "shrink_graph"]
