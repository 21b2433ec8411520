"""A rich ``Table`` that also prints with plain ``print()``.

``print(strfx.report(gm).table())`` is the README's way to look at a report from Python; a bare
``rich.table.Table`` prints as ``<rich.table.Table object at …>``. This subclass renders itself as
text in ``str()`` (no colour codes, wide enough not to wrap), while ``rich``'s own consoles — the
CLI — still print it with styles.
"""

from __future__ import annotations

import io
import shutil
import sys

from rich.console import Console
from rich.table import Table as _RichTable


def text_width() -> int:
    """Terminal width on a terminal; when piped, wide enough that tables neither wrap nor truncate."""
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return 200


class Table(_RichTable):
    """``rich.table.Table`` whose ``str()`` is the rendered table."""

    def __str__(self) -> str:
        console = Console(file=io.StringIO(), width=text_width(), color_system=None, force_terminal=False,
                          highlight=False)
        console.print(self)
        return console.file.getvalue().rstrip("\n")  # type: ignore[attr-defined]


def make_console(stderr: bool = False) -> Console:
    """A rich console for the CLI: styled on a terminal; when piped, wide (no wrapping or truncated names)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 200)
