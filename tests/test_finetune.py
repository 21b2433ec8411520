"""Fine-tune after shrink (`--finetune-epochs`) and the input contract in every exported ONNX file (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from strfx.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("finetune")
    cfg = tmp / "cfg.yaml"
    cfg.write_text("train: {batch_size: 64, max_steps_per_epoch: 6}\n")
    res = CliRunner().invoke(main, ["train", str(ROOT / "examples" / "lenet300.py"), "--mode", "structured", "--data",
                                    "demo", "--epochs", "1", "--config", str(cfg), "-o", str(tmp / "run"),
                                    "--finetune-epochs", "1"])
    assert res.exit_code == 0, res.output
    assert "finetune   1 epochs of the shrunk model" in res.output
    return tmp / "run"


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_finetuned_model_is_exported_and_scores_what_training_printed(run: Path) -> None:
    ft = json.loads((run / "summary.json").read_text())["finetune"]
    assert (run / "model.onnx").is_file()  # --finetune-epochs implies --export
    assert ft["val_top1"] >= ft["val_top1_before"] - 0.02 and ft["val_top1"] > 0.2  # no collapse, above chance (10 %)
    assert ft["onnx_max_error"] <= ft["tolerance"]
    for source in (run / "finetuned" / "model.onnx", run / "finetuned"):
        res = CliRunner().invoke(main, ["eval", str(source), "--data", "demo", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["top1"] == pytest.approx(ft["val_top1"], abs=1e-9)
    assert not list(run.glob(".finetuned*"))  # nothing half-written left behind


def test_every_exported_onnx_carries_the_input_contract(run: Path, tmp_path: Path) -> None:
    contract = json.loads((run / "input_contract.json").read_text())
    for path in (run / "model.onnx", run / "finetuned" / "model.onnx"):  # Trainer.export, the fine-tuned export
        assert json.loads(_props(path)["strfx.input_contract"]) == contract
    res = CliRunner().invoke(main, ["export", str(run), "--onnx", str(tmp_path / "m.onnx"), "--repeats", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads(_props(tmp_path / "m.onnx")["strfx.input_contract"]) == contract  # strfx export too
    assert "input (in the ONNX metadata): (pixel / 255" in res.output


def test_finetune_lr_needs_finetune_epochs(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["train", str(ROOT / "examples" / "lenet300.py"), "--data", "demo",
                                    "-o", str(tmp_path / "r"), "--finetune-lr", "0.01"])
    assert res.exit_code == 2 and "--finetune-lr needs --finetune-epochs" in res.output
    assert not (tmp_path / "r").exists()


def test_finetune_keeps_the_pruned_weights_of_an_unstructured_model_at_zero() -> None:
    import torch

    from strfx.data import load_data
    from strfx.finetune import finetune

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        model[1].weight[torch.rand_like(model[1].weight) < 0.7] = 0.0  # what an unstructured run leaves behind
    zeros = model[1].weight == 0
    before = model[1].weight.detach().clone()
    kw = dict(epochs=1, batch_size=64, lr=0.05, momentum=0.875, weight_decay=1e-4, label_smoothing=0.1,
              grad_clip_norm=5.0, device=torch.device("cpu"), max_steps_per_epoch=5, log=lambda _: None)
    rows = finetune(model, load_data("demo"), keep_zeros=True, **kw)
    assert rows[0]["val_top1"] > 0.2
    assert bool((model[1].weight[zeros] == 0).all())  # still exactly zero...
    assert not torch.equal(model[1].weight[~zeros], before[~zeros])  # ...while the others trained
