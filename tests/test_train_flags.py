"""`strfx train --lr --seed --init` (issue 13, "what users expect")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from strfx.cli import main

ROOT = Path(__file__).resolve().parents[1]
LENET300 = str(ROOT / "examples" / "lenet300.py")
LENET5 = str(ROOT / "examples" / "lenet5.py")


def _train(tmp_path: Path, name: str, *extra: str, model: str = LENET300):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train: {batch_size: 64, max_steps_per_epoch: 1}\n")
    return CliRunner().invoke(main, ["train", model, "--mode", "unstructured", "--data", "demo", "--epochs", "1",
                                     "--config", str(cfg), "-o", str(tmp_path / name), *extra])


def test_lr_and_seed_flags_set_the_recipe(tmp_path: Path) -> None:
    res = _train(tmp_path, "a", "--lr", "0.01", "--seed", "7")
    assert res.exit_code == 0, res.output
    train = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["train"]
    assert train["lr"] == 0.01 and train["seed"] == 7
    assert "lr 0.01" in res.output.splitlines()[0]


def test_init_loads_the_given_weights_strictly(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("lenet300_for_init", LENET300)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.0123)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    res = _train(tmp_path, "i", "--init", str(tmp_path / "init.pt"), "--lr", "1e-12")
    assert res.exit_code == 0, res.output
    state = torch.load(tmp_path / "i" / "weights.pt", weights_only=True)
    w = state["1.parametrizations.weight.original"]
    # lr ~0: still the init (STR stores |W| + g(s_init), g(-10) = 4.5e-5, so that it computes W exactly)
    torch.testing.assert_close(w, torch.full_like(w, 0.0123 + torch.sigmoid(torch.tensor(-10.0)).item()), rtol=0, atol=1e-6)
    cfg = yaml.safe_load((tmp_path / "i" / "config.yaml").read_text())
    assert cfg["train"]["init"] == str(tmp_path / "init.pt")


def test_init_of_another_model_is_one_line_naming_the_keys(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("lenet5_for_init", LENET5)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.save(mod.build_model().state_dict(), tmp_path / "lenet5.pt")
    res = _train(tmp_path, "m", "--init", str(tmp_path / "lenet5.pt"))
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --init {tmp_path / 'lenet5.pt'} does not fit lenet300: "
                                                   "missing 1.weight, 1.bias, 3.weight (+3 more); unexpected conv1.weight")
    assert not (tmp_path / "m").exists()
    (tmp_path / "bad.pt").write_bytes(b"junk")
    res = _train(tmp_path, "m", "--init", str(tmp_path / "bad.pt"))
    assert res.exit_code == 2 and "is corrupt or unreadable" in res.output and "weights_only" not in res.output


def test_resume_with_more_epochs_extends_a_finished_run(tmp_path: Path) -> None:
    from strfx.errors import CheckpointError
    from strfx.train import train

    tiny = str(Path(__file__).with_name("tiny_model.py"))
    cfg = {"train": {"batch_size": 64, "workers": 0, "max_steps_per_epoch": 2}}
    train(tiny, None, "unstructured", config=cfg, run_dir=tmp_path / "r", epochs=2)
    res = train(tiny, None, "unstructured", config=cfg, run_dir=tmp_path / "r", epochs=4, resume=True)
    rows = [__import__("json").loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[-1]["step"] == 8
    assert rows[1]["lr"] == 0 and rows[2]["lr"] > 0 and rows[3]["lr"] == 0  # stretched cosine, back to 0 at the end
    assert res.summary["epochs"] == 4
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["train"]["epochs"] == 4
    with pytest.raises(CheckpointError, match="has done 4 epochs already.*at least 4"):
        train(tiny, None, "unstructured", config=cfg, run_dir=tmp_path / "r", epochs=3, resume=True)


def test_tensorboard_scalars_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the `tensorboard` extra installed, every epoch's numbers go to RUN_DIR/tensorboard (a stand-in
    SummaryWriter here; the real one is exercised when tensorboard is installed)."""
    import sys
    import types

    from strfx.train import train

    calls: list[tuple[str, float, int]] = []

    class Writer:
        def __init__(self, logdir: str) -> None:
            calls.append(("logdir", 0.0, 0)) if logdir.endswith("tensorboard") else None

        def add_scalar(self, key: str, value: float, step: int) -> None:
            calls.append((key, value, step))

        def flush(self) -> None: ...

        def close(self) -> None: ...

    try:
        import torch.utils.tensorboard  # noqa: F401 - real one installed: use it
        real = True
    except ImportError:
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
        real = False
    tiny = str(Path(__file__).with_name("tiny_model.py"))
    train(tiny, None, "unstructured", config={"train": {"batch_size": 64, "workers": 0, "max_steps_per_epoch": 2}},
          run_dir=tmp_path / "r", epochs=2)
    if real:
        assert any((tmp_path / "r" / "tensorboard").iterdir())
    else:
        assert calls[0][0] == "logdir"
        assert {(k, s) for k, _, s in calls if k in ("val_top1", "train_loss", "sparsity")} == {
            (k, s) for k in ("val_top1", "train_loss", "sparsity") for s in (1, 2)}


def test_example_yaml_is_a_valid_config_that_trains(tmp_path: Path) -> None:
    from strfx.config import load_config
    from strfx.train import train

    path = ROOT / "examples" / "lenet5_structured.yaml"
    cfg = load_config(path)
    assert cfg.sparsify.mode == "structured" and cfg.train is not None and cfg.train.target_sparsity == 0.5
    res = train(str(ROOT / "examples" / "lenet5.py"), "demo", config=path, run_dir=tmp_path / "r", epochs=1,
                batch_size=256)
    assert res.summary["mode"] == "structured" and res.summary["val_top1"] > 0.3
