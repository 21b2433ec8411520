"""strfx's torch.fx passes, one file each. Each takes and returns a ``torch.fx.GraphModule`` and
writes what it learns into ``node.meta`` (the ``torch.fx.passes.shape_prop`` convention)."""

from .insert_str import insert_str
from .trace import StrfxTracer, record_shapes, trace

__all__ = ["StrfxTracer", "insert_str", "record_shapes", "trace"]
