"""`strfx --help` and `--version` answer without importing torch (issue 13, defect 9)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from strfx.cli import main
try:
    main({args!r})
except SystemExit as e:
    assert not e.code, e.code
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy', 'onnx'))
print('HEAVY', heavy)
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"], ["export", "--help"]])
def test_help_and_version_import_no_torch(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-300:]
    if args == ["--version"]:
        import strfx

        assert strfx.__version__ in proc.stdout


def test_public_names_load_on_first_use() -> None:
    """Lazy names are the functions (not the submodules of the same name), whatever was imported first."""
    code = ("import strfx, strfx.report, strfx.export, types\n"
            "assert callable(strfx.report) and not isinstance(strfx.report, types.ModuleType)\n"
            "assert callable(strfx.export) and not isinstance(strfx.export, types.ModuleType)\n"
            "assert strfx.sparsify.__module__ == 'strfx.api' and 'shrink' in dir(strfx)\n"
            "import torchvision\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
