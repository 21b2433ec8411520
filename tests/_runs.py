"""Running `strfx train` as a user would, for the distributed tests (torchrun, gloo, CPU processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

TINY = str(Path(__file__).with_name("tiny_model.py"))
STRFX = str(Path(sys.executable).with_name("strfx"))


def run_train(tmp_path: Path, name: str, config: dict[str, Any], *extra: str, env: dict | None = None,
              epochs: int = 3, mode: str = "unstructured", **train: object) -> subprocess.CompletedProcess:
    """``strfx train TINY`` with ``config`` (+ ``train`` overrides) under ``train:``, output in tmp_path/name."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({"train": {**config, **train}}))
    cmd = [STRFX, "train", TINY, "--mode", mode, "--epochs", str(epochs), "--config", str(cfg),
           "-o", str(tmp_path / name), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert "terminate called" not in res.stderr, res.stderr  # workers must leave gloo cleanly
    return res


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "weights.pt", weights_only=True)
