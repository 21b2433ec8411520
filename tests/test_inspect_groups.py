"""`strfx inspect MODEL --groups`: channel groups with size, members and what blocks them."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from strfx.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_inspect_groups_table_and_json() -> None:
    res = CliRunner().invoke(main, ["inspect", str(EXAMPLES / "custom_residual.py"), "--groups"])
    assert res.exit_code == 0, res.output
    assert "channel groups of custom_residual" in res.output and "model output" in res.output
    assert "5 groups, 4 prunable, 1 blocked" in res.output
    res = CliRunner().invoke(main, ["inspect", str(EXAMPLES / "custom_residual.py"), "--groups", "--json"])
    rows = json.loads(res.output)
    residual = next(r for r in rows if any(m.startswith("stem.0") for m in r["members"]))
    # the stem, the block's second conv (residual add) and the SE's second conv share one group
    assert residual["channels"] == 16 and not residual["blocked_by"]
    assert any(m.startswith("block.conv2") for m in residual["members"])
    assert any(m.startswith("block.se.fc2") for m in residual["members"])
    head = next(r for r in rows if any(m.startswith("head (") for m in r["members"]) and r["blocked_by"])
    assert head["blocked_by"] == ["model output"]


def test_inspect_groups_bad_model_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing.py"), "--groups"])
    assert res.exit_code == 2 and "model file not found" in res.output
