"""`strfx transform` / `strfx inspect` end to end: click's runner, a real subprocess, every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import strfx
from strfx.cli import main
from strfx.rundir import load_run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_transform_writes_a_loadable_run_dir(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run("transform", str(EXAMPLES / "lenet5.py"), "--mode", "unstructured", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert "conv1.weight" in res.output and "FLOPs" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "report.json", "weights.pt"]
    state = torch.load(out / "weights.pt", weights_only=True)
    assert any(k.endswith("parametrizations.weight.original") for k in state)
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "unstructured" and len(report["layers"]) == 4
    gm, _, cfg = load_run(out)  # rebuilds the model from its file, then loads the saved weights
    assert cfg.sparsify.mode == "unstructured" and cfg.model == str(EXAMPLES / "lenet5.py")
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())
    assert strfx.report(gm).model_dump()["layers"] == report["layers"]


def test_transform_json_and_force(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run("transform", str(EXAMPLES / "resnet20.py"), "--mode", "structured", "-o", str(out), "--json")
    assert first.exit_code == 0
    assert json.loads(first.output)["mode"] == "structured"
    again = CliRunner().invoke(main, ["transform", str(EXAMPLES / "resnet20.py"), "--mode", "structured",
                                      "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    forced = run("transform", str(EXAMPLES / "resnet20.py"), "--mode", "unstructured", "-o", str(out), "--force")
    assert forced.exit_code == 0
    assert "mode: unstructured" in (out / "config.yaml").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary leftovers


def test_transform_reads_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("sparsify:\n  mode: structured\n  exclude: ['conv1']\n")
    out = tmp_path / "run"
    res = run("transform", str(EXAMPLES / "lenet5.py"), "--config", str(cfg), "-o", str(out), "--json")
    assert res.exit_code == 0, res.output
    names = [layer["name"] for layer in json.loads(res.output)["layers"]]
    assert names == ["conv2", "fc1"]


def test_inspect_lists_layers_in_both_modes() -> None:
    res = run("inspect", str(EXAMPLES / "custom_residual.py"), "--json")
    assert res.exit_code == 0
    rows = {r["layer"]: r for r in json.loads(res.output)}
    assert rows["block.conv1"]["structured"].startswith("STR-BN block.bn1")
    assert rows["left"]["structured"].startswith("importance vector")
    assert rows["head"]["unstructured"] == "STR on weight" and rows["head"]["structured"] == "—"


def test_transform_as_a_real_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "strfx", "transform", str(EXAMPLES / "custom_residual.py"), "--mode", "structured",
         "-o", str(out)], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "block.bn1" in proc.stdout and (out / "weights.pt").is_file()


BAD_MODELS = {
    "syntax": ("def build_model(:\n    pass\n", "syntax error in"),
    "no_build": ("import torch\nX = 1\n", "does not define build_model()"),
    "raises": ("def build_model():\n    raise ValueError('boom')\n", "build_model() in"),
    "not_module": ("def build_model():\n    return 42\n", "returned int, not a torch.nn.Module"),
    "untraceable": (
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(3, 3)\n"
        "    def forward(self, x):\n        if x.sum() > 0:\n            return self.fc(x)\n        return x\n"
        "def build_model():\n    return M()\n"
        "def example_inputs():\n    return (torch.randn(2, 3),)\n",
        "torch.export cannot capture M at",
    ),
    "wrong_input_shape": (  # issue 13: used to end in 126 lines, 3 tracebacks and "ShapeProp error"
        "import torch\nfrom torch import nn\ndef build_model():\n    return nn.Conv2d(1, 4, 3)\n"
        "def example_inputs():\n    return (torch.randn(2, 3, 8, 8),)\n",
        "returned a tensor of shape 2×3×8×8 that build_model()'s model cannot run (RuntimeError: Given groups=1",
    ),
    "default_input_does_not_fit": (
        "import torch\nfrom torch import nn\ndef build_model():\n    return nn.Linear(5, 2)\n",
        "defines no example_inputs(), and the default input 1×3×224×224 that build_model()'s model cannot run",
    ),
    "nothing_to_gate": (
        "import torch\nfrom torch import nn\ndef build_model():\n    return nn.Linear(3, 2)\n"
        "def example_inputs():\n    return torch.randn(2, 3)\n",
        "nothing to gate",
    ),
}


def _assert_clean_failure(res, expected: str, out: Path) -> None:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert expected in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_files_fail_in_one_line(case: str, write_model, tmp_path: Path) -> None:
    source, expected = BAD_MODELS[case]
    model = write_model(source, f"{case}.py")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["transform", str(model), "--mode", "structured", "-o", str(out)])
    _assert_clean_failure(res, expected, out)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["missing_model.py"], "model file not found"),
        (["torchvision:resnet9000"], "unknown torchvision model 'resnet9000'"),
    ],
)
def test_bad_model_specs_fail_in_one_line(args: list[str], expected: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["transform", *args, "-o", str(out)])
    _assert_clean_failure(res, expected, out)


def test_invalid_config_fails_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("sparsify:\n  keep_first_dense: maybe\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["transform", str(EXAMPLES / "lenet5.py"), "--config", str(cfg), "-o", str(out)])
    _assert_clean_failure(res, "sparsify.keep_first_dense", out)


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    res = CliRunner().invoke(main, ["transform", str(EXAMPLES / "lenet5.py"), "-o", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output and "--force" in res.output
    assert (out / "mine.txt").read_text() == "user data"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "strfx", "transform", "nope.py", "--debug"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ModelLoadError" in proc.stderr
    plain = subprocess.run([sys.executable, "-m", "strfx", "transform", "nope.py"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().startswith("error: model file not found")


def test_api_sparsify_of_torchvision_from_python() -> None:
    from strfx._torchvision import torchvision

    gm = strfx.sparsify(torchvision.models.resnet18(), example_inputs=torch.randn(1, 3, 64, 64))
    assert len(strfx.report(gm).layers) == 21


def test_output_directory_gets_normal_permissions(tmp_path: Path) -> None:
    import os

    out = tmp_path / "run"
    assert run("transform", str(EXAMPLES / "lenet300.py"), "-o", str(out)).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_inspect_without_flags_prints_the_table() -> None:
    """The README's first command: plain `strfx inspect MODEL` (it used to crash after the table)."""
    res = CliRunner().invoke(main, ["inspect", str(EXAMPLES / "lenet5.py")])
    assert res.exit_code == 0, res.output
    assert "conv1" in res.output and "importance vector" in res.output and "4 weight layers" in res.output
    assert "error" not in res.output


def test_warnings_are_held_back_from_one_line_errors(write_model, tmp_path: Path) -> None:
    """A torch-style warning raised before a failure strfx explains is not printed in front of its one line."""
    model = write_model("import warnings\nwarnings.warn('some torch deprecation', UserWarning)\n"
                        "def build_model():\n    return 42\n")
    proc = subprocess.run([sys.executable, "-m", "strfx", "transform", str(model), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        f"error: build_model() in {model} returned int, not a torch.nn.Module"]
    ok = write_model("import warnings\nimport torch\nfrom torch import nn\n"
                     "warnings.warn('some torch deprecation', UserWarning)\n"
                     "def build_model():\n    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4))\n"
                     "def example_inputs():\n    return (torch.randn(2, 3, 2, 2),)\n", "ok.py")
    proc = subprocess.run([sys.executable, "-m", "strfx", "transform", str(ok), "--mode", "unstructured", "-o",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "some torch deprecation" in proc.stderr  # shown once the command is done


def test_shrink_output_path_is_printed_without_a_double_slash(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run("transform", str(EXAMPLES / "lenet300.py"), "--mode", "structured", "-o", str(run_dir)).exit_code == 0
    res = run("shrink", str(run_dir), "-o", f"{tmp_path}/shrunk/")
    assert res.exit_code == 0, res.output
    assert f"wrote {tmp_path}/shrunk/ (model.pt2" in res.output and "shrunk//" not in res.output
