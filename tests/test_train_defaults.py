"""Default settings train the shipped examples; a diverging or failed run says so in one line (issue 13)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from strfx.cli import main
from strfx.errors import TrainError
from strfx.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode", ["unstructured", "structured"])
@pytest.mark.parametrize("example", ["lenet5", "lenet300"])
def test_examples_train_on_demo_at_default_settings(example: str, mode: str, tmp_path: Path) -> None:
    """Default recipe (batch 256, lr 0.256), one epoch of the demo data: finite and well above chance."""
    res = train(str(ROOT / "examples" / f"{example}.py"), "demo", mode, run_dir=tmp_path / "r", epochs=1)
    assert res.summary["val_top1"] > 0.5, res.summary  # 10 classes: chance is 0.1
    assert res.summary["warnings"] == []
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)


NAN_MODEL = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    class Poisoned(Dataset):
        """Clean through the first epoch (3 batches of 16 fetched), then one image of NaNs in epoch 2."""
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.y = torch.randint(0, 4, (n,), generator=g)
            self.x = torch.randn(n, 1, 8, 8, generator=g) + self.y.view(-1, 1, 1, 1)
            self.calls = 0
        def __len__(self):
            return len(self.y)
        def __getitem__(self, i):
            self.calls += 1
            x = self.x[i] * float("nan") if self.calls == 55 else self.x[i]
            return x, self.y[i]

    def build_model():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))

    def example_inputs():
        return (torch.randn(2, 1, 8, 8),)

    def datasets():
        return Poisoned(64, 1), Poisoned(16, 2)
''')


def test_non_finite_loss_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(write_model, tmp_path: Path) -> None:
    model = write_model(NAN_MODEL)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train: {batch_size: 16, workers: 0, max_steps_per_epoch: 2}\n")
    res = CliRunner().invoke(main, ["train", str(model), "--mode", "unstructured", "--config", str(cfg),
                                    "--epochs", "3", "-o", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    err = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in res.output
    assert "diverged at epoch 2, step 1/2: the loss is nan" in err[0]
    assert "lower the learning rate" in err[0] and "epoch-0001.pt is kept" in err[0]
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert ckpts == ["epoch-0001.pt"]
    state = torch.load(tmp_path / "r" / "checkpoints" / "epoch-0001.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (tmp_path / "r" / "summary.json").exists()


def test_nan_gradient_is_named(write_model, tmp_path: Path) -> None:
    """A NaN in an STR threshold's gradient alone (finite loss) is caught before the update is applied."""
    model = write_model(NAN_MODEL.replace('self.calls == 55', 'False'))
    import strfx.train as tr

    real = tr.Trainer._clip_and_check

    def poison(self, loss, epoch, i):
        if epoch == 0 and i == 1:
            self.gm.get_parameter("1.parametrizations.weight.0.s").grad.fill_(float("inf"))
        return real(self, loss, epoch, i)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tr.Trainer, "_clip_and_check", poison)
        with pytest.raises(TrainError, match=r"epoch 1, step 2/2: the gradient of 1\.parametrizations\.weight\.0\.s "
                                             r"is not finite.*no checkpoint was written yet"):
            train(str(model), None, "unstructured", config={"train": {"batch_size": 16, "workers": 0,
                                                                    "max_steps_per_epoch": 2}},
                  run_dir=tmp_path / "r", epochs=1)


RANDOM_LABELS = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    def build_model():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))

    def example_inputs():
        return (torch.randn(2, 1, 8, 8),)

    def _split(n, seed):
        g = torch.Generator().manual_seed(seed)
        return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 4)

    def datasets():
        return _split(64, 1), _split(400, 2)
''')


def test_run_at_chance_or_far_from_its_target_says_so(write_model, tmp_path: Path) -> None:
    model = write_model(RANDOM_LABELS)  # labels independent of the images: nothing to learn
    res = train(str(model), None, "unstructured", config={"train": {"batch_size": 16, "workers": 0}},
                run_dir=tmp_path / "r", epochs=1, target_sparsity=0.9)
    warnings = res.summary["warnings"]
    assert len(warnings) == 2, warnings
    assert "at chance level (25.00% for 4 classes)" in warnings[0]
    assert "points from the target 90%" in warnings[1]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["warnings"] == warnings


def test_piped_training_prints_progress_lines_within_an_epoch(tmp_path: Path) -> None:
    """Not a terminal: plain progress lines every train.log_every_steps (and every 30 s), not only per epoch."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train: {batch_size: 64, log_every_steps: 2, max_steps_per_epoch: 5}\n")
    res = CliRunner().invoke(main, ["train", str(ROOT / "examples" / "lenet300.py"), "--data", "demo", "--epochs", "1",
                                    "--config", str(cfg), "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    steps = [ln for ln in res.output.splitlines() if ln.startswith("epoch 1/1 step ")]
    assert [ln.split(":")[0] for ln in steps] == ["epoch 1/1 step 2/5", "epoch 1/1 step 4/5"], res.output
    assert all("loss" in ln for ln in steps)


def test_summary_states_each_number_once_with_one_denominator(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train: {batch_size: 64, max_steps_per_epoch: 3}\n")
    lenet300 = str(ROOT / "examples" / "lenet300.py")
    res = CliRunner().invoke(main, ["train", lenet300, "--mode", "unstructured", "--data", "demo", "--epochs", "1",
                                    "--config", str(cfg), "-o", str(tmp_path / "u"), "--export"])
    assert res.exit_code == 0, res.output
    # unstructured: the channels shrink removes are not counted against the STR weights (266,200 "channels")
    assert "STR channels removed" not in res.output and "channels removed whole" in res.output
    line = next(ln for ln in res.output.splitlines() if ln.strip().startswith("sparsity"))
    summary = json.loads((tmp_path / "u" / "summary.json").read_text())
    assert line.count(f"{summary['sparsity']:.2%}") == 1, line  # was printed twice on one line
    assert "params_after" not in summary and summary["params_nonzero_after"] <= summary["params_before"]

    res = CliRunner().invoke(main, ["train", lenet300, "--mode", "structured", "--data", "demo", "--epochs", "1",
                                    "--config", str(cfg), "-o", str(tmp_path / "s"), "--export"])
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    n = s["str_elements"]  # 300 + 100 gated channels
    assert n == 400
    assert f"of {n:,} STR channels zero" in res.output and f"of {n:,} STR channels removed" in res.output
    assert s["export"]["params_after"] <= s["params_before"]
