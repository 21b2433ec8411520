"""strfx.integrations.lightning: STR in a PyTorch Lightning Trainer (issue 13, "train in the loops people use")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import strfx
from strfx.errors import OutputExistsError, StrfxError
from strfx.modules import norm_parameters, threshold_parameters
from strfx.testing import kill_channels

L = pytest.importorskip("lightning", reason="the lightning extra is not installed (pip install 'strfx[lightning]')")
from strfx.integrations import STRSession  # noqa: E402
from strfx.integrations.lightning import STRCallback, str_optimizer  # noqa: E402

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


class Net(L.LightningModule):
    def __init__(self, model: nn.Module, optimizer: str = "str"):
        super().__init__()
        self.model, self.optimizer_kind = model, optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.model(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_kind == "plain":
            return torch.optim.SGD(self.model.parameters(), lr=0.05)
        return str_optimizer(self.model, lr=0.05)


def _loader(n: int = 512) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _trainer(cb: STRCallback, **kw: object) -> L.Trainer:
    return L.Trainer(callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", **kw)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def test_callback_lands_the_target_with_str_groups_and_logs_it() -> None:
    model = strfx.sparsify(_mlp(), "unstructured", example_inputs=(X,))
    net, cb = Net(model), STRCallback(target_sparsity=0.3)
    trainer = _trainer(cb, max_epochs=4)
    trainer.fit(net, _loader())
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert list(groups) == ["weights", "thresholds"]
    assert {id(p) for p in groups["thresholds"]["params"]} == {id(p) for p in threshold_parameters(model)}
    assert groups["weights"]["weight_decay"] == pytest.approx(2 ** -15)  # STR's recipe, untouched by the controller
    assert cb.session.controller is not None and cb.session.controller.last_step == trainer.global_step == 128
    assert abs(cb.session.meter() - 0.3) <= 0.03  # started at ~0: the controller raised the thresholds to the target
    assert float(trainer.callback_metrics["strfx/sparsity"]) == pytest.approx(cb.session.meter(), abs=0.01)


def test_structured_callback_shrinks_and_exports_what_it_trained(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net0 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    model = strfx.sparsify(net0, "structured", example_inputs=(X,))
    kill_channels(model, 0.5, example_inputs=(X,))  # dead channels stay dead (their γ is 0)
    cb = STRCallback(export_dir=tmp_path / "out")
    trainer = _trainer(cb, max_steps=3)
    trainer.fit(Net(model), _loader(64))
    assert {g["name"] for g in trainer.optimizers[0].param_groups} == {"weights", "thresholds", "norms"}
    assert {id(p) for p in trainer.optimizers[0].param_groups[2]["params"]} == {id(p) for p in norm_parameters(model)}
    ex = cb.export_summary
    assert ex is not None and ex["channels_removed"] >= 3 and ex["params_after"] < ex["params_before"]
    x = torch.randn(3, 1, 8, 8)  # another batch size than the example's
    model.eval()
    with torch.no_grad():
        masked, small = model(x), cb.shrunk(x)
    torch.testing.assert_close(small, masked, rtol=1e-4, atol=1e-5)  # the shrunk model is the masked one
    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, masked.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(OutputExistsError, match="already exists"):  # refused before training, not after
        _trainer(STRCallback(export_dir=tmp_path / "out"), max_steps=1).fit(Net(model), _loader(64))


def test_optimizer_without_str_groups_is_one_clear_error() -> None:
    model = strfx.sparsify(_mlp(), "unstructured", example_inputs=(X,))
    with pytest.raises(StrfxError, match="no 'thresholds' parameter group.*str_optimizer"):
        _trainer(STRCallback(target_sparsity=0.5), max_steps=1).fit(Net(model, "plain"), _loader(64))
    with pytest.raises(StrfxError, match="no model made by strfx.sparsify"):
        _trainer(STRCallback(), max_steps=1).fit(Net(_mlp()), _loader(64))


def test_lightning_checkpoint_carries_the_controller_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = strfx.sparsify(_mlp(), "unstructured", example_inputs=(X,))
    cb = STRCallback(target_sparsity=0.3)
    trainer = _trainer(cb, max_steps=40)
    trainer.fit(Net(model), _loader())
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    saved = cb.session.controller.state_dict()
    assert saved["last_step"] == 40 and saved["decay"] > 0
    restored: list[dict] = []
    start = STRSession.start

    def spy(self: STRSession, *args: object) -> None:
        start(self, *args)
        restored.append(self.controller.state_dict())

    monkeypatch.setattr(STRSession, "start", spy)
    cb2 = STRCallback(target_sparsity=0.3)
    _trainer(cb2, max_steps=48).fit(Net(strfx.sparsify(_mlp(), "unstructured", example_inputs=(X,))), _loader(),
                                    ckpt_path=tmp_path / "c.ckpt", weights_only=True)
    assert restored == [saved]  # the resumed run's controller starts where the first one stopped
    assert cb2.session.controller.last_step == 48
