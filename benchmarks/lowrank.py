"""Low-rank STR on LeNet-300-100 (MNIST) vs truncated-SVD baselines at equal parameters, same epoch budget.

    python benchmarks/lowrank.py --epochs 3 --finetune     # what docs/lowrank.md reports (~10 min on 1 core)
    python benchmarks/lowrank.py --epochs 1 --orth none --sigma-decays 5e-3   # quick look

Writes docs/lowrank.json and docs/lowrank_lenet300_ranks.png (learned ranks of the first lrstr run at the
last knob).

Methods (same optimizer, peak learning rate, weight decay and number of SGD steps for all):

* ``dense``        — no compression (reference error).
* ``lrstr-<orth>`` — ``strfx.lowrank``: every Linear reparameterised as U·diag(relu(σ − t))·Vᵀ, trained for
  all the steps, with weight decay λ_s on the thresholds (budget D = λ_s·Σ_t lr_t = 8: s ends near 0, so
  the threshold near σ_max/2) and the knob, weight decay on the raw singular values σ, then factored (exactly:
  no fine-tuning). ``<orth>`` is the orthogonality choice for U, V (none / qr / penalty).
* ``lrstr-<orth>-ft`` — the same for half the steps, then the factored model fine-tuned for the other half
  (learning rate restarted), the schedule of the SVD baselines.
* ``svd-uniform``  — dense for half the steps, every layer truncated to the same fraction of its full rank,
  factored, fine-tuned for the other half (learning rate restarted); the fraction is chosen so that the
  factored model has the parameters of one lrstr run (``matched``); one pair of baselines per lrstr run.
* ``svd-energy``   — the same, with per-layer ranks from one global energy threshold (each layer keeps the
  fewest singular values holding that fraction of its Σσ²), the threshold chosen to match parameters.
* ``svd-lrstr-ranks`` — a diagnostic: the same again at exactly the ranks one lrstr run learned, to separate
  the rank allocation low-rank STR chooses from the weights it trains.

``--arch fastgrnn`` runs the same on examples/fastgrnn.py (a FastGRNN-style cell written with Linear layers,
so W (input-to-hidden) and U (hidden-to-hidden) both get a learned rank) on sequential MNIST.

One seed, a few epochs: a pilot, not the issue's 3-seed study (see docs/lowrank.md for what is not done).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402
from mnist import LR, WD, cosine, fit, load_arch, load_mnist, test_error  # noqa: E402

from strfx.lowrank import (  # noqa: E402
    LowRankConfig,
    apply_lowrank,
    factor_lowrank,
    lowrank_report,
    lowrank_threshold_parameters,
    orthogonality_penalty,
    plot_ranks,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
S_INIT = -8.0
ARCH = "lenet300"  # or "fastgrnn" (examples/fastgrnn.py, sequential MNIST), set by --arch


class _Cached(nn.Module):
    """Runs the model inside ``parametrize.cached()``: each low-rank weight is built once per forward, not
    once per use (the FastGRNN cell uses W and U at each of its 28 steps)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with parametrize.cached():
            return self.model(x)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_dense(epochs: int, seed: int, data: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = load_arch(ARCH)()
    total = epochs * (xtr.shape[0] // 128)
    fit(model, [{"params": list(model.parameters()), "weight_decay": WD}], (xtr, ytr), total, seed,
        lambda t: cosine(t, 0, total, LR))
    return {"method": "dense", "knob": 0.0, "error": test_error(model, xte, yte), "params": n_params(model)}


def run_lrstr(orth: str, budget: float, epochs: int, seed: int, data: tuple[torch.Tensor, ...],
              relative: bool, sigma_decay: float | None = None, plot: Path | None = None,
              finetune: bool = False) -> dict[str, Any]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = apply_lowrank(load_arch(ARCH)(),
                          LowRankConfig(s_init=S_INIT, orthogonality=orth, relative_threshold=relative))
    steps = epochs * (xtr.shape[0] // 128)
    total = steps // 2 if finetune else steps  # -ft: learn the ranks in half the steps, fine-tune the rest
    spent = sum(cosine(t, 0, total, LR) for t in range(total))
    lam = budget / spent  # decay alone would take s to s_init·e^(-D), whatever the number of epochs
    thresholds = lowrank_threshold_parameters(model)
    sigmas = [m.parametrizations.weight.original1 for m in model.modules() if hasattr(m, "parametrizations")]
    special = {id(p) for p in thresholds + sigmas}
    rest = [p for p in model.parameters() if id(p) not in special]
    groups = [{"params": rest, "weight_decay": WD}, {"params": thresholds, "weight_decay": lam},
              {"params": sigmas, "weight_decay": WD if sigma_decay is None else sigma_decay}]
    fit(_Cached(model), groups, (xtr, ytr), total, seed, lambda t: cosine(t, 0, total, LR),
        penalty=(lambda: orthogonality_penalty(model)) if orth == "penalty" else None)
    err_param = test_error(model, xte, yte)
    example = (xte[:2],)
    rep = lowrank_report(model, example)
    if plot is not None:
        plot_ranks(rep, plot, title=f"{ARCH}, low-rank STR ({orth}, D={budget:g}, σ decay {sigma_decay:g}): "
                   "learned ranks")
    factored = factor_lowrank(model, example)
    if finetune:  # the factored model, learning rate restarted (as the SVD baselines)
        fit(factored, [{"params": list(factored.parameters()), "weight_decay": WD}], (xtr, ytr), steps - total,
            seed + 1, lambda t: cosine(t, 0, steps - total, LR))
    err = test_error(factored, xte, yte)
    return {"method": f"lrstr-{orth}" + ("-ft" if finetune else ""), "knob": sigma_decay, "budget": budget, "error": err, "error_before_factoring": err_param,
            "params": n_params(factored), "ranks": {r.name: [r.rank, r.full_rank] for r in rep.layers},
            "threshold_decay": lam, "relative_threshold": relative, "sigma_decay": sigma_decay}


def _truncate(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace each Linear by its rank-r truncated SVD (two Linears) where that has fewer parameters."""
    for name, r in ranks.items():
        lin = model.get_submodule(name)
        out, inp = lin.weight.shape
        if r * (out + inp) >= out * inp:
            continue
        u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        first, second = nn.Linear(inp, r, bias=False), nn.Linear(r, out, bias=lin.bias is not None)
        with torch.no_grad():
            first.weight.copy_(vh[:r])
            second.weight.copy_(u[:, :r] * s[:r])
            if lin.bias is not None:
                second.bias.copy_(lin.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Sequential(first, second))
    return model


def _params_at(model: nn.Module, ranks: dict[str, int]) -> int:
    return n_params(_truncate(copy.deepcopy(model), ranks))


def _uniform_ranks(model: nn.Module, target: int) -> dict[str, int]:
    lins = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        ranks = {n: max(1, round(mid * min(m.weight.shape))) for n, m in lins.items()}
        lo, hi = (mid, hi) if _params_at(model, ranks) <= target else (lo, mid)
    return {n: max(1, round(lo * min(m.weight.shape))) for n, m in lins.items()}


def _energy_ranks(model: nn.Module, target: int) -> dict[str, int]:
    lins = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    cum = {n: torch.cumsum(torch.linalg.svdvals(m.weight.detach()) ** 2, 0) for n, m in lins.items()}
    cum = {n: c / c[-1] for n, c in cum.items()}

    def ranks_at(tau: float) -> dict[str, int]:
        return {n: int(torch.searchsorted(c, torch.tensor(tau))) + 1 for n, c in cum.items()}

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _params_at(model, ranks_at(mid)) <= target else (lo, mid)
    return ranks_at(lo)


def run_svd(kind: str, target: int, knob: float, epochs: int, seed: int, data: tuple[torch.Tensor, ...],
            given: dict[str, int] | None = None) -> dict[str, Any]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = load_arch(ARCH)()
    total = epochs * (xtr.shape[0] // 128)
    half = total // 2
    fit(model, [{"params": list(model.parameters()), "weight_decay": WD}], (xtr, ytr), half, seed,
        lambda t: cosine(t, 0, half, LR))
    if kind == "lrstr-ranks":
        assert given is not None
        ranks = given
    else:
        ranks = _uniform_ranks(model, target) if kind == "uniform" else _energy_ranks(model, target)
    model = _truncate(model, ranks)
    fit(model, [{"params": list(model.parameters()), "weight_decay": WD}], (xtr, ytr), total - half, seed + 1,
        lambda t: cosine(t, 0, total - half, LR))
    return {"method": f"svd-{kind}", "knob": knob, "error": test_error(model, xte, yte), "params": n_params(model),
            "ranks": ranks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["lenet300", "fastgrnn"], default="lenet300")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=8.0, help="threshold-decay budget D (λ_s·Σ lr)")
    ap.add_argument("--orth", nargs="+", default=["none", "qr", "penalty"], help="orthogonality choices to compare")
    ap.add_argument("--absolute", action="store_true", help="threshold g(s), not σ_max·g(s)")
    ap.add_argument("--sigma-decays", nargs="+", type=float, default=[2e-3, 5e-3],
                    help="the knob: weight decay on the raw singular values σ")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--finetune", action="store_true", help="also run lrstr-<orth>-ft (ranks in half the steps, "
                    "then the factored model fine-tuned)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default docs/lowrank.json (lenet300), docs/lowrank_<arch>.json")
    args = ap.parse_args()
    global ARCH
    ARCH = args.arch
    args.out = args.out or str(DOCS / ("lowrank.json" if ARCH == "lenet300" else f"lowrank_{ARCH}.json"))
    torch.set_num_threads(args.threads)
    data = load_mnist()
    runs: list[dict[str, Any]] = []

    def log(r: dict[str, Any], t0: float) -> None:
        r["train_s"] = round(time.perf_counter() - t0, 1)
        runs.append(r)
        print(f"{r['method']:14s} knob={r['knob']:<4g} error {r['error']:.2f}%  params {r['params']:,}  "
              f"({r['train_s']} s) {r.get('ranks', '')}", flush=True)

    t0 = time.perf_counter()
    if not args.no_baselines:
        log(run_dense(args.epochs, args.seed, data), t0)
    for sd in args.sigma_decays:
        for orth in args.orth:
            t0 = time.perf_counter()
            plot = DOCS / f"lowrank_{ARCH}_ranks.png" if (orth == args.orth[0] and sd == args.sigma_decays[-1]) else None
            r = run_lrstr(orth, args.budget, args.epochs, args.seed, data, not args.absolute, sd, plot)
            log(r, t0)
            mine = [r]
            if args.finetune:
                t0 = time.perf_counter()
                mine.append(run_lrstr(orth, args.budget, args.epochs, args.seed, data, not args.absolute, sd,
                                      finetune=True))
                log(mine[-1], t0)
            for m in mine:  # each baseline at the parameters of each low-rank STR run
                for kind in () if args.no_baselines else ("uniform", "energy", "lrstr-ranks"):
                    t0 = time.perf_counter()
                    given = {k.rsplit(".", 1)[0]: v[0] for k, v in m["ranks"].items()}
                    b = run_svd(kind, m["params"], sd, args.epochs, args.seed, data, given)
                    b["matched"] = m["method"]
                    log(b, t0)
    out = {"env": environment(), "arch": ARCH, "epochs": args.epochs, "seed": args.seed, "runs": runs}
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
