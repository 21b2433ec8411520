"""`strfx eval SOURCE --data DATA` on a run directory, a shrink output, .onnx and .pt2 (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from strfx.cli import main
from strfx.errors import StrfxError
from strfx.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("eval")
    cfg = tmp / "cfg.yaml"
    cfg.write_text("train: {batch_size: 64, max_steps_per_epoch: 6}\n")
    res = CliRunner().invoke(main, ["train", str(ROOT / "examples" / "lenet300.py"), "--mode", "structured", "--data",
                                    "demo", "--epochs", "1", "--config", str(cfg), "-o", str(tmp / "run"), "--export"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["shrink", str(tmp / "run"), "-o", str(tmp / "shrunk")])
    assert res.exit_code == 0, res.output
    return tmp


@pytest.mark.parametrize("source", ["run", "shrunk", "run/model.onnx", "run/model.pt2"])
def test_every_source_scores_what_training_printed(trained: Path, source: str) -> None:
    summary = json.loads((trained / "run" / "summary.json").read_text())
    res = CliRunner().invoke(main, ["eval", str(trained / source), "--data", "demo", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["images"] == 1000 and out["contract_from"] is not None
    assert out["top1"] == pytest.approx(summary["val_top1"], abs=1e-9)  # same preprocessing, same model
    assert "/ 255" in out["preprocessing"]


def test_recorded_contract_wins_over_the_data_statistics(trained: Path, tmp_path: Path) -> None:
    contract = json.loads((trained / "run" / "input_contract.json").read_text())
    contract["mean"], contract["std"] = [0.9], [0.05]  # a wrong contract must change the result
    (tmp_path / "c.json").write_text(json.dumps(contract))
    good = evaluate(trained / "run" / "model.pt2", "demo")
    bad = evaluate(trained / "run" / "model.pt2", "demo", contract_path=tmp_path / "c.json")
    assert bad.top1 < good.top1 - 0.2


def test_bad_sources_are_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "nope.onnx"), "--data", "demo"])
    assert res.exit_code == 2 and res.output.startswith("error:") and "does not exist" in res.output
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(StrfxError, match="onnxruntime cannot load"):
        evaluate(tmp_path / "junk.onnx", "demo")
    res = CliRunner().invoke(main, ["eval", str(tmp_path)])
    assert res.exit_code == 2 and "needs --data" in res.output
