"""``STRCallback``: STR training in a PyTorch Lightning ``Trainer`` (``pip install strfx[lightning]``).

::

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = strfx.sparsify(build_model(), "structured", example_inputs=(x,))
        def configure_optimizers(self):          # STR's parameter groups (thresholds, norms, weights)
            return str_optimizer(self.model, lr=0.05)
        ...

    cb = STRCallback(target_sparsity=0.5, export_dir="out")
    L.Trainer(max_epochs=3, callbacks=[cb]).fit(Net(), loader)
    cb.shrunk, cb.export_summary                  # the shrunk model, out/model.onnx + out/model.pt2

After every optimizer step the callback runs strfx's target controller (when ``target_sparsity`` is
set), exactly as ``strfx train`` does, and logs ``strfx/sparsity`` (and the decay it set) through
``LightningModule.log``; at the end of ``fit`` (global rank 0) it shrinks and exports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

try:
    import lightning as L
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as L  # type: ignore[no-redef]
    except ImportError:
        raise ImportError("strfx.integrations.lightning needs Lightning: pip install 'strfx[lightning]'") from None

from strfx.integrations._session import SessionResults, STRSession, str_optimizer
from strfx.train_config import ControllerConfig

__all__ = ["STRCallback", "str_optimizer"]


class STRCallback(SessionResults, L.Callback):
    """Target controller after each optimizer step, sparsity in the logs, shrink + export at the end.

    ``target_sparsity``: unstructured, the fraction of STR weights that end at zero; structured, the
    fraction of FLOPs removed, or of parameters with ``target_metric="params"`` (None: plain STR, the
    decay alone decides). ``export_dir``: where the
    shrunk model's ``model.onnx``/``model.pt2`` go (None: no export). ``metadata``: written into the
    ONNX file. ``rewind``: see :class:`STRSession` (then ``callback.rewound()`` after training). The
    model is found as the LightningModule's first submodule made by ``strfx.sparsify``;
    the optimizer must carry STR's groups (:func:`str_optimizer` or ``strfx.param_groups``).
    """

    def __init__(self, target_sparsity: float | None = None, *, export_dir: str | Path | None = None,
                 controller: ControllerConfig | dict[str, Any] | None = None, metadata: dict[str, str] | None = None,
                 force: bool = False, rewind: Literal["off", "start", "ramp"] = "off",
                 target_metric: Literal["flops", "params"] = "flops"):
        super().__init__()
        self.session = STRSession(target_sparsity, export_dir=export_dir, controller=controller, metadata=metadata,
                                  force=force, rewind=rewind, target_metric=target_metric)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.session.attach(pl_module)

    def _optimizer(self, trainer: L.Trainer) -> Any:
        from strfx.controller import named_group

        found = [opt for opt in trainer.optimizers if named_group(opt, "thresholds") is not None]
        return found[0] if found else (trainer.optimizers[0] if trainer.optimizers else None)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        opt = self._optimizer(trainer)
        if opt is None:
            from strfx.errors import StrfxError

            raise StrfxError("STRCallback needs an optimizer; return str_optimizer(self.model, lr) from configure_optimizers")
        self.session.start(opt, trainer.estimated_stepping_batches)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        logs = self.session.after_step(self._optimizer(trainer), trainer.global_step)
        if logs:
            pl_module.log_dict(logs, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log_dict(self.session.measure(), on_step=False, on_epoch=True, prog_bar=True)

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning's checkpoints: ``fit(ckpt_path=...)`` continues the controller where it was."""
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(state_dict)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.session.finish()
