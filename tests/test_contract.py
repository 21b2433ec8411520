"""The input contract recorded with a run reproduces training's preprocessing (issue 13, defect 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from strfx.contract import InputContract, load_contract
from strfx.data import demo_path, load_data
from strfx.train import train

ROOT = Path(__file__).resolve().parents[1]


def test_run_records_its_input_contract(tmp_path: Path) -> None:
    res = train(str(ROOT / "examples" / "lenet300.py"), "demo", "unstructured", run_dir=tmp_path / "r", epochs=1,
                config={"train": {"max_steps_per_epoch": 2}})
    contract = load_contract(tmp_path / "r" / "input_contract.json")
    assert contract == InputContract.model_validate(res.summary["input_contract"])
    assert contract.shape == [None, 1, 28, 28] and contract.dtype == "float32" and contract.num_classes == 10
    assert contract.scale == 1 / 255 and contract.data == "demo" and "/ 255" in contract.formula
    # applying the recorded numbers to the raw uint8 test images gives exactly what training evaluated on
    with np.load(demo_path()) as f:
        raw = torch.from_numpy(f["x_test"][:8]).float()[:, None]
    mine = (raw * contract.scale - torch.tensor(contract.mean).view(1, -1, 1, 1)) / torch.tensor(contract.std).view(1, -1, 1, 1)
    theirs = load_data("demo").val[list(range(8))][0]
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
    meta = contract.metadata()
    assert json.loads(meta["strfx.input_contract"])["mean"] == contract.mean
