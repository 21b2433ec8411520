"""The README's accelerate snippet (plain API in an accelerate loop) runs as written and lands its target."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'strfx[hf]')")

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- tests/test_integration_accelerate.py runs this block -->"


def _snippet() -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(MARKER) + len(MARKER):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)  # type: ignore[union-attr]


def test_readme_accelerate_snippet_trains_to_the_target_and_exports(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(512, 1, 8, 8, generator=g), torch.randint(0, 4, (512,), generator=g))

    def build_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))

    scope = {"build_model": build_model, "x": torch.randn(2, 1, 8, 8), "epochs": 4,
             "loader": torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=g)}
    exec(compile(_snippet(), "README.md (accelerate snippet)", "exec"), scope)  # noqa: S102 - our own README
    assert scope["step"] == 128 and scope["controller"].last_step == 128
    assert abs(scope["meter"]() - 0.5) <= 0.05  # thresholds raised from sigmoid(-10) to the target
    probe = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = scope["masked"](probe).numpy()
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: probe.numpy()})[0], expected,
                               rtol=1e-4, atol=1e-5)
