"""Tables print as text from Python and do not wrap or truncate when piped (issue 13, defects 7 and 14)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import strfx

LONG = "a_rather_long_layer_name_that_a_real_model_might_well_have_in_it"


class Long(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.add_module(LONG, nn.Linear(8, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(getattr(self, LONG)(x)))


def test_report_table_prints_as_text() -> None:
    gm = strfx.sparsify(Long(), "unstructured", example_inputs=(torch.randn(2, 8),))
    text = str(strfx.report(gm).table())
    assert "rich.table.Table object" not in text
    assert f"{LONG}.weight" in text and "head.weight" in text and "sparsity" in text
    assert "\x1b[" not in text  # plain text, no colour codes
    lines = [ln for ln in text.splitlines() if LONG in ln]
    assert len(lines) == 1  # one row, not wrapped


def test_piped_cli_tables_keep_long_names_on_one_line(write_model, tmp_path: Path) -> None:
    model = write_model(
        "import torch\nfrom torch import nn\n"
        "class Long(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        f"        self.{LONG} = nn.Linear(8, 16)\n        self.head = nn.Linear(16, 4)\n"
        f"    def forward(self, x):\n        return self.head(torch.relu(self.{LONG}(x)))\n"
        "def build_model():\n    return Long()\n"
        "def example_inputs():\n    return (torch.randn(2, 8),)\n")
    proc = subprocess.run([sys.executable, "-m", "strfx", "inspect", str(model)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if LONG in ln]
    assert len(rows) == 1 and "STR on weight" in rows[0] and "importance vector" in rows[0], proc.stdout
    assert "…" not in proc.stdout
