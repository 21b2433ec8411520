"""Shared fixtures. Tests build their own tiny data; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# Two xdist workers on two cores: one thread each avoids oversubscription.
torch.set_num_threads(int(os.environ.get("STRFX_TEST_THREADS", "1")))


@pytest.fixture
def examples_dir() -> Path:
    return EXAMPLES


@pytest.fixture
def write_model(tmp_path: Path):
    """Write a model file from source text and return its path."""

    def _write(source: str, name: str = "model.py") -> Path:
        path = tmp_path / name
        path.write_text(source)
        return path

    return _write
