"""Why structured STR loses to network slimming on LeNet-5-Caffe, one change at a time (issue 14).

    nice -n 19 python benchmarks/struct_study.py NAME [--seed 0] [--epochs 6] [--set key=value ...]
    nice -n 19 python benchmarks/struct_study.py NAME --arch lenet300 --rewind --set target=0.58 rewind_at=0.45 ...

Every variant trains LeNet-5-Caffe from scratch on MNIST with benchmarks/mnist.py's optimizer, learning
rate schedule, weight decay and step budget; only how the gates after conv1/conv2/fc1 are pushed to
zero changes. One JSON line per run is appended to docs/struct_study.jsonl (error, widths, FLOPs left).

Knobs (``--set``), each one candidate of issue 14:

* ``s_init``, ``D`` (threshold-decay budget, λ_s·Σlr), ``N`` (L2 budget on the gates, λ_u·Σlr);
* ``reg`` — the gates' regulariser that ``N`` (or the controller) scales: ``l2`` (weight decay, the
  default), ``l1`` (slimming's penalty), ``polar`` (polarization, Zhuang et al. 2020:
  ``t·|u| − |u − mean(u)|`` per layer, ``t = polar_t``);
* ``keep_dead`` — no decay on gates that are already below their threshold (raw magnitude kept);
* ``per_channel`` — one threshold per gate entry instead of one per layer;
* ``ramp_end`` — end of the controller's cubic ramp (fraction of the steps; default 0.6);
* ``ft`` — thresholds frozen at ``ramp_end``, then fine-tune with the learning rate restarted
  (``restart=0``: the one cosine schedule continues; ``restart=2``: one cosine until the freeze, then
  back to the peak);
* ``fold`` — with ``ft``: at the freeze, fold each alive gate into its rows (gate = 1, same function);
* ``target`` — land at this fraction of FLOPs removed with strfx's controller (strfx.controller), which
  then steers the decay of ``steer`` (``both``: s and gates, as `strfx train` does; ``s``; ``gates``).
  Its floor decay (``base_decay``, applied whenever it pushes) is ``D``/Σlr here (0.043 at 6 epochs),
  above its full-effort decay (~0.01 at the peak learning rate), so in these runs it acts nearly on/off;
  benchmarks/mnist.py's ``str-target`` uses strfx train's floor (the weight decay) instead.
* ``--rewind`` — STR as a unit search only (benchmarks/mnist.py's ``str-rewind``): ``--set`` takes
  ``target`` (FLOPs removed), ``cost=1`` (benchmarks/mnist.py's ``str-rewind-cost``: the decay of each
  carrier × its FLOPs per channel) and the fields of :class:`baselines.RewindSchedule` (``rewind_at``,
  ``ramp_start``, ``ramp_end``, ``search_end``, ``search_lr``, ``retrain_lr``). ``--rewind`` and ``--slim``
  take ``--arch lenet300`` too (the other variants are LeNet-5-Caffe's gates only).
* ``--widths C1 C2 F1`` — a plain LeNet-5-Caffe of those widths trained from scratch, same steps: tells
  whether an STR run's error comes from the widths it chose or from its weights.

Every run of issue 14 is in docs/struct_study.jsonl (with its arch, commit, date and load average since the
LeNet-300-100 runs); docs/results.md tabulates them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mnist as M  # noqa: E402
from _env import environment  # noqa: E402

import strfx  # noqa: E402
from strfx.controller import SparsityMeter, ThresholdDecayController  # noqa: E402
from strfx.modules import str_units  # noqa: E402
from baselines import RewindSchedule  # noqa: E402
from strfx.train_config import ControllerConfig  # noqa: E402

OUT = M.DOCS / "struct_study.jsonl"
DEFAULTS: dict[str, Any] = {"s_init": -8.0, "D": 3.0, "N": 0.15, "polar_t": 1.2,
                            "keep_dead": 0, "per_channel": 0, "ft": 0, "target": 0.0, "steer": "both",
                            "wd_gates": 0.0, "fold": 0, "reg": "l2", "restart": 1, "ramp_end": 0.6}


@torch.no_grad()
def fold_gates(gm: nn.Module) -> None:
    """Move every alive gate's value into the rows it scales, so the gate is exactly 1 (dead stay 0).

    Function-preserving; undoes the small-gate × large-row parametrization that slows the gated
    layers' learning after the gates were pushed down to their thresholds.
    """
    from strfx.modules import UnitScale, _parametrized

    for _, _, chain in _parametrized(gm):
        for p in chain:
            if isinstance(p, UnitScale):
                u = p.unit.effective_weight()
                scale = torch.where(u != 0, u, torch.ones_like(u))[p.index]
                shape = [1] * chain.original.dim()
                shape[p.dim] = -1
                chain.original.mul_(scale.reshape(shape))
    for u in str_units(gm).values():
        eff = u.effective_weight()
        t = u.threshold().expand_as(eff)
        u.weight.copy_(torch.where(eff != 0, eff.sign() * (1 + t), u.weight))


def run(opts: dict[str, Any], seed: int, epochs: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = M.load_mnist()
    model = M.load_arch("lenet5")()
    example = (torch.zeros(2, 1, 28, 28),)
    total = epochs * (xtr.shape[0] // M.BATCH)
    t0 = time.perf_counter()
    gm = strfx.sparsify(model, "structured", config={"s_init": opts["s_init"]}, verify=False, example_inputs=example)
    units = list(str_units(gm).values())
    if opts["per_channel"]:
        for u in units:
            u.s = nn.Parameter(u.s.detach().expand(u.weight.shape).clone())
    learn = int(opts["ramp_end"] * total) if opts["ft"] else total

    def lr_at(step: int) -> float:
        if not opts["restart"]:
            return M.cosine(step, 0, total, M.LR)
        if opts["restart"] == 2:  # one cosine until the freeze, then a jump back to the peak
            return M.cosine(step, 0, total, M.LR) if step < learn else M.cosine(step, learn, total, M.LR)
        if step < learn:
            return M.cosine(step, 0, learn, M.LR)
        return M.cosine(step, learn, total, M.LR * M.RETRAIN_LR_FRAC)

    spent = sum(lr_at(t) for t in range(learn))
    lam_s, lam_u = opts["D"] / spent, opts["N"] / spent
    groups = strfx.param_groups(gm, weight_decay=M.WD, threshold_decay=lam_s, norm_decay=opts["wd_gates"])
    state = {"lam_u": lam_u, "lam_s": lam_s, "frozen": False}

    def penalty() -> torch.Tensor:
        if state["frozen"]:
            return torch.zeros(())
        total_p = torch.zeros(())
        lam = state["lam_u"]
        for u in units:
            w = u.weight
            alive = (w.abs() > u.threshold()).to(w.dtype) if opts["keep_dead"] else 1.0
            a = w.abs()
            if lam and opts["reg"] == "l2":
                total_p = total_p + 0.5 * lam * (alive * w * w).sum()
            elif lam and opts["reg"] == "l1":
                total_p = total_p + lam * (alive * a).sum()
            elif lam and opts["reg"] == "polar":
                total_p = total_p + lam * (alive * (opts["polar_t"] * a - (a - a.mean()).abs())).sum()
        return total_p

    ctrl = meter = None
    if opts["target"]:
        ccfg = ControllerConfig(ramp_end=opts["ramp_end"], freeze=False)
        ctrl = ThresholdDecayController(opts["target"], total, ccfg, lam_s, M.MOMENTUM)
        meter = SparsityMeter(gm, "structured", example)

    def before(step: int) -> None:
        if opts["ft"] and step == learn:
            state["frozen"] = True
            for g in groups:
                if g["name"] == "thresholds":
                    for p in g["params"]:
                        p.requires_grad_(False)
            if opts["fold"]:
                fold_gates(gm)

    def after(step: int) -> None:
        if ctrl is not None and not state["frozen"] and ctrl.due(step + 1):
            decay = ctrl.update(step + 1, meter(), lr_at(step + 1))
            for g in groups:
                if g["name"] == "thresholds" and opts["steer"] in ("both", "s"):
                    g["weight_decay"] = decay
            if opts["steer"] in ("both", "gates"):
                state["lam_u"] = decay

    M.fit(gm, groups, (xtr, ytr), total, seed, lr_at, before_step=before, after_step=after, penalty=penalty)
    err = M.test_error(gm, xte, yte)
    widths = M.gate_widths(gm)
    fl = M.shrunk_flops("lenet5", widths) / M.shrunk_flops("lenet5", M.dense_widths("lenet5"))
    return {"error": err, "widths": widths, "flops": fl, "seed": seed, "epochs": epochs,
            "thresholds": [float(u.threshold().mean()) for u in units],
            "gate_mean": [float(u.effective_weight()[u.effective_weight() != 0].abs().mean()) for u in units],
            "train_s": time.perf_counter() - t0}


def run_slim(knob: float, seed: int, epochs: int, arch: str = "lenet5") -> dict[str, Any]:
    r = M.run_one(arch, "slim", knob, seed, epochs)
    return {"error": r.error, "widths": r.widths, "flops": r.flops / r.dense_flops, "seed": seed, "epochs": epochs,
            "train_s": r.train_s}


def run_widths(widths: list[int], seed: int, epochs: int) -> dict[str, Any]:
    """A plain LeNet-5-Caffe of the given widths trained from scratch (same steps): is it the widths or the weights?"""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = M.load_mnist()
    model = M._LeNet5W(*widths)
    total = epochs * (xtr.shape[0] // M.BATCH)
    t0 = time.perf_counter()
    M.fit(model, [{"params": list(model.parameters()), "weight_decay": M.WD}], (xtr, ytr), total, seed,
          lambda t: M.cosine(t, 0, total, M.LR))
    fl = M.shrunk_flops("lenet5", widths) / M.shrunk_flops("lenet5", M.dense_widths("lenet5"))
    return {"error": M.test_error(model, xte, yte), "widths": widths, "flops": fl, "seed": seed, "epochs": epochs,
            "train_s": time.perf_counter() - t0}


def run_rewind(opts: dict[str, str], seed: int, epochs: int, arch: str = "lenet5") -> dict[str, Any]:
    """One ``str-rewind`` run with the schedule given as ``--set`` strings (``target`` = FLOPs removed)."""
    fields = {f: opts[f] if f in ("search_lr", "retrain_lr") else float(opts[f])
              for f in RewindSchedule.__dataclass_fields__ if f in opts}
    sched = RewindSchedule(**fields)
    r = M.run_rewind(arch, float(opts.get("target", 0.55)), seed, epochs, sched,
                     cost_aware=bool(float(opts.get("cost", 0))))
    return {"error": r.error, "widths": r.widths, "flops": r.flops / r.dense_flops, "seed": seed, "epochs": epochs,
            "search_error": r.extra["search_error"], "train_s": r.train_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--slim", type=float, default=None, help="run network slimming with this prune fraction")
    ap.add_argument("--widths", type=int, nargs=3, default=None, help="train this plain architecture from scratch")
    ap.add_argument("--rewind", action="store_true", help="STR searches the units, an earlier state is retrained")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--arch", default="lenet5", choices=["lenet5", "lenet300"],
                    help="with --rewind or --slim: the network (the other variants are LeNet-5-Caffe's)")
    a = ap.parse_args()
    env = environment()
    stamp = {"arch": a.arch, "commit": env["commit"], "date": env["date"], "load": round(env["loadavg"][0], 1)}
    if a.arch != "lenet5" and not (a.rewind or a.slim is not None):
        ap.error("--arch lenet300 needs --rewind or --slim")
    if a.rewind:
        raw = dict(kv.split("=", 1) for kv in a.set)
        sched = {k: v for k, v in raw.items()}
        res = {"name": a.name, "opts": {"rewind": sched}, **run_rewind(raw, a.seed, a.epochs, a.arch), **stamp}
        with OUT.open("a") as f:
            f.write(json.dumps(res) + "\n")
        print(json.dumps(res), flush=True)
        return
    opts = dict(DEFAULTS)
    for kv in a.set:
        k, v = kv.split("=", 1)
        opts[k] = v if k in ("steer", "reg") else float(v)
    if a.widths:
        res = {"name": a.name, "opts": {"from_scratch": a.widths}, **run_widths(a.widths, a.seed, a.epochs)}
    elif a.slim is not None:
        res = {"name": a.name, "opts": {"slim": a.slim}, **run_slim(a.slim, a.seed, a.epochs, a.arch), **stamp}
    else:
        res = {"name": a.name, "opts": opts, **run(opts, a.seed, a.epochs)}
    with OUT.open("a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
