"""Two torchrun agents on this machine as two nodes (c10d rendezvous on 127.0.0.1), one worker each.

What a real two-machine run does, minus the network: the agents meet at the endpoint, c10d hands out
the global ranks (in join order, so global rank 0 may be on either agent), the worker on the agent
given ``--node-rank 0`` writes every output into that agent's ``-o``, and every node says where.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.distributed

TINY = str(Path(__file__).with_name("tiny_model.py"))
STRFX = str(Path(sys.executable).with_name("strfx"))
CONFIG = {"batch_size": 64, "workers": 0, "deterministic": True, "keep_checkpoints": None, "fsdp": {"min_params": 50}}
OUTPUTS = "the run's outputs go to"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, **train: object) -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"train": {**CONFIG, **train}}))
    return cfg


def _cmd(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [STRFX, "train", TINY, "--mode", "unstructured", "--epochs", "2", "--config", str(cfg), "-o", str(out),
            *extra]


def _two_nodes(tmp_path: Path, *extra: str, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Start node 1 first (so c10d often makes it global rank 0), then node 0; wait for both."""
    cfg = _config(tmp_path)
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = []
    for node in (1, 0):
        cmd = _cmd(cfg, tmp_path / f"node{node}", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                   "--rdzv-endpoint", endpoint, "--rdzv-id", f"t{os.getpid()}", *extra)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for r in results:
        assert "terminate called" not in r.stderr, r.stderr  # workers must leave gloo cleanly
    return results[::-1]  # node 0, node 1


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ref")
    res = subprocess.run(_cmd(_config(tmp), tmp / "one"), capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "one"


def _check_outputs_on_node0(tmp_path: Path, results: list[subprocess.CompletedProcess]) -> Path:
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    for node, r in enumerate(results):  # every node says where the outputs are: node 0's directory
        line = next(ln for ln in r.stdout.splitlines() if OUTPUTS in ln)
        assert line.startswith(f"node rank {node}:") and f":{node0} " in line, line
    assert (node0 / "weights.pt").is_file() and (node0 / "summary.json").is_file()
    assert sorted(p.name for p in node1.iterdir()) == ["config.yaml"]  # node 1's own -o only got the config
    assert json.loads((node0 / "summary.json").read_text())["world_size"] == 2
    return node0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_write_on_node_rank_0_and_match_one_process(tmp_path: Path, one_process: Path, strategy: str) -> None:
    results = _two_nodes(tmp_path, "--strategy", strategy)
    node0 = _check_outputs_on_node0(tmp_path, results)
    a, b = torch.load(node0 / "weights.pt", weights_only=True), torch.load(one_process / "weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


def test_two_nodes_worker_killed_mid_epoch_restarts_from_last_checkpoint(tmp_path: Path, one_process: Path) -> None:
    # global rank 1 (on either agent) is SIGKILLed at step 3 of epoch 2; both agents restart their workers,
    # which resume from epoch-0001
    results = _two_nodes(tmp_path, "--strategy", "fsdp", "--max-restarts", "1", env={"STRFX_FAULT_INJECT": "1:2:3"})
    node0 = _check_outputs_on_node0(tmp_path, results)
    assert any("resumed from" in r.stdout and "epoch-0001" in r.stdout for r in results)
    rows = [json.loads(ln) for ln in (node0 / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    extra = torch.load(node0 / "checkpoints" / "epoch-0002" / "extra.pt", weights_only=True)
    assert extra["step"] == 2 * 512 // 64  # no step lost or repeated
    a, b = torch.load(node0 / "weights.pt", weights_only=True), torch.load(one_process / "weights.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
