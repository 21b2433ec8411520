"""What every training-loop integration does around the user's loop (see strfx.integrations)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
from torch import nn

from strfx.controller import SparsityMeter, ThresholdDecayController, named_group, steer
from strfx.errors import OutputExistsError, StrfxError
from strfx.train_config import ControllerConfig, TrainConfig

_RECIPE = TrainConfig()
DECOUPLED_MAX_DECAY = 1e4  # the controller's clamp on λ under AdamW (λ·lr stays ≤ max_step_rate before it bites)  # strfx train's defaults: the STR paper's recipe


def find_str_model(root: nn.Module) -> nn.Module:
    """``root`` or its first submodule made by :func:`strfx.sparsify` (a LightningModule holds it as an attribute)."""
    for module in root.modules():
        if isinstance(getattr(module, "_strfx", None), dict) and "config" in module._strfx:
            return module
    raise StrfxError(f"no model made by strfx.sparsify in {type(root).__name__}; train the model strfx.sparsify "
                     f"returns (in a LightningModule: assign it to an attribute, e.g. self.model = strfx.sparsify(...))")


def str_optimizer(model: nn.Module, lr: float, *, optimizer: Literal["sgd", "adamw"] = "sgd",
                  momentum: float = _RECIPE.momentum, nesterov: bool = False,
                  weight_decay: float = _RECIPE.weight_decay, threshold_decay: float | None = None,
                  norm_decay: float | None = None, no_decay: Iterable[str] = (), **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer over :func:`strfx.param_groups` (named "weights", "thresholds", "norms").

    ``"sgd"`` is STR's recipe (momentum 0.875, decay 1/32768 on everything, thresholds included: that
    decay is what raises them). ``"adamw"`` (decoupled decay, so the controller can still set the
    thresholds' pace) takes ``betas``/``eps`` in ``kwargs``. Parameters named in ``no_decay`` leave
    the "weights" group for a "weights_no_decay" group (HuggingFace's rule for biases and norms).
    """
    from strfx.api import param_groups

    groups = param_groups(model, weight_decay, threshold_decay, norm_decay)
    skip = set(no_decay)
    if skip and groups and groups[0]["name"] == "weights":
        names = {id(p): n for n, p in model.named_parameters()}
        rest = groups[0]["params"]
        groups[0]["params"] = [p for p in rest if names.get(id(p)) not in skip]
        groups.insert(1, {"name": "weights_no_decay", "params": [p for p in rest if names.get(id(p)) in skip],
                          "weight_decay": 0.0})
        groups = [g for g in groups if g["params"]]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **kwargs)
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **kwargs)
    raise StrfxError(f"str_optimizer(optimizer={optimizer!r}): use 'sgd' (STR's recipe) or 'adamw'")


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside Lightning's / accelerate's wrappers."""
    for _ in range(8):  # AcceleratedOptimizer (an Optimizer itself) holds .optimizer, LightningOptimizer ._optimizer
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _decay_momentum(optimizer: Any, group: dict[str, Any]) -> float:
    """μ in the controller's pace ``lr/(1-μ)·λ``: SGD's momentum; 0 for decoupled decay (AdamW: ``p -= lr·λ·p``)."""
    opt = _unwrap(optimizer)
    if isinstance(opt, torch.optim.SGD):
        return float(group.get("momentum", 0.0))
    if isinstance(opt, torch.optim.AdamW) or (isinstance(opt, torch.optim.Adam) and group.get("decoupled_weight_decay")):
        return 0.0
    raise StrfxError(f"target_sparsity steers the thresholds' weight decay, which needs SGD or AdamW (decoupled "
                     f"decay), not {type(opt).__name__}; build the optimizer with strfx.integrations.str_optimizer")


class STRSession:
    """The STR side of a training loop: sparsity measurement, the target controller, shrink + export.

    Call :meth:`start` once the optimizer exists, :meth:`after_step` after every optimizer step (it
    updates the controller when due and returns what to log) and :meth:`finish` at the end.
    ``export_dir`` gets ``model.onnx`` + ``model.pt2`` of the shrunk model (never overwritten without
    ``force``; checked at :meth:`start`, before any training); ``metadata`` goes into the ONNX file
    (e.g. ``strfx.contract.InputContract(...).metadata()``). ``target_metric`` (structured): the target is a
    fraction of the FLOPs (default) or of the parameters the shrunk model saves. ``rewind`` ("start", or "ramp" with a target)
    keeps a CPU copy of the weights at :meth:`start` or when the target schedule starts rising;
    :meth:`rewound` then gives STR's units cut from them (strfx.rewind), shrunk, for the loop to train.
    That copy lives in memory only (checkpoint state stays small and JSON-able): a loop resumed past the
    rewind point cannot rewind.
    """

    def __init__(self, target_sparsity: float | None = None, *, export_dir: str | Path | None = None,
                 controller: ControllerConfig | dict[str, Any] | None = None, metadata: dict[str, str] | None = None,
                 force: bool = False, rewind: Literal["off", "start", "ramp"] = "off",
                 target_metric: Literal["flops", "params"] = "flops"):
        if target_sparsity is not None and not 0 < target_sparsity < 1:
            raise StrfxError(f"target_sparsity must be between 0 and 1 (a fraction), got {target_sparsity}")
        if rewind not in ("off", "start", "ramp"):
            raise StrfxError(f"rewind={rewind!r}: use 'off', 'start' or 'ramp'")
        if rewind == "ramp" and target_sparsity is None:
            raise StrfxError("rewind='ramp' rewinds to where the target_sparsity schedule starts rising; give "
                             "target_sparsity, or use rewind='start'")
        if target_metric not in ("flops", "params"):
            raise StrfxError(f"target_metric={target_metric!r}: use 'flops' or 'params' (structured mode)")
        self.rewind, self.target_metric = rewind, target_metric
        self.rewind_step: int | None = None
        self.rewind_state: dict[str, torch.Tensor] | None = None
        self.target = target_sparsity
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.controller_config = ControllerConfig.model_validate(controller or {})
        if rewind == "ramp" and not {"ramp_start", "ramp_end"} & self.controller_config.model_fields_set:
            from strfx.train import REWIND_RAMP  # train unpushed for most of the run, then search (as strfx train)

            self.controller_config = ControllerConfig.model_validate({**(controller or {}), **REWIND_RAMP})
        self.metadata, self.force = metadata, force
        self.model: nn.Module | None = None
        self.meter: SparsityMeter | None = None
        self.controller: ThresholdDecayController | None = None
        self.last_step = -1
        self.shrunk: nn.Module | None = None
        self.export_summary: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None  # a checkpoint's state, applied at start()

    def attach(self, model: nn.Module) -> nn.Module:
        """Find the sparsified model under ``model``; returns it."""
        self.model = find_str_model(model)
        self.mode = self.model._strfx["config"].mode
        self.example_inputs = tuple(self.model._strfx["example_inputs"])
        if self.export_dir is not None and not self.force:  # fail now, not after training
            for name in ("model.onnx", "model.pt2"):
                if (self.export_dir / name).exists():
                    raise OutputExistsError(f"{self.export_dir / name} already exists; pass force=True to replace it "
                                            f"or choose another export_dir")
        return self.model

    def start(self, optimizer: Any, total_steps: int) -> None:
        """Check the optimizer has the STR groups; set up the meter and (with a target) the controller."""
        assert self.model is not None, "attach(model) first"
        thresholds = named_group(optimizer, "thresholds")
        if thresholds is None:
            raise StrfxError("the optimizer has no 'thresholds' parameter group, so STR's thresholds would get the "
                             "weights' settings; build it with strfx.integrations.str_optimizer(model, lr) or "
                             "torch.optim.SGD(strfx.param_groups(model), ...)")
        device = next(self.model.parameters()).device  # the loop may have moved the model already
        if self.target_metric != "flops" and self.mode != "structured":
            raise StrfxError(f"target_metric={self.target_metric!r} applies to structured models; this one is {self.mode} "
                             f"(its target is a fraction of the weights)")
        self.meter = SparsityMeter(self.model, self.mode, tuple(t.to(device) for t in self.example_inputs),
                                   metric=self.target_metric)
        if self.target is not None:
            if not total_steps or total_steps == float("inf"):
                raise StrfxError("target_sparsity needs the number of optimizer steps in advance; set max_steps or "
                                 "max_epochs (with a sized dataloader)")
            momentum = _decay_momentum(optimizer, thresholds)
            cfg = self.controller_config
            if momentum == 0.0 and "max_decay" not in cfg.model_fields_set:
                # decoupled decay (AdamW; also SGD without momentum) moves s by exactly lr·λ·|s| and no momentum
                # buffer carries λ·s into later steps, so λ needs no clamp against a vanishing lr; with AdamW's
                # usual small lr the default clamp (1) would stall the controller
                cfg = cfg.model_copy(update={"max_decay": DECOUPLED_MAX_DECAY})
            self.controller = ThresholdDecayController(self.target, int(total_steps), cfg, thresholds["weight_decay"],
                                                       momentum, mode=self.mode)
        if self.rewind != "off":
            self.rewind_step = 0 if self.rewind == "start" else math.ceil(
                self.controller_config.ramp_start * int(total_steps))
            if self.rewind_step == 0:
                self._keep_rewind_state()
        if self._pending:  # resumed from a checkpoint of the loop (Lightning saves callback state)
            if self.controller is not None and self._pending.get("controller"):
                self.controller.load_state_dict(self._pending["controller"])
            if self._pending.get("meter"):
                self.meter.load_state_dict(self._pending["meter"])
            self.last_step = int(self._pending.get("last_step", -1))
            self._pending = None

    def state_dict(self) -> dict[str, Any]:
        """Controller and meter state, for the loop's checkpoints (a resumed run continues the same schedule)."""
        return {"controller": self.controller.state_dict() if self.controller else {},
                "meter": self.meter.state_dict() if self.meter else {}, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = dict(state)

    def after_step(self, optimizer: Any, step: int) -> dict[str, float] | None:
        """After optimizer step ``step`` (counted from 1): the controller's update when due; what to log."""
        if self.controller is None or step == self.last_step:  # gradient accumulation: one update per step
            return None
        self.last_step = step
        if step == self.rewind_step:
            self._keep_rewind_state()
        assert self.meter is not None
        optimizer = _unwrap(optimizer)
        if self.controller.momentum and (group := named_group(optimizer, "thresholds")) is not None:
            self.controller.momentum = float(group.get("momentum", self.controller.momentum))  # a cycling schedule
        done = steer(optimizer, self.controller, self.meter, step, self.mode)
        if done is None:
            return None
        measured, decay = done
        return {"strfx/sparsity": measured, "strfx/target_now": self.controller.schedule(step),
                "strfx/threshold_decay": decay}

    def _keep_rewind_state(self) -> None:
        assert self.model is not None
        self.rewind_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def rewound(self) -> nn.Module:
        """``rewind``: STR's dead units cut from the kept earlier weights, shrunk (a plain model to train on).

        The dead sets are read off the model as it is now; the shrink is verified against the rewound
        masked model (float32 and float64). Its report is on ``.strfx_shrink``, the rewind's on ``.strfx_rewind``.
        """
        from strfx.api import deepcopy_model
        from strfx.rewind import rewind
        from strfx.surgery import shrink

        if self.rewind_state is None:
            raise StrfxError("no earlier weights kept: create the session with rewind='start' (or 'ramp' with a "
                             "target) and train from start() on (a loop resumed past the rewind point has none)")
        assert self.model is not None
        masked = deepcopy_model(self.model).to("cpu", memory_format=torch.contiguous_format).eval()
        info = rewind(masked, self.rewind_state)
        small = shrink(masked, tuple(t.cpu() for t in self.example_inputs))
        small.strfx_rewind = {"to": self.rewind, "step": self.rewind_step, **info}
        return small

    def measure(self) -> dict[str, float]:
        """The sparsity the target refers to (unstructured: weights zero; structured: FLOPs removed)."""
        assert self.meter is not None
        return {"strfx/sparsity": self.meter()}

    def finish(self) -> dict[str, Any] | None:
        """Shrink and export to ``export_dir`` (if given); the shrunk model is kept as :attr:`shrunk`."""
        if self.export_dir is None or self.model is None:
            return None
        from strfx.deploy import shrink_and_export

        self.export_summary, self.shrunk = shrink_and_export(self.model, self.example_inputs, self.export_dir,
                                                             metadata=self.metadata, force=self.force, repeats=3)
        return self.export_summary


class SessionResults:
    """What a callback built on an :class:`STRSession` hands back after training."""

    session: STRSession

    @property
    def shrunk(self) -> Any:
        """The shrunk model after training (with ``export_dir``)."""
        return self.session.shrunk

    @property
    def export_summary(self) -> dict[str, Any] | None:
        return self.session.export_summary

    def rewound(self) -> Any:
        """With ``rewind``: STR's units cut from the earlier weights, shrunk (:meth:`STRSession.rewound`)."""
        return self.session.rewound()
