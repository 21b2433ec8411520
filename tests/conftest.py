"""Shared fixtures. Tests build their own tiny data; nothing is downloaded."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# Before anything imports torchvision (lightning and torchmetrics do, also in the xdist controller when it
# rebuilds a worker's warning): strfx declares the schemas the CPU torch lacks (strfx/_tvshim.py).
import strfx  # noqa: F401,E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# Two xdist workers on two cores: one thread each avoids oversubscription.
torch.set_num_threads(int(os.environ.get("STRFX_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state, whichever xdist worker runs it and after whatever
    test: a test that passes once passes on every CI run (an unseeded one flaked 1 run in 16)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


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


@pytest.fixture
def perturbed_ort(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime sessions inside strfx.export whose outputs are off by 1% of their max: a failed check."""
    import importlib

    import numpy as np

    ex = importlib.import_module("strfx.export")  # the module; strfx.export is the function
    real = ex._ort_session

    class Perturbed:
        def __init__(self, sess):
            self.sess = sess

        def get_inputs(self):
            return self.sess.get_inputs()

        def run(self, names, feed):
            return [o + 1e-2 * np.abs(o).max() for o in self.sess.run(names, feed)]

    monkeypatch.setattr(ex, "_ort_session", lambda path, threads: Perturbed(real(path, threads)))
