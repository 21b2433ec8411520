"""`strfx train --rewind start|ramp --finetune-epochs N`: STR picks the units, earlier weights are trained."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import strfx
from strfx.cli import main
from strfx.config import load_config
from strfx.data import load_data
from strfx.finetune import evaluate_module
from strfx.loader import load_model
from strfx.rundir import load_run
from strfx.safeload import load_tensors
from strfx.train import REWIND_FILE, resolve_config

ROOT = Path(__file__).resolve().parents[1]
LENET300 = str(ROOT / "examples" / "lenet300.py")


def _train(tmp: Path, *extra: str, mode: str = "structured") -> CliRunner:
    cfg = tmp / "cfg.yaml"  # an early ramp: 120 steps are too few for the rewind default (60 → 90 %) to land 50 %
    cfg.write_text("train: {batch_size: 64, max_steps_per_epoch: 40, controller: {ramp_start: 0.05, ramp_end: 0.6}}\n")
    return CliRunner().invoke(main, ["train", LENET300, "--mode", mode, "--data", "demo", "--epochs", "3",
                                     "--config", str(cfg), "-o", str(tmp / "run"), "--target-sparsity", "0.5",
                                     "--finetune-epochs", "1", *extra])


@pytest.fixture(scope="module")
def ramp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("rewind")
    res = _train(tmp, "--rewind", "ramp")
    assert res.exit_code == 0, res.output
    assert "epochs of STR's units cut from the weights of step" in res.output
    return tmp / "run"


def test_rewound_model_is_strs_units_cut_from_the_saved_earlier_weights(ramp_run: Path) -> None:
    summary = json.loads((ramp_run / "summary.json").read_text())
    ft = summary["finetune"]
    rw = ft["rewind"]
    assert rw["to"] == "ramp" and rw["step"] == math.ceil(0.05 * (3 * 40))  # controller.ramp_start of the run's steps
    assert rw["dead"] == summary["str_zeros"] > 0  # every unit STR killed, nothing else
    assert ft["params"] == summary["export"]["params_after"]  # the same units cut as from the trained weights
    assert rw["shrink_max_error64"] < 1e-12

    # Rebuilt independently from the run directory: trained weights → dead units; saved state → the rest.
    trained, loaded, _ = load_run(ramp_run)
    early = load_tensors(ramp_run / REWIND_FILE, "rewind state", "")
    strfx.rewind(trained, early)
    small = strfx.shrink(trained.eval(), loaded.example_inputs)
    data = load_data("demo", None, image_size=(28, 28), channels=1)
    before = evaluate_module(small, data, torch.device("cpu"))["val_top1"]
    assert before == pytest.approx(ft["val_top1_before"], abs=1e-9)
    assert ft["val_top1"] > 0.5  # the rewound model trains (10 classes)


def test_unstructured_rewind_keeps_strs_zeros_through_the_retraining(tmp_path: Path) -> None:
    """The default for an unstructured run with a target and a retraining: STR's zeros, the earlier weights."""
    res = _train(tmp_path, mode="unstructured")  # rewind: auto
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    ft = summary["finetune"]
    rw = ft["rewind"]
    assert rw["to"] == "ramp" and rw["dead"] == summary["str_zeros"] > 0.4 * rw["entries"]
    assert rw["shrink_max_error64"] < 1e-12
    assert 0 < ft["weights_nonzero"] <= rw["entries"] - rw["dead"]  # nothing STR killed came back
    assert ft["val_top1"] > 0.5


def test_rewind_ramp_trains_unpushed_for_most_of_the_run_unless_told_otherwise() -> None:
    loaded = load_model(LENET300)
    cfg = resolve_config(loaded, "structured", {}, rewind="ramp", target_sparsity=0.5)
    assert (cfg.train.controller.ramp_start, cfg.train.controller.ramp_end) == (0.6, 0.9)  # docs/results.md, rewind
    own = resolve_config(loaded, "structured", {"train": {"controller": {"ramp_start": 0.1}}}, rewind="ramp",
                         target_sparsity=0.5)
    assert (own.train.controller.ramp_start, own.train.controller.ramp_end) == (0.1, 0.6)  # the user's ramp wins
    assert resolve_config(loaded, "structured", {}, target_sparsity=0.5).train.controller.ramp_start == 0.05


def test_rewind_start_saves_the_initial_weights(tmp_path: Path) -> None:
    res = _train(tmp_path, "--rewind", "start", "--epochs", "1")
    assert res.exit_code == 0, res.output
    early = load_tensors(tmp_path / "run" / REWIND_FILE, "rewind state", "")
    config = load_config(tmp_path / "run" / "config.yaml")
    torch.manual_seed(config.train.seed)  # what the run did before building the model: its initial weights
    loaded = load_model(LENET300)
    initial = strfx.sparsify(loaded.model, config=config.sparsify, example_inputs=loaded.example_inputs, verify=False)
    for key, value in initial.state_dict().items():
        torch.testing.assert_close(early[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(("extra", "message"), [
    (["--rewind", "start"], "needs --finetune-epochs N"),
    (["--rewind", "ramp", "--finetune-epochs", "1"], "--rewind ramp rewinds to where the --target-sparsity"),
    (["--rewind", "start", "--finetune-epochs", "1", "--mode", "lowrank"], "does not apply to low-rank STR"),
])
def test_rewind_refuses_what_it_cannot_do(tmp_path: Path, extra: list[str], message: str) -> None:
    res = CliRunner().invoke(main, ["train", LENET300, "--data", "demo", "-o", str(tmp_path / "r"), *extra])
    assert res.exit_code != 0 and message in res.output and res.output.count("\n") <= 2, res.output
    assert not (tmp_path / "r").exists()


def test_rewind_auto_is_ramp_for_runs_with_a_target_and_a_retraining() -> None:
    loaded = load_model(LENET300)
    auto = {(mode, target, ft): resolve_config(loaded, mode, {}, ft, target_sparsity=target).train.rewind
            for mode in ("structured", "unstructured", "structured+lowrank") for target in (None, 0.5) for ft in (0, 2)}
    assert [k for k, v in auto.items() if v == "ramp"] == [("structured", 0.5, 2), ("unstructured", 0.5, 2)]
    assert set(auto.values()) == {"ramp", "off"}
    assert resolve_config(loaded, "structured", {}, 2, target_sparsity=0.5, rewind="off").train.rewind == "off"
