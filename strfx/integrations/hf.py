"""HuggingFace ``Trainer``: ``STRTrainerCallback`` + ``str_optimizer`` (``pip install strfx[hf]``).

The ``Trainer`` builds its own optimizer, without STR's parameter groups; pass one that has them and
let the ``Trainer`` build its usual learning-rate schedule (warm-up, ``lr_scheduler_type``) on it::

    model = strfx.sparsify(AutoModelForSequenceClassification.from_config(cfg), "unstructured",
                           example_inputs=(input_ids,))
    args = TrainingArguments("out", learning_rate=1e-3, max_steps=200, ...)
    cb = STRTrainerCallback(target_sparsity=0.5, export_dir="out/shrunk")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb],
                      optimizers=(str_optimizer(model, args), None))
    trainer.train()          # logs strfx/sparsity; then out/shrunk/model.onnx + model.pt2

After every optimizer step the callback runs strfx's target controller, exactly as ``strfx train``
does; ``strfx/sparsity`` (and, with a target, the decay it set) goes into the ``Trainer``'s logs;
at the end of training (main process) the model is shrunk and exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

try:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import ExportableState
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("strfx.integrations.hf needs transformers: pip install 'strfx[hf]'") from None

from strfx.integrations._session import SessionResults, STRSession
from strfx.integrations._session import str_optimizer as _str_optimizer
from strfx.train_config import ControllerConfig

__all__ = ["STRTrainerCallback", "str_optimizer"]


def str_optimizer(model: nn.Module, args: TrainingArguments, *, threshold_decay: float | None = None,
                  norm_decay: float | None = None,
                  optimizer: Literal["adamw", "sgd"] = "adamw") -> torch.optim.Optimizer:
    """The optimizer the ``Trainer`` would build from ``args`` (AdamW, its lr/betas/eps/weight decay, no decay
    on biases and norms), with STR's "thresholds" and "norms" in their own groups.

    ``threshold_decay`` is the thresholds' decay when no ``target_sparsity`` steers it (default
    ``args.weight_decay``; it is what makes plain STR sparse, so 0 — the ``Trainer``'s default —
    leaves the thresholds to the loss alone). ``optimizer="sgd"`` is STR's own recipe (momentum 0.875).
    """
    try:
        decay_names = set(Trainer.get_decay_parameter_names(None, model))  # the Trainer's own rule (it ignores self)
        no_decay = [n for n, _ in model.named_parameters() if n not in decay_names]
    except (AttributeError, TypeError):  # a transformers without it: decay on every weight, as strfx's own recipe
        no_decay = []
    common: dict[str, Any] = {"weight_decay": args.weight_decay, "threshold_decay": threshold_decay,
                              "norm_decay": norm_decay, "no_decay": no_decay}
    if optimizer == "sgd":
        return _str_optimizer(model, args.learning_rate, optimizer="sgd", **common)
    return _str_optimizer(model, args.learning_rate, optimizer="adamw", betas=(args.adam_beta1, args.adam_beta2),
                          eps=args.adam_epsilon, **common)


class STRTrainerCallback(SessionResults, TrainerCallback, ExportableState):
    """Target controller after each optimizer step, sparsity in the logs, shrink + export at the end.

    ``target_sparsity``: unstructured, the fraction of STR weights that end at zero; structured, the
    fraction of FLOPs removed, or of parameters with ``target_metric="params"`` (None: plain STR).
    ``export_dir``: where the shrunk model's ``model.onnx``/``model.pt2`` go (None: no export). ``metadata``: written into the ONNX file.
    ``rewind``: see :class:`STRSession` (then ``callback.rewound()`` after training).
    The optimizer must carry STR's groups: ``optimizers=(str_optimizer(model, args), None)``.
    ``trainer.train(resume_from_checkpoint=...)`` with ``restore_callback_states_from_checkpoint=True``
    continues the controller where the checkpoint left it (the ``Trainer`` then builds a new callback
    object from the saved state: read results from ``trainer.callback_handler``, not the old object).
    """

    def __init__(self, target_sparsity: float | None = None, *, export_dir: str | Path | None = None,
                 controller: ControllerConfig | dict[str, Any] | None = None, metadata: dict[str, str] | None = None,
                 force: bool = False, rewind: Literal["off", "start", "ramp"] = "off",
                 target_metric: Literal["flops", "params"] = "flops"):
        self.session = STRSession(target_sparsity, export_dir=export_dir, controller=controller, metadata=metadata,
                                  force=force, rewind=rewind, target_metric=target_metric)
        self._args = {"target_sparsity": target_sparsity, "export_dir": str(export_dir) if export_dir else None,
                      "controller": self.session.controller_config.model_dump(exclude_unset=True),
                      "metadata": metadata, "force": force, "rewind": rewind,
                      "target_metric": target_metric}
        self._logs: dict[str, float] = {}
        self.restored: dict[str, Any] | None = None  # set by the Trainer from a checkpoint (see state())

    def state(self) -> dict[str, Any]:
        """What the ``Trainer`` saves in its checkpoints (JSON): how to rebuild this callback, and the controller."""
        return {"args": self._args, "attributes": {"restored": self.session.state_dict()}}

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        assert model is not None and optimizer is not None
        self.session.attach(model)
        if self.restored:
            self.session.load_state_dict(self.restored)
        self.session.start(optimizer, state.max_steps)
        controller = self.session.controller
        if controller is not None and not self.restored and state.global_step > 0:  # resumed without the saved state
            controller.last_step = state.global_step  # measure the next update's Δt from here, not from step 0

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, optimizer: Any = None,
                    **kwargs: Any) -> None:
        logs = self.session.after_step(optimizer, state.global_step)
        if logs:
            self._logs = logs

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        """Add the sparsity to the record (``state.log_history``) and to what later callbacks print."""
        if self.session.meter is None:
            return
        extra = {**self._logs, **self.session.measure()}
        if logs is not None:
            logs.update(extra)
        if state.log_history:
            state.log_history[-1].update(extra)

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.session.finish()
