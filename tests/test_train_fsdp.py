"""strfx train --strategy fsdp on CPU processes (gloo): FSDP2 equals one process; DCP checkpoints reshard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from _runs import run_train, weights  # noqa: E402

pytestmark = pytest.mark.distributed

TINY = str(Path(__file__).with_name("tiny_model.py"))
STRFX = str(Path(sys.executable).with_name("strfx"))
# min_params 50: the tiny model's conv and both linears become FSDP units of their own, beside the root
CONFIG = {"batch_size": 64, "workers": 0, "deterministic": True, "keep_checkpoints": None,
          "fsdp": {"min_params": 50}}


def _train(tmp_path: Path, name: str, *extra: str, env: dict | None = None, epochs: int = 3, mode: str = "unstructured",
           **train: object) -> subprocess.CompletedProcess:
    return run_train(tmp_path, name, CONFIG, *extra, env=env, epochs=epochs, mode=mode, **train)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return weights(run)


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same global batch in one plain process (no torchrun), unstructured, target 30%."""
    tmp = tmp_path_factory.mktemp("ref")
    res = _train(tmp, "one", target_sparsity=0.3)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "one"


def test_fsdp_units_pick_closed_blocks_by_size_or_class() -> None:
    import strfx
    from strfx.distributed import fsdp_units

    sys.path.insert(0, str(Path(TINY).parent))
    import tiny_model

    x = tiny_model.example_inputs()
    s = strfx.sparsify(tiny_model.build_model(), "structured", example_inputs=x)
    # children 0 (conv, 67 parameters), 4 (1569) and 6 (68); nothing inside STR's parametrization containers,
    # never the root
    assert fsdp_units(s, [], 50) == ["0", "4", "6"]
    assert fsdp_units(s, [], 100) == ["4"]
    assert fsdp_units(s, ["Linear"], 1) == ["4", "6"]  # 4 is a ParametrizedLinear: its base class counts
    assert fsdp_units(s, [], 10**9) == []
    # a parameter shared across blocks keeps both blocks out of the policy
    seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    seq[1].weight = seq[0].weight
    assert fsdp_units(seq, [], 1) == []


def test_fsdp_two_processes_match_one_process(tmp_path: Path, one_process: Path) -> None:
    two = _train(tmp_path, "two", "--nproc-per-node", "2", "--strategy", "fsdp", target_sparsity=0.3)
    assert two.returncode == 0, two.stderr[-3000:]
    run = tmp_path / "two"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    _assert_same_weights(_weights(run), _weights(one_process))
    m1 = [json.loads(ln) for ln in (one_process / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    for r1, r2 in zip(m1, m2, strict=True):
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], rel=1e-3)
        assert r1["controlled"] == pytest.approx(r2["controlled"], abs=1e-3)  # the controller saw the same model
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["epoch-0001", "epoch-0002", "epoch-0003"]  # DCP directories, no temporary left
    assert sorted(p.name for p in (run / "checkpoints" / "epoch-0003").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "extra.pt"]


def test_fsdp_structured_with_export_matches_one_process(tmp_path: Path) -> None:
    two = _train(tmp_path, "two", "--nproc-per-node", "2", "--strategy", "fsdp", "--export", mode="structured",
                 epochs=2, target_sparsity=0.3)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _train(tmp_path, "one", mode="structured", epochs=2, target_sparsity=0.3)
    assert one.returncode == 0, one.stderr[-3000:]
    _assert_same_weights(_weights(tmp_path / "two"), _weights(tmp_path / "one"))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (tmp_path / "two" / "model.onnx").is_file()
    assert summary["export"]["onnx_max_error"] <= summary["export"]["tolerance"]


def test_fsdp_checkpoint_resumes_on_2_then_1_then_2_processes(tmp_path: Path, one_process: Path) -> None:
    """Stop after epoch 1 on 2 ranks, run epoch 2 on 1 rank, finish on 2 ranks: the weights of never stopping."""
    run = tmp_path / "r"
    # rank 0 is SIGKILLed as epoch 2 starts: epoch-0001 (written by 2 ranks) is the last checkpoint
    a = _train(tmp_path, "r", "--nproc-per-node", "2", "--strategy", "fsdp", env={"STRFX_FAULT_INJECT": "0:2:0"},
               target_sparsity=0.3)
    assert a.returncode == 2 and "killed by SIGKILL" in a.stderr, a.stderr[-3000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch-0001"]
    b = _train(tmp_path, "r", "--nproc-per-node", "1", "--strategy", "fsdp", "--resume",
               env={"STRFX_FAULT_INJECT": "0:3:0"}, target_sparsity=0.3)
    assert b.returncode == 2, b.stderr[-3000:]
    assert "written by 2 process(es), now 1" in b.stdout
    c = _train(tmp_path, "r", "--nproc-per-node", "2", "--strategy", "fsdp", "--resume", target_sparsity=0.3)
    assert c.returncode == 0, c.stderr[-3000:]
    assert "resumed from" in c.stdout and "epoch-0002" in c.stdout and "now 2" in c.stdout
    _assert_same_weights(_weights(run), _weights(one_process))
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    extra = torch.load(run / "checkpoints" / "epoch-0003" / "extra.pt", weights_only=True)
    assert extra["step"] == 3 * 512 // 64 and extra["world_size"] == 2


def test_shrink_reads_a_sharded_checkpoint_of_an_unfinished_run(tmp_path: Path, one_process: Path) -> None:
    """load_run (strfx shrink/export) takes the newest checkpoint when weights.pt is missing: DCP and .pt alike."""
    from strfx.rundir import load_run

    two = _train(tmp_path, "two", "--nproc-per-node", "2", "--strategy", "fsdp", epochs=1)
    assert two.returncode == 0, two.stderr[-3000:]
    for run in (tmp_path / "two", one_process):
        final = _weights(run)
        copy = tmp_path / f"{run.name}-unfinished"
        shutil.copytree(run, copy)
        (copy / "weights.pt").unlink()
        gm, _, _ = load_run(copy)
        _assert_same_weights({k: v for k, v in gm.state_dict().items()}, final)
    res = subprocess.run([STRFX, "shrink", str(tmp_path / "two-unfinished"), "-o", str(tmp_path / "small")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "small" / "model.pt2").is_file()


@pytest.mark.parametrize("mode", ["structured", "unstructured"])
def test_fsdp_trains_a_hf_llama_with_str_and_a_target(tmp_path: Path, mode: str) -> None:
    """A two-layer Llama classifier (tests/tiny_llama.py): one FSDP unit per decoder layer, controller on.

    structured: STR-BN-style importance vectors on heads/neurons/hidden; unstructured: STR on every weight.
    """
    pytest.importorskip("transformers")
    cfg = tmp_path / "llama.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"batch_size": 32, "workers": 0, "deterministic": True,
                                             "strategy": "fsdp", "fsdp": {"wrap": ["LlamaDecoderLayer"]}}}))
    res = subprocess.run([STRFX, "train", str(Path(__file__).with_name("tiny_llama.py")), "--mode", mode,
                          "--epochs", "1", "--config", str(cfg), "--target-sparsity", "0.3", "-o", str(tmp_path / "r"),
                          "--nproc-per-node", "2"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FSDP: 2 sharded block(s) + the root" in res.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val_top1"] > 0.5  # 4 classes: well above chance
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["threshold_decay"] > 0  # the controller was steering (it reads the gathered model on the writer)
    trained = _weights(tmp_path / "r")
    if mode == "structured":
        assert any(k.endswith("unit.weight") for k in trained)  # STR importance vectors were trained
    else:
        thresholds = [v for k, v in trained.items() if k.endswith(".s")]
        assert len(thresholds) >= 14  # q/k/v/o/gate/up/down of both layers, each with its own threshold
        assert all(float(t.max()) > -15.0 for t in thresholds)  # ...and each moved up from s_init under decay
        assert row["sparsity"] > 0  # weights died (8 steps: the schedule towards 30 % has only begun)


def test_cpu_offload_needs_fsdp_and_a_gpu(tmp_path: Path) -> None:
    from strfx.errors import StrfxError
    from strfx.train import prepare

    with pytest.raises(StrfxError, match="only applies to sharded training; add --strategy fsdp"):
        prepare(TINY, None, "unstructured", run_dir=tmp_path / "a", cpu_offload=True)
    if not torch.cuda.is_available():
        with pytest.raises(StrfxError, match="trains on the CPU already; drop it"):
            prepare(TINY, None, "unstructured", run_dir=tmp_path / "b", cpu_offload=True, strategy="fsdp")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


def test_c10d_agents_keep_node_rank_for_strfx_only() -> None:
    from strfx.distributed import LaunchOptions

    c10d = LaunchOptions(nnodes="2", node_rank=1, rdzv_endpoint="127.0.0.1:1234").argv()
    assert "--node-rank" not in c10d and "--rdzv-endpoint" in c10d  # c10d ignores it; strfx picks the writer by it
    static = LaunchOptions(nnodes="2", node_rank=1, rdzv_endpoint="h:1", rdzv_backend="static").argv()
    assert static[static.index("--node-rank") + 1] == "1"


def _random_cifar(path: Path) -> str:
    """CIFAR-shaped uint8 images (N×H×W×C) with random labels: resnet20/custom_residual take 3×32×32."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 10, 128),
             x_test=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 10, 32))
    return f"npz:{path}"


@pytest.mark.parametrize(("example", "mode"), [("custom_residual", "structured"), ("lenet300", "unstructured")])
def test_fsdp_trains_a_shipped_example_with_a_target(tmp_path: Path, examples_dir: Path, example: str,
                                                     mode: str) -> None:
    """The shipped examples under --strategy fsdp (3 steps an epoch): the blocks sharded, the controller steering.

    custom_residual (structured: STR-BN, a residual add, SE, a concat; BatchNorm statistics kept per rank as DDP
    keeps them) must end with DDP's weights; lenet300 trains unstructured STR on demo. (``--export`` after an FSDP
    run: test_fsdp_structured_with_export_matches_one_process.)
    """
    data = _random_cifar(tmp_path / "c.npz") if example == "custom_residual" else "demo"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"train": {**CONFIG, "batch_size": 32, "max_steps_per_epoch": 3,
                                             "fsdp": {"min_params": 500}}}))

    def train(name: str, strategy: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([STRFX, "train", str(examples_dir / f"{example}.py"), "--mode", mode, "--data", data,
                               "--epochs", "2", "--config", str(cfg), "--target-sparsity", "0.3", "--nproc-per-node",
                               "2", "--strategy", strategy, "-o", str(tmp_path / name), *extra],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    res = train("fsdp", "fsdp")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "terminate called" not in res.stderr, res.stderr
    units = int(res.stdout.split("FSDP: ")[1].split(" sharded block")[0])
    assert units >= 3, res.stdout  # blocks of the example, not only the root
    run = tmp_path / "fsdp"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["threshold_decay"] > 100 / 32768  # the controller raised it far above the base decay (1/32768)
    assert sorted(p.name for p in (run / "checkpoints" / "epoch-0002").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "extra.pt"]
    if mode == "structured":
        ddp = train("ddp", "ddp")
        assert ddp.returncode == 0, ddp.stderr[-3000:]
        _assert_same_weights(_weights(run), _weights(tmp_path / "ddp"))
