"""Low-rank STR on LeNet-300-100 / LeNet-5 (MNIST) vs truncated-SVD baselines at equal parameters, same epoch budget.

    python benchmarks/lowrank.py --epochs 3 --finetune     # the 1-seed pilot in docs/lowrank.md (~10 min, 1 core)
    python benchmarks/lowrank.py --arch lenet5 --epochs 3 --orth qr --sigma-decays 5e-3 --finetune \\
        --seeds 0 1 2 --jobs 2 --out docs/lowrank_lenet5_3seeds.json   # the 3-seed evidence (docs/lowrank.md)
    python benchmarks/lowrank.py --epochs 1 --orth none --sigma-decays 5e-3 --out /tmp/lr.json  # quick look

Writes the JSON (default docs/lowrank.json for lenet300, docs/lowrank_<arch>.json otherwise; an existing one
only with ``--force``), ``<json stem>_error_vs_params.png`` next to it (every method, mean ± std over the seeds)
and the learned ranks of the first lrstr run of the first seed at the last knob (docs/lowrank_<arch>_ranks.png
for the default ``--out``, else ``<json stem>_ranks.png``); prints the Markdown table docs/lowrank.md shows.
``--replot JSON`` redraws the plot and reprints the table from a saved JSON.

Methods (same optimizer, peak learning rate, weight decay and number of SGD steps for all):

* ``dense``        — no compression (reference error).
* ``lrstr-<orth>`` — ``strfx.lowrank``: every Linear/Conv reparameterised as U·diag(relu(σ − t))·Vᵀ, trained for
  all the steps, with weight decay λ_s on the thresholds (budget D = λ_s·Σ_t lr_t = 8: s ends near 0, so
  the threshold near σ_max/2) and the knob, weight decay on the raw singular values σ, then factored (exactly:
  no fine-tuning; a k×k conv becomes a k×k conv to r channels + a 1×1 conv). ``<orth>`` is the
  orthogonality choice for U, V (none / qr / penalty).
* ``lrstr-<orth>-ft`` — the same for half the steps, then the factored model fine-tuned for the other half
  (learning rate restarted), the schedule of the SVD baselines.
* ``svd-uniform``  — dense for half the steps, every layer truncated to the same fraction of its full rank,
  factored, fine-tuned for the other half (learning rate restarted); the fraction is chosen so that the
  factored model has the parameters of one lrstr run (``matched``); one set of baselines per lrstr run.
  The half-trained dense net is the same for every baseline of a seed and is trained once per process.
* ``svd-energy``   — the same, with per-layer ranks from one global energy threshold (each layer keeps the
  fewest singular values holding that fraction of its Σσ²), the threshold chosen to match parameters.
* ``svd-lrstr-ranks`` — a diagnostic: the same again at exactly the ranks one lrstr run learned, to separate
  the rank allocation low-rank STR chooses from the weights it trains.
* ``scratch-lrstr-ranks`` / ``scratch-svd-init`` — the factored net at one lrstr run's ranks trained from a
  random init for the whole budget (the "fixed rank from scratch" baseline): every factor at PyTorch's default
  init (``--baselines scratch``), or the rank-r truncated SVD of the dense random init with each layer's
  Frobenius norm kept (``scratch-svd``).

``--seeds 0 1 2`` repeats everything per seed (a baseline is matched to the lrstr run of its own seed) and
aggregates mean ± std (sample std) over seeds; ``--jobs N`` runs N seed × σ-decay chains in parallel
(spawned processes, ``--threads`` each); ``<out>.partial.jsonl`` keeps finished jobs for ``--resume``.

``--arch fastgrnn`` runs the same on examples/fastgrnn.py (a FastGRNN-style cell written with Linear layers,
so W (input-to-hidden) and U (hidden-to-hidden) both get a learned rank) on sequential MNIST.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import statistics
import subprocess
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
    CONV_TYPES,
    LowRankConfig,
    apply_lowrank,
    break_even_rank,
    factor_dense,
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


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear/Conv layers a truncated SVD may factor (where some rank ≥ 1 saves weights), by name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, *CONV_TYPES)):
            mat = m.weight.reshape(m.weight.shape[0], -1)
            if break_even_rank(mat.shape[0], mat.shape[1], getattr(m, "groups", 1)) >= 1:
                out[name] = m
    return out


def _truncate(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace each layer by its rank-r truncated SVD (Linear → two Linears, k×k conv → k×k conv to r channels
    + 1×1 conv: :func:`strfx.lowrank.factor_dense`) where that has fewer parameters."""
    for name, r in ranks.items():
        new = factor_dense(model.get_submodule(name), r)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def _params_at(model: nn.Module, ranks: dict[str, int]) -> int:
    """Parameters of ``_truncate(model, ranks)``, counted without building it (the rule of ``factor_dense``)."""
    total = n_params(model)
    for name, rank in ranks.items():
        m = model.get_submodule(name)
        out, cols = m.weight.shape[0], m.weight[0].numel()
        r, fact = min(rank, out, cols), min(rank, out, cols) * (getattr(m, "groups", 1) * cols + out)
        if r >= 1 and fact < out * cols:
            total -= out * cols - fact
    return total


def _full_ranks(model: nn.Module) -> dict[str, int]:
    return {n: min(m.weight.shape[0], m.weight[0].numel()) for n, m in _layers(model).items()}


def _uniform_ranks(model: nn.Module, target: int) -> dict[str, int]:
    full = _full_ranks(model)
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        ranks = {n: max(1, round(mid * f)) for n, f in full.items()}
        lo, hi = (mid, hi) if _params_at(model, ranks) <= target else (lo, mid)
    return {n: max(1, round(lo * f)) for n, f in full.items()}


def _energy_ranks(model: nn.Module, target: int) -> dict[str, int]:
    cum = {n: torch.cumsum(torch.linalg.svdvals(m.weight.detach().reshape(m.weight.shape[0], -1).double()) ** 2, 0)
           for n, m in _layers(model).items()}
    cum = {n: c / c[-1] for n, c in cum.items()}

    def ranks_at(tau: float) -> dict[str, int]:
        return {n: min(int(torch.searchsorted(c, torch.tensor(tau, dtype=c.dtype))) + 1, c.numel())
                for n, c in cum.items()}

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _params_at(model, ranks_at(mid)) <= target else (lo, mid)
    return ranks_at(lo)


_DENSE_HALF: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}


def _dense_half(epochs: int, seed: int, data: tuple[torch.Tensor, ...]) -> nn.Module:
    """The dense net trained for the first half of the steps (every SVD baseline of one seed starts from it;
    trained once per process and reused, since it does not depend on the run it is matched to)."""
    xtr, ytr, _, _ = data
    key = (ARCH, seed, epochs)
    torch.manual_seed(seed)
    model = load_arch(ARCH)()
    if key not in _DENSE_HALF:
        half = epochs * (xtr.shape[0] // 128) // 2
        fit(model, [{"params": list(model.parameters()), "weight_decay": WD}], (xtr, ytr), half, seed,
            lambda t: cosine(t, 0, half, LR))
        _DENSE_HALF[key] = copy.deepcopy(model.state_dict())
    model.load_state_dict(_DENSE_HALF[key])
    return model


def run_svd(kind: str, target: int, knob: float, epochs: int, seed: int, data: tuple[torch.Tensor, ...],
            given: dict[str, int] | None = None) -> dict[str, Any]:
    xtr, ytr, xte, yte = data
    total = epochs * (xtr.shape[0] // 128)
    half = total // 2
    model = _dense_half(epochs, seed, data)
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


def run_scratch(ranks: dict[str, int], knob: float, epochs: int, seed: int, data: tuple[torch.Tensor, ...],
                init: str = "default") -> dict[str, Any]:
    """The factored net at the given (low-rank STR's) ranks trained from a random init for the whole budget: the
    ranks without anything trained before.

    ``init="default"``: every layer at PyTorch's default init (the two thin factors' product is then far smaller
    than a dense layer's init; on LeNet-5 at lr 0.05 it does not train). ``init="svd"``: the rank-r truncated SVD
    of the dense net's random init, its second factor scaled so each layer keeps the init's Frobenius norm.
    """
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    dense = load_arch(ARCH)()
    model = _truncate(copy.deepcopy(dense), ranks)
    for name, r in ranks.items():
        new = model.get_submodule(name)
        if not isinstance(new, nn.Sequential):
            continue  # not factored (no saving at that rank): keeps the dense init
        if init == "default":
            for m in new:
                m.reset_parameters()
        else:
            w = dense.get_submodule(name).weight.detach()
            sv = torch.linalg.svdvals(w.reshape(w.shape[0], -1).double())
            with torch.no_grad():
                new[1].weight.mul_(float(sv.norm() / sv[:r].norm()))
    total = epochs * (xtr.shape[0] // 128)
    fit(_Cached(model), [{"params": list(model.parameters()), "weight_decay": WD}], (xtr, ytr), total, seed,
        lambda t: cosine(t, 0, total, LR))
    return {"method": "scratch-lrstr-ranks" if init == "default" else "scratch-svd-init", "knob": knob,
            "error": test_error(model, xte, yte), "params": n_params(model), "ranks": ranks, "init": init}


# ---------------------------------------------------------------------------------------------------------
# jobs (one seed's dense run, or one seed's chain at one σ decay), aggregation, plot, tables

BASELINES = ("uniform", "energy", "lrstr-ranks", "scratch", "scratch-svd")


def _log(r: dict[str, Any], t0: float, seed: int) -> dict[str, Any]:
    r["train_s"] = round(time.perf_counter() - t0, 1)
    r["seed"] = seed
    print(f"[{ARCH} seed {seed}] {r['method']:19s} knob={r['knob']:<6g} error {r['error']:.2f}%  "
          f"params {r['params']:,}  ({r['train_s']} s) {r.get('ranks', '')}", flush=True)
    return r


def job(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One unit of work (runs in a worker process): ``spec["what"]`` is ``"dense"`` or ``"chain"``."""
    global ARCH
    ARCH = spec["arch"]
    torch.set_num_threads(spec["threads"])
    data = load_mnist()
    if spec.get("train_subset"):  # smoke runs only: the first N training images
        data = (data[0][:spec["train_subset"]], data[1][:spec["train_subset"]], *data[2:])
    seed, epochs = spec["seed"], spec["epochs"]
    if spec["what"] == "dense":
        t0 = time.perf_counter()
        return [_log(run_dense(epochs, seed, data), t0, seed)]
    sd = spec["sigma_decay"]
    out: list[dict[str, Any]] = []
    if spec["what"] == "baselines":  # for low-rank STR runs already done (--baselines-for)
        for m, kinds in spec["matches"]:
            out += _baselines(m, kinds, sd, epochs, seed, data)
        return out
    for orth in spec["orth"]:
        t0 = time.perf_counter()
        plot = Path(spec["rank_plot"]) if spec.get("rank_plot") and orth == spec["orth"][0] else None
        mine = [_log(run_lrstr(orth, spec["budget"], epochs, seed, data, spec["relative"], sd, plot), t0, seed)]
        if spec["finetune"]:
            t0 = time.perf_counter()
            mine.append(_log(run_lrstr(orth, spec["budget"], epochs, seed, data, spec["relative"], sd,
                                       finetune=True), t0, seed))
        out += mine
        for m in mine:  # each baseline at the parameters (or the ranks) of each low-rank STR run
            out += _baselines(m, spec["baselines"], sd, epochs, seed, data)
    return out


KIND_METHOD = {"uniform": "svd-uniform", "energy": "svd-energy", "lrstr-ranks": "svd-lrstr-ranks",
               "scratch": "scratch-lrstr-ranks", "scratch-svd": "scratch-svd-init"}


def _baselines(m: dict[str, Any], kinds: list[str], sd: float, epochs: int, seed: int,
               data: tuple[torch.Tensor, ...]) -> list[dict[str, Any]]:
    """Each baseline in ``kinds`` at the parameters (or the ranks) of the low-rank STR run ``m``."""
    given = {k.rsplit(".", 1)[0]: v[0] for k, v in m["ranks"].items()}
    out = []
    for kind in kinds:
        t0 = time.perf_counter()
        if kind.startswith("scratch"):
            b = run_scratch(given, sd, epochs, seed, data, "svd" if kind == "scratch-svd" else "default")
        else:
            b = run_svd(kind, m["params"], sd, epochs, seed, data, given)
        b["matched"] = m["method"]
        out.append(_log(b, t0, seed))
    return out


def add_baselines(path: Path, kinds: list[str], jobs: int, threads: int, force: bool) -> None:
    """Run the baselines in ``kinds`` that a saved JSON lacks for its low-rank STR runs, and add them to it."""
    if not force:
        sys.exit(f"error: --baselines-for rewrites {path}; pass --force")
    saved = json.loads(path.read_text())
    have = {(r["seed"], r["knob"], r.get("matched"), r["method"]) for r in saved["runs"]}
    specs: dict[tuple[int, float], dict[str, Any]] = {}
    for m in [r for r in saved["runs"] if r["method"].startswith("lrstr")]:
        todo = [k for k in kinds if (m["seed"], m["knob"], m["method"], KIND_METHOD[k]) not in have]
        if todo:
            spec = specs.setdefault((m["seed"], m["knob"]), {
                "arch": saved["arch"], "epochs": saved["epochs"], "threads": threads, "what": "baselines",
                "seed": m["seed"], "sigma_decay": m["knob"], "matches": []})
            spec["matches"].append((m, todo))
    print(f"{len(specs)} jobs, {jobs} worker(s)", flush=True)
    t0, env = time.perf_counter(), environment(uptime=_uptime())
    runs = list(saved["runs"])
    if jobs <= 1:
        for sp in specs.values():
            runs += job(sp)
    else:
        with mp.get_context("spawn").Pool(jobs) as pool:
            for _, rs in pool.imap_unordered(_job_with_spec, list(specs.values()), chunksize=1):
                runs += rs
    added = {"argv": sys.argv[1:], "env": env, "wall_s": round(time.perf_counter() - t0, 1),
             "env_end": {"date": environment()["date"], "loadavg": os.getloadavg(), "uptime": _uptime()}}
    meta = {k: v for k, v in saved.items() if k not in ("arch", "epochs", "seed", "seeds", "runs", "rows")}
    meta["added"] = [*meta.get("added", []), added]
    order = {s: i for i, s in enumerate(saved["seeds"])}
    runs.sort(key=lambda r: order.get(r["seed"], 0))
    write_outputs(path, saved["arch"], saved["epochs"], saved["seeds"], runs, meta)


def _ms(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std (sample std, n − 1) over seeds of error, parameters and per-layer ranks, for each
    (method, knob, matched run); a baseline is matched per seed to that seed's low-rank STR run."""
    keys: list[tuple[str, float, str | None]] = []
    for r in runs:
        k = (r["method"], r["knob"], r.get("matched"))
        if k not in keys:
            keys.append(k)
    rows = []
    for method, knob, matched in keys:
        rs = [r for r in runs if (r["method"], r["knob"], r.get("matched")) == (method, knob, matched)]
        err, par = _ms([r["error"] for r in rs]), _ms([float(r["params"]) for r in rs])
        row: dict[str, Any] = {"method": method, "knob": knob, "matched": matched, "n": len(rs),
                               "seeds": sorted(r.get("seed", 0) for r in rs), "error_mean": err[0],
                               "error_std": err[1], "params_mean": par[0], "params_std": par[1]}
        if "ranks" in rs[0]:
            names = list(rs[0]["ranks"])
            rank = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731  (lrstr: [rank, full])
            row["ranks_mean"] = {n: statistics.mean(rank(r["ranks"][n]) for r in rs) for n in names}
        if "error_before_factoring" in rs[0]:
            row["error_before_factoring_mean"] = statistics.mean(r["error_before_factoring"] for r in rs)
        rows.append(row)
    return rows


LABELS = {"lrstr-qr": "low-rank STR (qr), factored", "lrstr-qr-ft": "low-rank STR (qr) half, factored + ft",
          "lrstr-none": "low-rank STR (none)", "lrstr-none-ft": "low-rank STR (none) + ft",
          "lrstr-penalty": "low-rank STR (penalty)", "lrstr-penalty-ft": "low-rank STR (penalty) + ft",
          "svd-uniform": "truncated SVD, uniform rank + ft", "svd-energy": "truncated SVD, energy threshold + ft",
          "svd-lrstr-ranks": "truncated SVD at STR's ranks + ft",
          "scratch-lrstr-ranks": "STR's ranks from scratch (default init)",
          "scratch-svd-init": "STR's ranks from scratch (SVD of a random dense init)"}
STYLE = {"svd-uniform": ("C1", "s"), "svd-energy": ("C2", "^"), "svd-lrstr-ranks": ("C4", "v"),
         "scratch-lrstr-ranks": ("C5", "D"), "scratch-svd-init": ("C8", "P"), "lrstr-qr": ("C0", "o"), "lrstr-qr-ft": ("C9", "o"),
         "lrstr-none": ("C7", "o"), "lrstr-none-ft": ("C8", "o"), "lrstr-penalty": ("C3", "o"),
         "lrstr-penalty-ft": ("C6", "o")}


def plot_error_vs_params(rows: list[dict[str, Any]], arch: str, epochs: int, path: Path) -> Path:
    """Error vs parameters, every method (mean ± std over seeds both ways), the dense net as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from strfx.plot import save_figure

    fig, ax = plt.subplots(figsize=(10, 4.5))
    n = max(r["n"] for r in rows)
    for method in [m for m in LABELS if any(r["method"] == m for r in rows)]:
        rs = sorted([r for r in rows if r["method"] == method], key=lambda r: r["params_mean"])
        color, marker = STYLE.get(method, ("k", "o"))
        ax.errorbar([r["params_mean"] / 1e3 for r in rs], [r["error_mean"] for r in rs],
                    xerr=[r["params_std"] / 1e3 for r in rs], yerr=[r["error_std"] for r in rs],
                    marker=marker, ls="-" if method.startswith("lrstr") else ":", capsize=3, color=color,
                    label=LABELS[method], ms=5)
    dense = [r for r in rows if r["method"] == "dense"]
    if dense:
        d = dense[0]
        ax.axhline(d["error_mean"], color="k", ls="--", lw=1,
                   label=f"dense ({d['params_mean'] / 1e3:.0f}k params, {d['error_mean']:.2f} %)")
    ax.set_yscale("log")
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    ax.yaxis.set_major_locator(FixedLocator([0.5, 0.7, 1, 1.5, 2, 3, 5, 10, 20, 50, 100]))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("parameters after factoring (thousands)")
    ax.set_ylabel("test error (%, log scale)")
    ax.set_title(f"{arch} on MNIST, {epochs} epochs for every method, mean ± std over {n} seed(s)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def _pm(mean: float, std: float, n: int, fmt: str = ".2f") -> str:
    return f"{mean:{fmt}} ± {std:{fmt}}" if n > 1 else f"{mean:{fmt}}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per low-rank STR run: its error and each baseline's at its parameters (mean ± std over seeds)."""
    have = [b for b in ("svd-uniform", "svd-energy", "svd-lrstr-ranks", "scratch-lrstr-ranks", "scratch-svd-init")
            if any(r["method"] == b for r in rows)]
    head = {"svd-uniform": "SVD uniform + ft", "svd-energy": "SVD energy + ft (ranks)",
            "svd-lrstr-ranks": "SVD at STR's ranks + ft", "scratch-lrstr-ranks": "STR's ranks, scratch (default init)",
            "scratch-svd-init": "STR's ranks, scratch (SVD init)"}
    lines = ["| low-rank STR run | σ decay | params | ranks (mean) | **its error** | " +
             " | ".join(head[b] for b in have) + " |", "|---|---:|---:|---|---:|" + "---:|" * len(have)]
    for r in [r for r in rows if r["method"].startswith("lrstr")]:
        n = r["n"]
        ranks = ", ".join(f"{v:.0f}" for v in r.get("ranks_mean", {}).values())
        cells = []
        for b in have:
            m = [x for x in rows if x["method"] == b and x["knob"] == r["knob"] and x["matched"] == r["method"]]
            if not m:
                cells.append("")
                continue
            c = _pm(m[0]["error_mean"], m[0]["error_std"], m[0]["n"])
            if m[0]["n"] != n:
                c += f" [{m[0]['n']} seed{'s' if m[0]['n'] > 1 else ''}]"
            if b == "svd-energy":
                c += " (" + ", ".join(f"{v:.0f}" for v in m[0]["ranks_mean"].values()) + ")"
            cells.append(c)
        lines.append(f"| {r['method']} | {r['knob']:g} | {_pm(r['params_mean'], r['params_std'], n, ',.0f')} | "
                     f"{ranks} | **{_pm(r['error_mean'], r['error_std'], n)}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, arch: str, epochs: int, seeds: list[int], runs: list[dict[str, Any]],
                  meta: dict[str, Any]) -> None:
    """The JSON (``seed`` and ``runs`` as the 1-seed format had them; ``seeds``, ``rows`` added) and the plot."""
    rows = aggregate(runs)
    doc = {**meta, "arch": arch, "epochs": epochs, "seed": seeds[0], "seeds": seeds, "runs": runs, "rows": rows}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out)
    png = plot_error_vs_params(rows, arch, epochs, out.with_name(out.stem + "_error_vs_params.png"))
    print(f"wrote {out} and {png}")
    print(markdown_table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["lenet300", "lenet5", "fastgrnn"], default="lenet300")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: --seed)")
    ap.add_argument("--seed", type=int, default=0, help="the one seed when --seeds is not given")
    ap.add_argument("--budget", type=float, default=8.0, help="threshold-decay budget D (λ_s·Σ lr)")
    ap.add_argument("--orth", nargs="+", default=["none", "qr", "penalty"], help="orthogonality choices to compare")
    ap.add_argument("--absolute", action="store_true", help="threshold g(s), not σ_max·g(s)")
    ap.add_argument("--sigma-decays", nargs="+", type=float, default=[2e-3, 5e-3],
                    help="the knob: weight decay on the raw singular values σ")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--baselines", nargs="+", choices=BASELINES, default=list(BASELINES),
                    help="which baselines to match to each low-rank STR run (scratch: STR's ranks from random init)")
    ap.add_argument("--finetune", action="store_true", help="also run lrstr-<orth>-ft (ranks in half the steps, "
                    "then the factored model fine-tuned)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one seed × σ decay chain each)")
    ap.add_argument("--out", default=None, help="default docs/lowrank.json (lenet300), docs/lowrank_<arch>.json")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out")
    ap.add_argument("--resume", action="store_true", help="skip the jobs already in <out>.partial.jsonl")
    ap.add_argument("--train-subset", type=int, default=None, help=argparse.SUPPRESS)  # smoke runs only
    ap.add_argument("--replot", default=None, metavar="JSON",
                    help="only redraw the plot and print the table from a JSON this script wrote")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="join JSONs of one arch and epoch budget written by separate runs (e.g. seeds run in two "
                    "processes) into --out, with its plot and table")
    ap.add_argument("--baselines-for", default=None, metavar="JSON",
                    help="run the --baselines a JSON this script wrote lacks, for its low-rank STR runs, and add them")
    args = ap.parse_args()
    if args.baselines_for:
        add_baselines(Path(args.baselines_for), args.baselines, args.jobs, args.threads, args.force)
        return
    if args.merge:
        merge(args.merge, Path(args.out) if args.out else None, args.force)
        return
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot_error_vs_params(aggregate(saved["runs"]), saved["arch"], saved["epochs"],
                             Path(args.replot).with_name(Path(args.replot).stem + "_error_vs_params.png"))
        print(markdown_table(aggregate(saved["runs"])))
        return
    arch = args.arch
    out = Path(args.out or DOCS / ("lowrank.json" if arch == "lenet300" else f"lowrank_{arch}.json"))
    if out.exists() and not (args.force or args.resume):
        sys.exit(f"error: {out} exists; pass --force to overwrite it (or --out to write elsewhere)")
    seeds = args.seeds if args.seeds is not None else [args.seed]
    common = {"arch": arch, "epochs": args.epochs, "threads": args.threads, "train_subset": args.train_subset}
    specs: list[dict[str, Any]] = []
    for seed in seeds:
        if not args.no_baselines:
            specs.append({**common, "what": "dense", "seed": seed})
        for sd in args.sigma_decays:
            rank_plot = None
            if seed == seeds[0] and sd == args.sigma_decays[-1]:  # the old name for the default --out
                rank_plot = DOCS / f"lowrank_{arch}_ranks.png" if args.out is None else \
                    out.with_name(f"{out.stem}_ranks.png")
            specs.append({**common, "what": "chain", "seed": seed, "sigma_decay": sd, "orth": args.orth,
                          "budget": args.budget, "relative": not args.absolute, "finetune": args.finetune,
                          "baselines": [] if args.no_baselines else args.baselines,
                          "rank_plot": str(rank_plot) if rank_plot else None})
    partial = out.with_suffix(".partial.jsonl")  # one line per finished job: survives an interrupted run
    runs: list[dict[str, Any]] = []
    if args.resume and partial.exists():
        done = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
        keys = {_resume_key(d["spec"]) for d in done}
        runs = [r for d in done for r in d["runs"]]
        specs = [s for s in specs if _resume_key(s) not in keys]
    elif partial.exists():
        partial.unlink()
    specs.sort(key=lambda s: s["what"] != "chain")  # the long chains first, so the workers finish together
    # env's "threads" is this (driver) process's; each worker runs with --threads
    meta = {"env": environment(uptime=_uptime()), "argv": sys.argv[1:], "jobs": args.jobs,
            "threads_per_worker": args.threads}
    print(f"{len(specs)} jobs, {args.jobs} worker(s), {args.threads} thread(s) each", flush=True)
    t0 = time.perf_counter()

    def done_one(spec: dict[str, Any], rs: list[dict[str, Any]]) -> None:
        runs.extend(rs)
        with partial.open("a") as f:
            f.write(json.dumps({"spec": spec, "runs": rs}) + "\n")

    if args.jobs <= 1:
        for spec in specs:
            done_one(spec, job(spec))
    else:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for spec, rs in pool.imap_unordered(_job_with_spec, specs, chunksize=1):
                done_one(spec, rs)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["env_end"] = {"date": environment()["date"], "loadavg": os.getloadavg(), "uptime": _uptime()}
    order = {s: i for i, s in enumerate(seeds)}
    runs.sort(key=lambda r: order.get(r["seed"], 0))
    write_outputs(out, arch, args.epochs, seeds, runs, meta)
    partial.unlink(missing_ok=True)


def merge(paths: list[str], out: Path | None, force: bool) -> None:
    """One JSON (and plot) from several runs of the same arch and epochs; each part's env is kept."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    if out is None:
        sys.exit("error: --merge needs --out (the joined JSON)")
    if out.exists() and not force:
        sys.exit(f"error: {out} exists; pass --force to overwrite it")
    if len({(d["arch"], d["epochs"]) for d in parts}) != 1:
        sys.exit(f"error: --merge got different archs/epochs: {[(d['arch'], d['epochs']) for d in parts]}")
    seeds = [s for d in parts for s in d.get("seeds", [d["seed"]])]
    if len(set(seeds)) != len(seeds):
        sys.exit(f"error: --merge got one seed twice: {seeds}")
    runs = [r for d in parts for r in d["runs"]]
    meta = {"env": parts[0]["env"], "argv": parts[0].get("argv"), "merged_from": [
        {"file": Path(p).name, "seeds": d.get("seeds"), "argv": d.get("argv"), "env": d["env"],
         "env_end": d.get("env_end"), "wall_s": d.get("wall_s")} for p, d in zip(paths, parts)]}
    write_outputs(out, parts[0]["arch"], parts[0]["epochs"], seeds, runs, meta)


def _resume_key(spec: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a finished job for ``--resume``: a rerun may ask fewer baselines of the jobs still to do."""
    return (spec["arch"], spec["epochs"], spec["what"], spec["seed"], spec.get("sigma_decay"),
            tuple(spec.get("orth", ())), spec.get("finetune"))


def _job_with_spec(spec: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return spec, job(spec)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
