"""``--target-sparsity``: land a run at a chosen sparsity while STR still decides where it goes.

Plain STR cannot be told "end at 90%": its sparsity emerges from ``s_init`` and the decay on the
thresholds ``s`` (that decay pulls every ``s`` towards 0, i.e. raises every threshold ``g(s)``,
while the task loss pushes back on layers that need their weights). So we keep STR exactly as it
is and only turn the one global knob it already has: the weight decay λ of the optimizer's
``"thresholds"`` parameter group.

The decay is set through the learning rate it will be multiplied with: SGD with momentum μ moves
``s`` by about ``lr/(1-μ)·λ·|s|`` per step, so the controller decides an *effort* u in [-1, 1]
and sets ``λ = u·r/(lr/(1-μ))`` where r (``max_rate`` over the ramp's steps, at most
``max_step_rate`` per step) is the fastest relative pace it lets ``|s|`` shrink. Bounding the pace is what keeps the thresholds from running
away through the dense bulk of the weight distribution (a runaway prunes everything and the run
never recovers); negative effort (when ahead) lowers thresholds again.

Controller (documented in the README, "Target sparsity"):

* The *measured* sparsity: unstructured, the fraction of STR weights that are exactly zero (the
  report's ``sparsity``); structured, the fraction of FLOPs the shrunk model saves (the report's
  ``shrunk_flops``), which includes the next layers' lost input channels — or, with
  ``target_metric="params"``, the fraction of parameters it saves; low-rank, the fraction of
  the reparameterised layers' weights that factoring at the learned ranks saves (the decay is then
  set on the singular values too, the "norms" group). :class:`SparsityMeter`
  keeps that affordable every few steps by rescaling a per-layer estimate with real shrinks.
* A *schedule* rises from 0 to the target X with the cubic curve of Zhu & Gupta (2017),
  ``X·(1-(1-p)^3)``, between ``ramp_start`` and ``ramp_end`` (fractions of training, default
  5%→60%), then holds X while the learning rate anneals, so the last 40% settle the weights.
* Every ``interval_steps`` optimizer steps, a PI controller sets the effort
  ``u = clip(Kp·e + I, -max_reverse, 1)``, ``I += Ki·e·Δt``, with ``e = (schedule - measured) / min(X, 1 - X)``
  (relative to the target, or above 50 % to the density it leaves: at X = 99 % a run at 96.6 % keeps 3.4× the
  weights asked for, which ``/ X`` called 2.4 % behind, and the run ended there) and Δt the fraction of
  training since the last update, in percent (so it is indifferent to run length); the integral only moves
  while the effort is not saturated (anti-windup).

Pace: the cap per step is what keeps short runs from lurching (momentum answers ~1/(1-μ) steps late),
but on a high target the thresholds' own gradient can hold a run below it at full effort for good
(LeNet-300-100, 700 steps, 98.2 %: stuck at 96.4 %). So while the schedule holds the target and the run is
still behind it at full effort, the pace doubles every ``boost_doubling`` percent of training (never faster
than every 4/(1-μ) steps), up to ``max_boost`` times the cap; it drops back to 1× as soon as the run is at
or ahead of its schedule. Behind on the ramp is left alone: there the lag is transient, and a pace raised
then overshoots. By default only unstructured runs get it: structured mode decays γ with the thresholds, and
a raised pace on both pruned short runs to nothing (100 steps, target 50 %: every unit).

Stopping at the target: once the measured sparsity reaches the final target X, the integral is
cleared of any positive part and the effort is capped at 0, so the decay stops pushing (it may still
turn negative and bring elements back). Without this rule, the integral wound up while the run was
behind the schedule kept the effort positive for hundreds of steps after X was reached, and runs
ended 1–2 points past their target (structured 0.6 → 61.6 % FLOPs removed on LeNet-5/MNIST).

Structured mode: a channel dies when its STR-BN/gate ``|γ|`` falls below ``g(s)``, but decay can
raise ``g(s)`` only towards ``g(0) = 0.5`` while γ starts near 1, so there the same λ is also set
on the ``"norms"`` group (γ of STR-BN and gates): thresholds rise and γ shrinks together, and the
task loss keeps up the γ of the channels it needs.

Because all layers share λ, *which* layers become sparse is still decided by each layer's
loss gradient on its own ``s`` — the layer-wise budget is learned, not imposed. The measurement is
a pure function of the parameters, which DDP keeps identical on every rank, so every rank
computes the same λ without communicating (rank 0's value is broadcast anyway as a safeguard).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, Sequence

import torch
from torch import nn

from strfx.lowrank import lowrank_parametrizations, lowrank_report, ranks
from strfx.modules import channel_carriers, str_weights
from strfx.report import _per_module_flops, _shrunk_flops, carrier_producers, used_tensors
from strfx.train_config import ControllerConfig


class SparsityMeter:
    """Measures the quantity ``--target-sparsity`` refers to, cheaply enough to call every few steps.

    Structured mode targets the FLOPs the *shrunk* model saves, which include the consumers of every
    removed channel (the next layer's inputs), not only the gated layers themselves. Shrinking a copy
    on every call would dominate short runs, so the meter keeps a cheap per-layer estimate (each gated
    layer's own FLOPs × its dead fraction) and rescales it by ``exact / estimate``, re-measured with a
    real shrink whenever the set of dead channels has changed and at least ``exact_every`` calls have
    passed. The schedule is by call count, not time, and its state is checkpointed, so every rank and a
    resumed run see the same numbers. ``metric="params"`` (structured) measures parameters instead of FLOPs
    the same way (each gated layer's own parameters; calibrated with the shrunk model's count).
    """

    def __init__(self, gm: nn.Module, mode: str, example_inputs: Sequence[Any], exact_every: int = 10,
                 metric: Literal["flops", "params"] = "flops"):
        if metric not in ("flops", "params"):
            raise ValueError(f"metric must be 'flops' or 'params', not {metric!r}")
        self.gm, self.mode, self.inputs, self.exact_every = gm, mode, tuple(example_inputs), exact_every
        self.metric = metric
        self.weights = list(str_weights(gm).items())
        self.channels = list(channel_carriers(gm).items())
        self.flops: dict[str, float] = {}  # per carrier: the cost of its producers (FLOPs or parameters)
        self.ranked: dict[str, float] = {}  # per low-rank weight (structured+lowrank): its layer's cost
        self.dense_flops = 0.0  # the dense model's cost, in the same unit
        self.ratio, self.since, self.calibrated_on = 1.0, exact_every, ""
        if mode == "structured":
            if metric == "flops":
                dense, per_module = _per_module_flops(gm, example_inputs)
            else:
                dense, per_module = _per_module_params(gm)
            self.dense_flops = float(dense)
            producers = carrier_producers(gm)
            self.flops = {name: float(sum(per_module.get(p, 0) for p in producers.get(name, [])))
                          for name, _ in self.channels}
            # structured+lowrank: each low-rank layer's own cost, saved in the share factoring saves
            self.ranked = {w: float(per_module.get(w.rpartition(".")[0], 0)) for w in lowrank_parametrizations(gm)}

    @property
    def what(self) -> str:
        """What the measured fraction is of, for messages."""
        if self.mode == "unstructured":
            return "weights zero"
        if self.mode == "lowrank":
            return "weights saved by factoring"
        return "parameters removed" if self.metric == "params" else "FLOPs removed"

    @torch.no_grad()
    def layer_zeros(self) -> dict[str, tuple[int, int]]:
        """Layer name → (zeros, elements) after thresholding."""
        out: dict[str, tuple[int, int]] = {}
        for name, strw in self.weights:
            owner, _, attr = name.rpartition(".")
            original = (self.gm.get_submodule(owner) if owner else self.gm).parametrizations[attr].original
            thr = strw.threshold()
            out[name] = (int((original.abs() <= thr).sum()), original.numel())
        for name, carrier in self.channels:
            g = carrier.value()
            out[name] = (int((g == 0).sum()), g.numel())
        return out

    def estimate(self, zeros: dict[str, tuple[int, int]]) -> float:
        """Structured: FLOPs of the gated layers themselves that their dead channels remove (+ with ``ranks``:
        the share of each low-rank layer factoring at its rank saves; overlaps are left to the calibration)."""
        removed = sum(self.flops.get(name, 0.0) * z / max(n, 1) for name, (z, n) in zeros.items())
        if self.ranked:
            for row in lowrank_report(self.gm).layers:
                removed += self.ranked.get(row.name, 0.0) * (1 - row.params_after / max(row.params_dense, 1))
        return removed / max(self.dense_flops, 1.0)

    @torch.no_grad()
    def exact(self) -> float:
        """Structured: ``1 - FLOPs(shrunk model) / FLOPs(dense)`` (or parameters), by really shrinking a copy."""
        was_training = self.gm.training
        self.gm.eval()
        try:
            shrunk = _shrunk_flops(self.gm, self.inputs, int(self.dense_flops), zeros=True, fallback=None,
                                   metric=self.metric)
        finally:
            self.gm.train(was_training)
        return 1.0 - shrunk / max(self.dense_flops, 1.0) if shrunk is not None else float("nan")

    def _dead_pattern(self) -> str:
        masks = [(carrier.value() == 0).to(torch.uint8) for _, carrier in self.channels]
        if self.ranked:
            masks.append(torch.tensor([r for r, _ in ranks(self.gm).values()]).view(torch.uint8))
        return hashlib.sha1(torch.cat(masks).cpu().numpy().tobytes()).hexdigest() if masks else ""

    @torch.no_grad()
    def __call__(self) -> float:
        if self.mode == "lowrank":  # weights the factored layers save (strfx.lowrank's report)
            from strfx.lowrank import lowrank_report

            rep = lowrank_report(self.gm)
            return 1.0 - rep.params_after / max(rep.params_dense, 1)
        zeros = self.layer_zeros()
        if self.mode == "unstructured":
            total = sum(n for _, n in zeros.values())
            return sum(z for z, _ in zeros.values()) / max(total, 1)
        estimate = self.estimate(zeros)
        self.since += 1
        if estimate > 0 and self.since >= self.exact_every:
            pattern = self._dead_pattern()
            if pattern != self.calibrated_on:
                exact = self.exact()
                if exact == exact:  # a model shrink refuses keeps the last ratio
                    # the shrunk model saves at least the channel estimate; ranks and channels may overlap
                    self.ratio = exact / estimate if self.ranked else max(exact / estimate, 1.0)
                self.since, self.calibrated_on = 0, pattern
        return min(estimate * self.ratio, 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "since": self.since, "calibrated_on": self.calibrated_on}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ratio, self.since, self.calibrated_on = float(state["ratio"]), int(state["since"]), str(state["calibrated_on"])


def _per_module_params(model: nn.Module) -> tuple[int, dict[str, int]]:
    """Parameters the model computes with (see strfx.report.used_tensors), and per module its own."""
    from torch.nn.utils import parametrize

    per_module: dict[str, int] = {}
    for name, mod in model.named_modules():
        own = [p for p in mod._parameters.values() if p is not None]
        if parametrize.is_parametrized(mod):
            own += [getattr(mod, t) for t in mod.parametrizations]
        per_module[name] = sum(t.numel() for t in own)
    return sum(t.numel() for t in used_tensors(model)), per_module


class ThresholdDecayController:
    """Sets the thresholds' weight decay from the sparsity error; see the module docstring."""

    def __init__(self, target: float, total_steps: int, config: ControllerConfig, base_decay: float, momentum: float,
                 mode: str | None = None):
        self.target, self.total_steps, self.cfg = float(target), max(int(total_steps), 1), config
        self.max_boost = config.max_boost if config.max_boost is not None else 4.0 if mode == "unstructured" else 1.0
        self.base_decay, self.momentum = float(base_decay), float(momentum)
        self.interval = config.interval_steps or max(1, self.total_steps // 400)
        ramp_steps = max((config.ramp_end - config.ramp_start) * self.total_steps, 1.0)
        # relative shrink of |s| per step at full effort; capped per step so short runs cannot lurch either
        self.max_rate = min(config.max_rate / ramp_steps, config.max_step_rate)
        # what the error is relative to: the target, or the density it leaves when that is smaller (at 99 %,
        # 96.6 % is 2.4 % of the target behind but keeps 3.4× the weights asked for)
        self.scale = max(min(max(self.target, 0.05), 1.0 - self.target), 1e-3)
        self.integral = 0.0
        self.decay = self.base_decay
        self.effort = 0.0
        self.boost = 1.0  # pace multiple earned by lagging at full effort (see "Pace" above)
        self.lagging = False  # whether the last update was at full effort and behind
        self.last_step = 0
        self.last_measured = 0.0

    def schedule(self, step: int) -> float:
        """Sparsity the run should have reached after ``step`` optimizer steps."""
        p = step / self.total_steps
        a, b = self.cfg.ramp_start, self.cfg.ramp_end
        frac = min(max((p - a) / (b - a), 0.0), 1.0)
        return self.target * (1.0 - (1.0 - frac) ** 3)

    def due(self, step: int) -> bool:
        return step - self.last_step >= self.interval or step >= self.total_steps

    def update(self, step: int, measured: float, lr: float) -> float:
        """Feed the sparsity measured after ``step`` steps and the current lr; returns the new decay."""
        cfg = self.cfg
        steps = step - self.last_step
        dt = 100.0 * steps / self.total_steps  # percent of training since the last update
        self.last_step, self.last_measured = step, measured
        if step < cfg.ramp_start * self.total_steps:
            self.decay = self.base_decay
            return self.decay
        err = (self.schedule(step) - measured) / self.scale
        raw = cfg.proportional * err + self.integral
        saturated = (raw >= 1.0 and err > 0) or (raw <= -cfg.max_reverse and err < 0)
        if not saturated:  # conditional integration: no wind-up while the effort is already at its limit
            self.integral = min(max(self.integral + cfg.integral * err * dt, -cfg.max_reverse), 1.0)
        if measured >= self.target:  # reached: never push further (see "Stopping at the target" above)
            self.integral = min(self.integral, 0.0)
        self.effort = min(max(cfg.proportional * err + self.integral, -cfg.max_reverse), 1.0)
        if measured >= self.target:
            self.effort = min(self.effort, 0.0)
        # full effort through the hold phase and still behind: the thresholds' gradient holds them back. Only
        # there (behind on the ramp is transient), and never doubling faster than 4 momentum lags
        holding = step >= cfg.ramp_end * self.total_steps
        lagging = holding and self.effort >= 1.0 and err > 0
        if lagging and self.lagging:
            doubling = max(cfg.boost_doubling / 100.0 * self.total_steps, 4.0 / (1.0 - self.momentum))
            self.boost = min(self.boost * 2.0 ** (steps / doubling), self.max_boost)
        elif err <= 0 or measured >= self.target:
            self.boost = 1.0
        self.lagging = lagging
        lr_eff = lr / (1.0 - self.momentum)  # SGD with momentum moves a parameter lr/(1-μ) per unit gradient
        self.decay = self.effort * self.max_rate * self.boost / max(lr_eff, 1e-12)
        if self.effort > 0:
            self.decay = max(self.decay, self.base_decay)
        self.decay = min(max(self.decay, -cfg.max_decay), cfg.max_decay)  # lr → 0 at the end must not blow λ up
        return self.decay

    def state_dict(self) -> dict[str, float]:
        return {"integral": self.integral, "decay": self.decay, "effort": self.effort, "last_step": self.last_step,
                "last_measured": self.last_measured, "target": self.target, "boost": self.boost, "lagging": float(self.lagging)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.integral, self.decay, self.effort = float(state["integral"]), float(state["decay"]), float(state["effort"])
        self.last_step, self.last_measured = int(state["last_step"]), float(state["last_measured"])
        self.boost = float(state.get("boost", 1.0))  # checkpoints from before the adaptive pace have none
        self.lagging = bool(state.get("lagging", 0.0))


# ------------------------------------------------------------------------ one update, for any training loop


def steered_groups(mode: str) -> tuple[str, ...]:
    """Optimizer groups (by ``name``, see :func:`strfx.param_groups`) whose decay the controller sets.

    Structured and low-rank mode steer the "norms" too (γ/gates, singular values): see the module docstring.
    """
    return ("thresholds",) if mode == "unstructured" else ("thresholds", "norms")


def named_group(optimizer: Any, name: str) -> dict[str, Any] | None:
    """The optimizer's parameter group called ``name`` (groups from :func:`strfx.param_groups` carry one)."""
    return next((g for g in optimizer.param_groups if g.get("name") == name), None)


def steer(optimizer: Any, controller: ThresholdDecayController, meter: SparsityMeter, step: int, mode: str,
          sync: Any = None) -> tuple[float, float] | None:
    """One controller update after optimizer step ``step``, when it is due: measure the sparsity, compute
    the decay, set it on the steered groups. ``sync(decay) -> decay`` may make ranks agree (a broadcast).

    This is the whole per-step contract of ``--target-sparsity``; strfx's trainer and the Lightning /
    HuggingFace callbacks (strfx.integrations) call it after every optimizer step.
    Returns ``(measured, decay)`` when it updated, else None.
    """
    if not controller.due(step):
        return None
    group = named_group(optimizer, "thresholds")
    if group is None:
        raise ValueError("the optimizer has no parameter group named 'thresholds'; build it with strfx.param_groups(model)")
    measured = meter()
    decay = controller.update(step, measured, group["lr"])
    if sync is not None:
        decay = controller.decay = float(sync(decay))
    for name in steered_groups(mode):
        g = named_group(optimizer, name)
        if g is not None:
            g["weight_decay"] = decay
    return measured, decay
