"""Low-rank STR on sequential-MNIST RNNs (nn.LSTM and the FastGRNN-style cell) vs full rank vs fixed rank.

    python benchmarks/lowrank_rnn.py --arch fastgrnn --epochs 3 --seeds 0 1 2 --budget 8 --sigma-decays 2e-3 5e-3
    python benchmarks/lowrank_rnn.py --arch lstm --epochs 2 --seeds 0 1 2 --budget 0.5 --sigma-decays 2e-3 5e-3 1e-2 \
        --out docs/lowrank_rnn_lstm_budget05.json
    python benchmarks/lowrank_rnn.py --table docs/lowrank_rnn_fastgrnn.json          # the markdown table
    python benchmarks/lowrank_rnn.py --plot docs/lowrank_rnn.png docs/lowrank_rnn_fastgrnn.json \
        docs/lowrank_rnn_lstm_budget05.json

(what docs/lowrank_rnn.md reports; each method's run takes 10-80 s on one thread).

Each 28×28 image is read as 28 steps of 28 pixels (the shared MNIST file). Methods, all with the same
optimizer, peak learning rate, weight decay and number of SGD steps (benchmarks/mnist.py's ``fit``):

* ``dense``      — full rank (reference error and parameters).
* ``lrstr``      — ``strfx.sparsify(model, "lowrank")`` (qr orthogonality, relative thresholds), trained
  for all the steps with weight decay λ_s on the thresholds (budget D = λ_s·Σ lr, ``--budget``,
  8 as benchmarks/lowrank.py; the LSTM needs a lower one, see the docs) and the knob, weight decay on the
  raw singular values σ; then ``strfx.shrink`` factors it (exactly, no fine-tuning). For the LSTM only the
  input-to-hidden matrix ``weight_ih_l0`` (4H × 28) and the classifier can be factored:
  ``FactoredRNN`` = ``Linear(28, r)`` → ``LSTM(r, H)``.
* ``fixed``      — the architecture ``lrstr`` ended with (same modules, same ranks, so exactly its
  parameter count) re-initialised with PyTorch's default init and trained from scratch for all the steps.
* ``svd``        — dense for half the steps, truncated SVD at exactly ``lrstr``'s ranks, fine-tuned for
  the other half (learning rate restarted), as benchmarks/lowrank.py's ``svd-lrstr-ranks``.

Writes docs/lowrank_rnn_<arch>.json (``--out``), one row per method, σ decay and seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402
from lowrank import _Cached, n_params  # noqa: E402 - the same helpers as the feed-forward study
from mnist import LR, WD, cosine, fit, load_arch, load_mnist, test_error  # noqa: E402

import strfx  # noqa: E402
from strfx.lowrank import (  # noqa: E402
    FactoredRNN,
    factor_dense,
    lowrank_report,
    lowrank_sigma_parameters,
    lowrank_threshold_parameters,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
S_INIT = -8.0
BUDGET = 8.0  # threshold-decay budget D = λ_s·Σ_t lr_t (benchmarks/lowrank.py)
LSTM_HIDDEN = 64


class LSTMClassifier(nn.Module):
    """Reads a B×1×28×28 image row by row with an nn.LSTM and classifies the last hidden state."""

    def __init__(self, hidden_size: int = LSTM_HIDDEN, rows: int = 28, cols: int = 28) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.lstm = nn.LSTM(cols, hidden_size, batch_first=True)
        self.fc = nn.Linear(hidden_size, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(x.reshape(x.shape[0], self.rows, self.cols))
        return self.fc(h[-1])


def builder(arch: str, hidden: int = LSTM_HIDDEN) -> Callable[[], nn.Module]:
    return (lambda: LSTMClassifier(hidden)) if arch == "lstm" else load_arch("fastgrnn")


def reinit(shrunk: nn.Module, fresh: nn.Module) -> nn.Module:
    """A copy of ``shrunk`` (same modules and shapes, so the same parameter count) with fresh weights.

    Modules with ``reset_parameters`` (Linear, LSTM) get PyTorch's default init; parameters owned directly by
    a custom module (the FastGRNN cell's biases, ζ, ν) are copied from ``fresh``, a newly built dense model,
    so they start where the dense model starts.
    """
    model = copy.deepcopy(shrunk)
    fresh_params = dict(fresh.named_parameters())
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
                continue
            for pname, p in mod.named_parameters(recurse=False):
                qual = f"{name}.{pname}" if name else pname
                if qual not in fresh_params or fresh_params[qual].shape != p.shape:
                    raise ValueError(f"reinit: {qual} has no counterpart of shape {tuple(p.shape)} in the fresh model")
                p.copy_(fresh_params[qual])
    return model


def truncate(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Truncated SVD at the given ranks (keys: weight names as ``lowrank_report`` gives them), in place.

    A Linear becomes two (``factor_dense``); an LSTM's ``weight_ih_l0`` (single layer, one direction) becomes a
    ``FactoredRNN``; a layer where the rank saves nothing stays dense.
    """
    for wname, r in ranks.items():
        mname, _, tname = wname.rpartition(".")
        mod = model.get_submodule(mname)
        if isinstance(mod, nn.Linear) and r == 0:  # what strfx.shrink builds for a rank-0 layer: a zero map
            new = nn.Sequential(nn.Linear(mod.in_features, 0, bias=False),
                                nn.Linear(0, mod.out_features, bias=mod.bias is not None))
            if mod.bias is not None:
                with torch.no_grad():
                    new[1].bias.copy_(mod.bias)
        elif isinstance(mod, nn.Linear):
            new = factor_dense(mod, r)
        elif isinstance(mod, nn.LSTM) and tname == "weight_ih_l0" and mod.num_layers == 1 and not mod.bidirectional:
            w = mod.weight_ih_l0.detach()
            if r * sum(w.shape) >= w.numel():
                continue
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
            dd = {"dtype": w.dtype, "device": w.device}
            proj = nn.Linear(mod.input_size, r, bias=False, **dd)
            rnn = nn.LSTM(r, mod.hidden_size, bias=mod.bias, batch_first=mod.batch_first, **dd)
            state = mod.state_dict()
            state["weight_ih_l0"] = (u[:, :r] * s[:r]).to(w.dtype)
            rnn.load_state_dict(state)
            with torch.no_grad():
                proj.weight.copy_(vh[:r])
            new = FactoredRNN(proj, rnn, mod.input_size)
        else:
            raise ValueError(f"truncate: no rule for {wname} ({type(mod).__name__})")
        if new is not None:
            parent, _, child = mname.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def _plain_groups(model: nn.Module) -> list[dict[str, Any]]:
    return [{"params": list(model.parameters()), "weight_decay": WD}]


def _train_plain(model: nn.Module, steps: int, seed: int, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    fit(model, _plain_groups(model), data, steps, seed, lambda t: cosine(t, 0, steps, LR))


def run_dense(build: Callable[[], nn.Module], steps: int, seed: int, data: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = build()
    _train_plain(model, steps, seed, (xtr, ytr))
    return {"method": "dense", "error": test_error(model, xte, yte), "params": n_params(model)}


def run_lrstr(build: Callable[[], nn.Module], sigma_decay: float, steps: int, seed: int,
              data: tuple[torch.Tensor, ...], budget: float = BUDGET,
              orth: str = "qr") -> tuple[dict[str, Any], nn.Module | None]:
    """Low-rank STR through the public API; returns the row and the shrunk (factored) model."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    example = (xte[:2],)
    model = strfx.sparsify(build(), "lowrank", example_inputs=example,
                           config={"lowrank": {"s_init": S_INIT, "orthogonality": orth, "relative_threshold": True}})
    lam = budget / sum(cosine(t, 0, steps, LR) for t in range(steps))
    thresholds, sigmas = lowrank_threshold_parameters(model), lowrank_sigma_parameters(model)
    special = {id(p) for p in thresholds + sigmas}
    rest = [p for p in model.parameters() if id(p) not in special]
    groups = [{"params": rest, "weight_decay": WD}, {"params": thresholds, "weight_decay": lam},
              {"params": sigmas, "weight_decay": sigma_decay}]
    fit(_Cached(model), groups, (xtr, ytr), steps, seed, lambda t: cosine(t, 0, steps, LR))
    err_param = test_error(model, xte, yte)
    rep = lowrank_report(model, example)
    row: dict[str, Any] = {"method": "lrstr", "error_before_factoring": err_param, "budget": budget, "orth": orth,
                           "ranks": {r.name: [r.rank, r.full_rank] for r in rep.layers}, "threshold_decay": lam}
    rnns = (nn.LSTM, nn.GRU, nn.RNN)
    if any(r.rank == 0 and isinstance(model.get_submodule(r.name.rpartition(".")[0]), rnns) for r in rep.layers):
        # nn.LSTM has no input_size 0: strfx.shrink cannot factor it (a rank-0 Linear it can)
        row.update(error=err_param, params=None, factored=[], note="a layer lost every rank; not shrunk")
        return row, None
    small = strfx.shrink(model, example)
    factored = sorted({n for n, m in small.named_modules() if isinstance(m, (FactoredRNN, nn.Sequential))})
    row.update(error=test_error(small, xte, yte), params=n_params(small), factored=factored,
               shrink_max_error=small.strfx_shrink["max_error"])
    return row, small


def run_fixed(build: Callable[[], nn.Module], shrunk: nn.Module, steps: int, seed: int,
              data: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = reinit(shrunk, build())
    _train_plain(model, steps, seed, (xtr, ytr))
    return {"method": "fixed", "error": test_error(model, xte, yte), "params": n_params(model)}


def run_svd(build: Callable[[], nn.Module], ranks: dict[str, int], steps: int, seed: int,
            data: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = build()
    half = steps // 2
    _train_plain(model, half, seed, (xtr, ytr))
    model = truncate(model, ranks)
    _train_plain(model, steps - half, seed + 1, (xtr, ytr))
    return {"method": "svd", "error": test_error(model, xte, yte), "params": n_params(model)}


def table(doc: dict[str, Any]) -> str:
    """The docs' markdown table: one line per method and σ decay, errors per seed and their mean."""
    lines = ["| method | σ decay | params | ranks (per seed) | error per seed, % | mean error, % |",
             "|---|---:|---:|---|---|---:|"]
    keys: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in doc["runs"]:
        keys.setdefault((r["method"], r["sigma_decay"]), []).append(r)
    for (method, sd), rows in keys.items():
        params = [r["params"] for r in rows]
        ranks = "; ".join(", ".join(f"{v[0]}/{v[1]}" for v in r["ranks"].values()) for r in rows if "ranks" in r)
        errs = [r["error"] for r in rows]
        shown = " / ".join(f"{p:,}" if p else "—" for p in params)
        lines.append(f"| {method} | {sd if sd is not None else '—'} | {shown} | "
                     f"{ranks} | {', '.join(f'{e:.2f}' for e in errs)} | {statistics.mean(errs):.2f} |")
    return "\n".join(lines)


def plot(docs: list[dict[str, Any]], path: Path) -> None:
    """Error vs parameters, one panel per results file, one marker per method (every seed a point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(docs), figsize=(5.5 * len(docs), 4), squeeze=False)
    style = {"dense": ("k", "s"), "lrstr": ("C0", "o"), "fixed": ("C1", "^"), "svd": ("C2", "v")}
    for ax, doc in zip(axes[0], docs):
        for method, (color, marker) in style.items():
            pts = [(r["params"], r["error"]) for r in doc["runs"] if r["method"] == method and r["params"]]
            if pts:
                ax.scatter(*zip(*pts), c=color, marker=marker, label=method, alpha=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("test error, %")
        ax.set_title(f"{doc['arch']}, {doc['epochs']} epochs, D={doc.get('budget', BUDGET):g}, seeds {doc['seeds']}")
        ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["lstm", "fastgrnn"], default="lstm")
    ap.add_argument("--hidden", type=int, default=LSTM_HIDDEN, help="LSTM hidden size")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--sigma-decays", nargs="+", type=float, default=[2e-3, 5e-3],
                    help="the knob: weight decay on the raw singular values σ")
    ap.add_argument("--budget", type=float, default=BUDGET, help="threshold-decay budget D (λ_s·Σ lr)")
    ap.add_argument("--orth", default="qr", choices=["qr", "none"], help="orthogonality of U, V (lrstr)")
    ap.add_argument("--methods", nargs="+", default=["dense", "lrstr", "fixed", "svd"])
    ap.add_argument("--train-limit", type=int, default=0, help="use only the first N training images (smoke runs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default docs/lowrank_rnn_<arch>.json")
    ap.add_argument("--force", action="store_true", help="overwrite --out")
    ap.add_argument("--table", metavar="JSON", help="print the markdown table of a results file and exit")
    ap.add_argument("--plot", nargs="+", metavar="PATH",
                    help="OUT.png JSON...: plot error vs parameters of results files and exit")
    args = ap.parse_args()
    if args.plot:
        out_png = Path(args.plot[0])
        if out_png.exists() and not args.force:
            sys.exit(f"error: {out_png} exists; pass --force to overwrite it")
        plot([json.loads(Path(p).read_text()) for p in args.plot[1:]], out_png)
        return
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    out = Path(args.out or DOCS / f"lowrank_rnn_{args.arch}.json")
    if out.exists() and not args.force:
        sys.exit(f"error: {out} exists; pass --force to overwrite it or --out to write elsewhere")
    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = load_mnist()
    if args.train_limit:
        xtr, ytr = xtr[:args.train_limit], ytr[:args.train_limit]
    data = (xtr, ytr, xte, yte)
    steps = args.epochs * (xtr.shape[0] // 128)
    build = builder(args.arch, args.hidden)
    runs: list[dict[str, Any]] = []

    def log(r: dict[str, Any], t0: float, seed: int, sd: float | None) -> None:
        r.update(seed=seed, sigma_decay=sd, train_s=round(time.perf_counter() - t0, 1))
        runs.append(r)
        print(f"seed {seed} {r['method']:6s} σ-decay={sd!s:6s} error {r['error']:.2f}%  params {r['params'] or 0:,}  "
              f"({r['train_s']} s) {r.get('ranks', '')} {r.get('factored', '')} "
              f"{r.get('error_before_factoring', '')}", flush=True)

    for seed in args.seeds:
        if "dense" in args.methods:
            t0 = time.perf_counter()
            log(run_dense(build, steps, seed, data), t0, seed, None)
        for sd in args.sigma_decays:
            t0 = time.perf_counter()
            row, small = run_lrstr(build, sd, steps, seed, data, args.budget, args.orth)
            log(row, t0, seed, sd)
            if small is None:
                continue
            if "fixed" in args.methods:
                t0 = time.perf_counter()
                log(run_fixed(build, small, steps, seed, data), t0, seed, sd)
            if "svd" in args.methods:
                t0 = time.perf_counter()
                log(run_svd(build, {k: v[0] for k, v in row["ranks"].items()}, steps, seed, data), t0, seed, sd)
    summary: dict[str, Any] = {}
    for r in runs:
        summary.setdefault(f"{r['method']}@{r['sigma_decay']}", []).append(r["error"])
    summary = {k: {"mean": statistics.mean(v), "n": len(v), "errors": v} for k, v in summary.items()}
    doc = {"env": environment(), "arch": args.arch, "hidden": args.hidden if args.arch == "lstm" else 64,
           "epochs": args.epochs, "steps": steps, "budget": args.budget, "orth": args.orth, "seeds": args.seeds,
           "train_limit": args.train_limit,
           "runs": runs, "summary": summary}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
