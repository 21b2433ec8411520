"""An installed wheel (not only the editable checkout) provides strfx and strfx.passes."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_passes_as_a_subpackage(tmp_path: Path) -> None:
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, timeout=300, capture_output=True)
    (wheel,) = wheels.glob("strfx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "strfx/passes/insert_str.py" in names
    assert "strfx/integrations/lightning.py" in names and "strfx/integrations/hf.py" in names
    assert not any(n.startswith("passes/") for n in names)  # nothing called `passes` at the top level
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    code = (
        "import strfx, strfx.passes, sys\n"
        f"assert strfx.__file__.startswith({str(target)!r}), strfx.__file__\n"
        f"assert strfx.passes.__file__.startswith({str(target)!r}), strfx.passes.__file__\n"
        "from strfx._torchvision import torchvision\n"
        "import torch\n"
        "gm = strfx.sparsify(torchvision.models.resnet18(), 'structured', example_inputs=torch.randn(1, 3, 64, 64))\n"
        "print(len(strfx.report(gm).layers))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "20"  # resnet18 has 20 BatchNorms
    readme = ("import strfx, torchvision, torch; "  # torchvision after strfx: the schema shim runs first
              "strfx.sparsify(torchvision.models.resnet18(), example_inputs=torch.randn(1, 3, 64, 64))")
    proc = subprocess.run([sys.executable, "-c", readme], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
