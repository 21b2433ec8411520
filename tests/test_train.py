"""strfx train on one process: recipe, controller, data, run directory, checkpoints, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import strfx
from strfx.cli import main
from strfx.modules import channel_carriers
from strfx.config import parse_config
from strfx.controller import SparsityMeter, ThresholdDecayController
from strfx.data import demo_path, load_data
from strfx.errors import CheckpointError, DataError, OutputExistsError
from strfx.report import report
from strfx.rundir import load_run
from strfx.train import WarmupCosine, prepare, train
from strfx.train_config import ControllerConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(Path(__file__).with_name("tiny_model.py"))
LENET = str(ROOT / "examples" / "lenet5.py")
FAST = {"batch_size": 64, "workers": 0, "deterministic": True, "keep_checkpoints": None}


def _config(tmp_path: Path, **train: object) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"train": {**FAST, **train}}))
    return path


def test_recipe_defaults_follow_the_str_paper() -> None:
    tc = TrainConfig()
    assert (tc.momentum, tc.nesterov, tc.label_smoothing) == (0.875, False, 0.1)
    assert tc.peak_lr() == pytest.approx(0.256)
    assert TrainConfig(batch_size=1024).peak_lr() == pytest.approx(1.024)
    assert TrainConfig(epochs=100).warmup_epochs_for() == 5
    assert TrainConfig(epochs=3).warmup_epochs_for() == pytest.approx(0.6)
    assert tc.threshold_decay is None and tc.weight_decay > 0  # decay on the thresholds too, by default


def test_warmup_then_cosine_to_zero() -> None:
    f = WarmupCosine(10, 100)
    ramp = [f(i) for i in range(10)]
    assert ramp == sorted(ramp) and ramp[0] > 0
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=1e-6)
    assert f(100) == pytest.approx(0.0, abs=1e-12)


def test_controller_pushes_when_behind_and_backs_off_when_ahead() -> None:
    c = ThresholdDecayController(0.8, 1000, ControllerConfig(interval_steps=10), base_decay=1e-5, momentum=0.875)
    assert c.schedule(0) == 0 and c.schedule(1000) == pytest.approx(0.8)
    assert c.schedule(300) < c.schedule(500) < c.schedule(600) == pytest.approx(0.8)
    behind = c.update(300, measured=0.0, lr=0.1)
    assert behind > 1e-5
    ahead = ThresholdDecayController(0.8, 1000, ControllerConfig(interval_steps=10), 1e-5, 0.875).update(
        300, measured=0.79, lr=0.1)
    assert ahead < 0  # lowers thresholds: the run is ahead of its schedule
    # the decay compensates the learning rate, so |s| moves at the same pace whatever lr is
    c2 = ThresholdDecayController(0.8, 1000, ControllerConfig(interval_steps=10), 1e-5, 0.875)
    assert c2.update(300, 0.0, lr=0.05) == pytest.approx(2 * behind)
    # as the cosine schedule reaches lr = 0 the compensated decay stays within ±max_decay
    assert c2.update(999, 0.0, lr=1e-12) == 1.0
    assert c2.update(1000, 0.99, lr=1e-12) == -1.0


@pytest.mark.parametrize("mode", ["unstructured", "structured"])
def test_meter_measures_what_the_report_says(mode: str) -> None:
    from strfx.loader import load_model
    from strfx.modules import threshold_parameters

    lm = load_model(LENET)
    gm = strfx.sparsify(lm.model, mode, example_inputs=lm.example_inputs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in threshold_parameters(gm):
            s.copy_(torch.empty_like(s).uniform_(-6, 0.5, generator=gen) if mode == "structured" else
                    torch.empty_like(s).uniform_(-6, -3, generator=gen))
        for name, p in gm.named_parameters():
            if mode == "structured" and name.endswith("weight") and p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=gen))
    meter = SparsityMeter(gm, mode, lm.example_inputs)
    rep = report(gm, lm.example_inputs)
    assert 0.05 < meter() < 0.99
    if mode == "unstructured":
        assert meter() == pytest.approx(rep.sparsity, abs=1e-9)
    else:  # the FLOPs the shrunk model saves, not only the gated layers' own (LeNet-5: conv1, conv2, fc1 gates)
        from strfx.report import _per_module_flops

        dense, per_module = _per_module_flops(gm, lm.example_inputs)
        dead = {layer.name: layer.sparsity for layer in rep.layers}
        estimate = sum(per_module[n] * f for n, f in dead.items()) / dense
        assert meter.estimate(meter.layer_zeros()) == pytest.approx(estimate, abs=1e-9)
        exact = 1 - rep.shrunk_flops / rep.dense_flops
        assert exact > estimate + 0.05  # consumers of removed channels save FLOPs too
        assert meter() == pytest.approx(exact, abs=1e-9)
        # between re-measurements the estimate is rescaled; a changed pattern is re-measured exactly
        with torch.no_grad():
            channel_carriers(gm)["conv1"].raw[:5] = 0.0
        values = [meter() for _ in range(meter.exact_every)]
        assert values[-1] == pytest.approx(1 - report(gm, lm.example_inputs).shrunk_flops / dense, abs=1e-9)


def test_demo_data_is_shipped_with_attribution() -> None:
    d = load_data("demo")
    assert (len(d.train), len(d.val), d.num_classes) == (4000, 1000, 10)
    x, y = d.train[[0, 1, 2]]
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    counts = torch.bincount(d.train.labels)
    assert counts.tolist() == [400] * 10
    readme = (demo_path().parent / "README.md").read_text()
    assert "LeCun" in readme and "Cortes" in readme and "Attribution-Share Alike 3.0" in readme


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = {"x_train": rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8), "y_train": np.arange(20) % 3,
            "x_test": rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8), "y_test": np.arange(6) % 3}
    d = load_data(f"npz:{_npz(tmp_path / 'hwc.npz', **good)}")
    assert d.train[[0]][0].shape == (1, 3, 8, 8) and d.num_classes == 3  # N×H×W×C became N×C×H×W
    with pytest.raises(DataError, match=r"lacks array\(s\) y_test"):
        load_data(f"npz:{_npz(tmp_path / 'missing.npz', **{k: v for k, v in good.items() if k != 'y_test'})}")
    with pytest.raises(DataError, match="y_train has shape"):
        load_data(f"npz:{_npz(tmp_path / 'short.npz', **{**good, 'y_train': np.arange(5)})}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        load_data(f"npz:{tmp_path / 'junk.npz'}")


@pytest.mark.parametrize("spec, message", [
    ("npz:{tmp}/nope.npz", "data file not found: {tmp}/nope.npz"),
    ("mnist:{tmp}/nodir", "data folder not found: {tmp}/nodir"),
    ("mnist:{tmp}", "no mnist data under {tmp}"),
    ("cifar10:{tmp}", "no cifar10 data under {tmp}"),
    ("imagefolder:{tmp}", "{tmp} has no train/ folder"),
    ("s3://bucket/x", "unknown --data 's3://bucket/x'"),
])
def test_missing_or_unknown_data_names_the_path(tmp_path: Path, spec: str, message: str) -> None:
    with pytest.raises(DataError) as err:
        load_data(spec.format(tmp=tmp_path))
    assert message.format(tmp=tmp_path) in str(err.value)
    assert "\n" not in str(err.value)


def test_class_count_mismatch_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 255, (300, 28, 28), dtype=np.uint8), "y_train": np.arange(300) % 7,
              "x_test": rng.integers(0, 255, (10, 28, 28), dtype=np.uint8), "y_test": np.arange(10) % 7}
    path = _npz(tmp_path / "seven.npz", **arrays)
    with pytest.raises(DataError, match="lenet5 outputs 10 classes but npz:.*seven.npz has 7"):
        prepare(LENET, f"npz:{path}", "unstructured", run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written for a refused run


def _cli(*args: str) -> "CliRunner.Result":
    return CliRunner().invoke(main, ["train", *args], catch_exceptions=False)


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    res = _cli(LENET, "--data", f"npz:{tmp_path}/absent.npz", "-o", str(tmp_path / "run"))
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: data file not found") and "absent.npz" in lines[0]
    assert "Traceback" not in res.output
    res = _cli(LENET, "--data", "demo", "--nnodes", "2", "-o", str(tmp_path / "run"))
    assert res.exit_code == 2 and "--rdzv-endpoint" in res.output


def _run(tmp_path: Path, name: str, *extra: str, config: Path | None = None, env: dict | None = None,
         epochs: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "strfx.cli", "train", TINY, "--mode", "unstructured", "--epochs", str(epochs),
           "--config", str(config or _config(tmp_path)), "-o", str(tmp_path / name), *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)


def test_run_directory_is_complete_and_loadable(tmp_path: Path) -> None:
    res = train(TINY, None, "unstructured", config=_config(tmp_path), run_dir=tmp_path / "r", epochs=3)
    run = res.run_dir
    for f in ("config.yaml", "weights.pt", "report.json", "summary.json", "metrics.jsonl", "budget.png"):
        assert (run / f).is_file(), f
    assert (run / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"epoch-000{i}.pt" for i in (1, 2, 3)]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("train_loss", "train_top1", "val_top1", "lr", "sparsity", "layers"):
        assert key in rows[-1]
    assert set(rows[-1]["layers"]) == {"0.weight", "4.weight", "6.weight"}
    assert rows[-1]["val_top1"] > 0.6  # it learned (4 classes: chance is 0.25)
    gm, _, cfg = load_run(run)
    assert cfg.train is not None and cfg.train.epochs == 3 and cfg.sparsify.mode == "unstructured"
    rep = report(gm)
    assert rep.sparsity == pytest.approx(res.summary["sparsity"])
    assert json.loads((run / "report.json").read_text())["zeros"] == rep.zeros
    ckpt = torch.load(run / "checkpoints" / "epoch-0003.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "rng", "config", "controller"} <= set(ckpt)
    assert ckpt["epoch"] == 3


def test_existing_run_dir_needs_resume_or_force(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    with pytest.raises(OutputExistsError, match="--resume .* --force"):
        prepare(TINY, None, "unstructured", config=_config(tmp_path), run_dir=tmp_path / "r")
    res = _cli(TINY, "--config", str(_config(tmp_path)), "-o", str(tmp_path / "r"))
    assert res.exit_code == 2 and "already exists" in res.output


def test_resume_equals_uninterrupted_and_corrupt_checkpoint_is_an_error(tmp_path: Path) -> None:
    cfg = _config(tmp_path, target_sparsity=0.4)
    full = _run(tmp_path, "full", config=cfg, epochs=3)
    assert full.returncode == 0, full.stderr
    # killed (SIGKILL) in the middle of epoch 2, then continued with --resume
    killed = _run(tmp_path, "cut", config=cfg, epochs=3, env={"STRFX_FAULT_INJECT": "0:2:3"})
    assert killed.returncode == -9
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["epoch-0001.pt"]
    resumed = _run(tmp_path, "cut", "--resume", config=cfg, epochs=3)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a = torch.load(tmp_path / "full" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(ln) for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]

    # a corrupt newest checkpoint is a clear error, never a silent fresh start
    (tmp_path / "cut" / "checkpoints" / "epoch-0003.pt").write_bytes(b"garbage")
    bad = _run(tmp_path, "cut", "--resume", config=cfg, epochs=3)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp_path}/cut/checkpoints/epoch-0003.pt is corrupt or unreadable "
        + bad.stderr.split("unreadable ", 1)[1].strip()]
    assert "Traceback" not in bad.stderr

    # resuming with other settings is refused, naming the setting
    other = _run(tmp_path, "cut", "--resume", "--lr", "0.5", config=cfg, epochs=3)
    assert other.returncode == 2 and "train.lr: run has None, now 0.5" in other.stderr


def test_checkpoint_of_another_configuration_is_refused(tmp_path: Path) -> None:
    from strfx.train import load_checkpoint

    cfg = _config(tmp_path)
    assert _run(tmp_path, "a", config=cfg, epochs=1).returncode == 0
    ckpt = tmp_path / "a" / "checkpoints" / "epoch-0001.pt"
    other = parse_config({"model": "x.py", "train": FAST})
    with pytest.raises(CheckpointError, match="different configuration"):
        load_checkpoint(ckpt, other)


def test_imagefolder_layout(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    d = load_data(f"imagefolder:{tmp_path}", image_size=(8, 8))
    assert (len(d.train), len(d.val), d.num_classes) == (4, 4, 2)
    assert d.train[0][0].shape == (3, 8, 8) and d.val[3][1] == 1
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "bird")
    with pytest.raises(DataError, match="both splits need the same class folders"):
        load_data(f"imagefolder:{tmp_path}", image_size=(8, 8))


def test_structured_run_with_export_is_verified(tmp_path: Path) -> None:
    res = train(TINY, None, "structured", config=_config(tmp_path, target_sparsity=0.3, batch_size=32),
                run_dir=tmp_path / "s", epochs=15, export=True)
    ex = res.summary["export"]
    assert (tmp_path / "s" / "model.onnx").is_file() and (tmp_path / "s" / "model.pt2").is_file()
    assert ex["onnx_max_error"] <= ex["tolerance"] and ex["shrink_max_error"] <= ex["tolerance"]
    assert ex["params_after"] <= ex["params_before"]
    assert ex["channels_removed"] > 0  # the controller made it prune, and shrink removed what was dead
