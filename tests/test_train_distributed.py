"""strfx train on 2 CPU processes through torchrun (gloo): DDP equivalence and fault tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _runs import run_train, weights  # noqa: E402

pytestmark = pytest.mark.distributed

TINY = str(Path(__file__).with_name("tiny_model.py"))
STRFX = str(Path(sys.executable).with_name("strfx"))
CONFIG = {"batch_size": 64, "workers": 0, "deterministic": True, "keep_checkpoints": None}


def _train(tmp_path: Path, name: str, *extra: str, env: dict | None = None, epochs: int = 3,
           **train: object) -> subprocess.CompletedProcess:
    return run_train(tmp_path, name, CONFIG, *extra, env=env, epochs=epochs, **train)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return weights(run)


def test_two_processes_stay_in_sync_and_match_one_process(tmp_path: Path) -> None:
    two = _train(tmp_path, "two", "--nproc-per-node", "2", target_sparsity=0.3)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _train(tmp_path, "one", target_sparsity=0.3)
    assert one.returncode == 0, one.stderr[-3000:]
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["world_size"] == 2
    assert s2["ranks_max_param_diff"] == 0.0  # DDP kept every parameter identical on both ranks
    a, b = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    m1 = [json.loads(ln) for ln in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(ln) for ln in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for r1, r2 in zip(m1, m2, strict=True):
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], rel=1e-3)
        assert r1["val_top1"] == pytest.approx(r2["val_top1"], abs=1 / 128 + 1e-9)  # at most one image apart


def test_killed_worker_is_restarted_and_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    # rank 1 is SIGKILLed at step 3 of epoch 2; torchrun restarts both workers, they resume after epoch 1
    res = _train(tmp_path, "fault", "--nproc-per-node", "2", "--max-restarts", "1",
                 env={"STRFX_FAULT_INJECT": "1:2:3"})
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "fault"
    assert "resumed from" in res.stdout and "epoch-0001.pt" in res.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001.pt", "epoch-0002.pt", "epoch-0003.pt"]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["ranks_max_param_diff"] == 0.0
    ckpt = torch.load(run / "checkpoints" / "epoch-0003.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 3 * 512 // 64  # no step lost or repeated


def test_killed_worker_without_restarts_is_one_line_naming_the_dead_rank(tmp_path: Path) -> None:
    """rank 1 is SIGKILLed and no restart is allowed: the error names rank 1 (not the bystander rank 0), once."""
    res = _train(tmp_path, "dead", "--nproc-per-node", "2", "--max-restarts", "0", env={"STRFX_FAULT_INJECT": "1:2:3"})
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("error: training worker rank 1 was killed by SIGKILL"), lines[0]
    assert "rank(s) 0 stopped because of it" in lines[0] and "--resume" in lines[0]
    assert "Traceback" not in res.stderr


def test_failure_line_prefers_the_killed_or_first_failed_rank() -> None:
    from types import SimpleNamespace

    from strfx.distributed import failure_line

    def f(code: int, t: float, sig: str = "") -> SimpleNamespace:
        return SimpleNamespace(exitcode=code, timestamp=t, signal_name=lambda: sig)

    assert "rank 3 was killed by SIGKILL" in failure_line({0: f(1, 5.0), 3: f(-9, 9.0, "SIGKILL")}, 0)
    assert "rank 2 failed (exit code 1" in failure_line({0: f(1, 5.0), 2: f(1, 4.0)}, 1)
    assert "rank 1 stopped with the error printed above" in failure_line({1: f(2, 1.0)}, 0)
    # the agent SIGTERMs a peer still running once it sees the dead worker, in the same second: a bystander
    assert "rank 1 was killed by SIGKILL" in failure_line({0: f(-15, 7.0, "SIGTERM"), 1: f(-9, 7.0, "SIGKILL")}, 0)
    assert "rank 1 failed (exit code 1" in failure_line({0: f(-15, 7.0, "SIGTERM"), 1: f(1, 7.0)}, 0)
    assert "rank 2 was killed by SIGTERM" in failure_line({2: f(-15, 3.0, "SIGTERM")}, 0)  # alone: the cause
