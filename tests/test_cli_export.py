"""`strfx shrink` / `strfx export` end to end (click's runner and real subprocesses) and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import strfx
from strfx.cli import main
from strfx.rundir import atomic_torch_save, load_run
from strfx.testing import kill_channels
from strfx.verify import max_rel_error

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def strfx_proc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "strfx", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def kill_in_run_dir(run_dir: Path, fraction: float = 0.4, seed: int = 0) -> torch.nn.Module:
    """What training would do: make channels dead through the STR parameters, saved in weights.pt."""
    gm, _, _ = load_run(run_dir)
    assert kill_channels(gm, fraction, seed=seed)["channels"] > 0
    atomic_torch_save(gm.state_dict(), run_dir / "weights.pt")
    return gm.eval()


def ort_run(path: Path, x: torch.Tensor) -> torch.Tensor:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


NO_STRFX = """
import sys
class Block:  # importing strfx or any example model fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("strfx", "resnet20") or name.startswith("strfx_user_model"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A structured resnet20 run dir (written by `strfx transform`) with 40% of its channels dead."""
    run_dir = tmp_path_factory.mktemp("runs") / "RUN"
    res = run("transform", EXAMPLES / "resnet20.py", "--mode", "structured", "-o", run_dir)
    assert res.exit_code == 0, res.output
    return run_dir, kill_in_run_dir(run_dir)


def test_transform_shrink_export_as_real_subprocesses(tmp_path: Path) -> None:
    proc = strfx_proc("transform", EXAMPLES / "resnet20.py", "--mode", "structured", "-o", "RUN", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    masked = kill_in_run_dir(tmp_path / "RUN", 0.5, seed=3)
    proc = strfx_proc("shrink", "RUN", "-o", "OUT", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "params" in proc.stdout and "wrote OUT/" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "OUT").iterdir()) == ["model.pt2", "shrink.json"]
    summary = json.loads((tmp_path / "OUT" / "shrink.json").read_text())
    assert summary["params_after"] < 0.8 * summary["params_before"]
    assert summary["flops_after"] < summary["flops_before"]
    assert summary["shrink_max_error"] <= 1e-4 and summary["pt2_max_error"] <= 1e-4

    proc = strfx_proc("export", "OUT", "--onnx", "m.onnx", "--pt2", "m.pt2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime latency" in proc.stdout
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # fresh data, the exported shape
    with torch.no_grad():
        expected = masked(x)
    assert max_rel_error(ort_run(tmp_path / "m.onnx", x), expected) <= 1e-4

    # model.pt2 and m.pt2 load and run with neither strfx nor the model's source importable
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    script = NO_STRFX + textwrap.dedent("""
        import torch
        io = torch.load("io.pt", weights_only=True)
        for f in ("OUT/model.pt2", "m.pt2"):
            m = torch.export.load(f).module()
            y = m(io["x"])
            print(f, ((y - io["y"]).abs().max() / io["y"].abs().max()).item(), sum(p.numel() for p in m.parameters()))
        assert not any(k.startswith("strfx") for k in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in proc.stdout.strip().splitlines():
        _, err, params = line.split()
        assert float(err) <= 1e-4 and int(params) == summary["params_after"]


def test_export_run_dir_shrinks_first_and_reports_before_after(killed_run, tmp_path: Path) -> None:
    run_dir, masked = killed_run
    res = run("export", run_dir, "--onnx", tmp_path / "m.onnx", "--repeats", "2", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["reference"]["params"] > rep["model"]["params"] > 0
    assert rep["reference"]["flops"] > rep["model"]["flops"] > 0
    assert rep["onnx_max_error"] <= 1e-4 and rep["reference_max_error"] <= 1e-4
    assert rep["model"]["ort_latency_ms"] > 0 and rep["reference"]["ort_latency_ms"] > 0
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_rel_error(ort_run(tmp_path / "m.onnx", x), masked(x)) <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_shrink_refuses_existing_output_then_force(killed_run, tmp_path: Path) -> None:
    run_dir, _ = killed_run
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    res = run("shrink", run_dir, "-o", out)
    assert res.exit_code == 2 and "--force" in res.output and len(res.output.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    res = run("shrink", run_dir, "-o", out, "--force", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["channels_removed"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["model.pt2", "shrink.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]  # no temporary leftovers

    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_text("user file")
    res = run("export", out, "--onnx", onnx_file)
    assert res.exit_code == 2 and "--force" in res.output and onnx_file.read_text() == "user file"
    res = run("export", out, "--onnx", onnx_file, "--force", "--repeats", "1")
    assert res.exit_code == 0, res.output
    assert onnx_file.stat().st_size > 1000
    res = run("export", out, "--onnx", onnx_file, "--force", "--repeats", "1", "--json")
    rep = json.loads(res.output)
    summary = json.loads((out / "shrink.json").read_text())  # "before" comes from the shrink record
    assert rep["reference"]["params"] == summary["params_before"] > rep["model"]["params"] == summary["params_after"]
    assert rep["reference"]["flops"] == summary["flops_before"] and rep["reference"]["torch_latency_ms"] is None


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output, res.output
    return lines[0]


def test_bad_inputs_are_one_line_and_write_nothing(killed_run, tmp_path: Path) -> None:
    run_dir, _ = killed_run
    assert "does not exist" in _one_line_error(run("shrink", tmp_path / "missing", "-o", tmp_path / "OUT"))
    assert "does not exist" in _one_line_error(run("export", tmp_path / "missing", "--onnx", tmp_path / "m.onnx"))
    (tmp_path / "empty").mkdir()
    assert "not a strfx run directory" in _one_line_error(run("shrink", tmp_path / "empty", "-o", tmp_path / "OUT"))
    assert "neither a run directory" in _one_line_error(run("export", tmp_path / "empty", "--onnx", tmp_path / "m.onnx"))
    (tmp_path / "file.txt").write_text("x")
    assert "not a directory" in _one_line_error(run("shrink", tmp_path / "file.txt", "-o", tmp_path / "OUT"))

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in ("config.yaml", "report.json"):
        (corrupt / f).write_bytes((run_dir / f).read_bytes())
    (corrupt / "weights.pt").write_bytes((run_dir / "weights.pt").read_bytes()[:500])
    assert "weights.pt is corrupt or unreadable" in _one_line_error(run("shrink", corrupt, "-o", tmp_path / "OUT"))
    assert "weights.pt is corrupt or unreadable" in _one_line_error(run("export", corrupt, "--onnx", tmp_path / "m.onnx"))

    bad_out = tmp_path / "badout"
    bad_out.mkdir()
    (bad_out / "model.pt2").write_bytes(b"not a zip archive")
    assert "cannot load" in _one_line_error(run("export", bad_out, "--onnx", tmp_path / "m.onnx"))
    assert "must end in .onnx" in _one_line_error(run("export", run_dir, "--onnx", tmp_path / "m.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["badout", "corrupt", "empty", "file.txt"]

    proc = strfx_proc("shrink", "missing", "-o", "OUT", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    debug = strfx_proc("shrink", "missing", "-o", "OUT", "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_verification_failure_exits_nonzero_and_leaves_nothing(killed_run, tmp_path: Path, perturbed_ort) -> None:
    """Were onnxruntime to disagree with torch (simulated by perturbing its outputs), no file appears."""
    run_dir, _ = killed_run
    line = _one_line_error(run("export", run_dir, "--onnx", tmp_path / "m.onnx", "--pt2", tmp_path / "m.pt2"))
    assert "max relative error" in line and "nothing written" in line
    assert list(tmp_path.iterdir()) == []


def test_shrink_round_to_keeps_widths_multiples_and_the_function(killed_run, tmp_path: Path) -> None:
    run_dir, masked = killed_run
    res = run("shrink", run_dir, "-o", tmp_path / "R1", "--json")
    assert res.exit_code == 0, res.output
    plain = json.loads(res.output)
    res = run("shrink", run_dir, "-o", tmp_path / "R8", "--round-to", "8", "--json")
    assert res.exit_code == 0, res.output
    rounded = json.loads(res.output)
    assert plain["params_after"] < rounded["params_after"] < rounded["params_before"]
    assert rounded["shrink_max_error"] <= 1e-4 and rounded["pt2_max_error"] <= 1e-4
    program = torch.export.load(tmp_path / "R8" / "model.pt2").module()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert max_rel_error(program(x), masked(x)) <= 1e-4
    # the same through the API: every conv is a multiple of 8 wide or as wide as it was
    small = strfx.shrink(masked, round_to=8)
    dense = {n: m.out_channels for n, m in masked.named_modules() if isinstance(m, torch.nn.Conv2d)}
    widths = {n: m.out_channels for n, m in small.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(widths) == len(dense) > 10
    assert all(w % 8 == 0 or w == dense[n] for n, w in widths.items()), widths
    assert any(w < dense[n] for n, w in widths.items())
    assert small.strfx_shrink["round_to"] == 8


def test_round_to_is_validated_and_refused_on_a_shrunk_output(killed_run, tmp_path: Path) -> None:
    run_dir, _ = killed_run
    res = run("shrink", run_dir, "-o", tmp_path / "OUT", "--round-to", "0")
    assert res.exit_code == 2 and "--round-to" in res.output
    assert run("shrink", run_dir, "-o", tmp_path / "OUT").exit_code == 0
    res = run("export", tmp_path / "OUT", "--onnx", tmp_path / "m.onnx", "--round-to", "8")
    assert res.exit_code != 0 and "already shrunk" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()
