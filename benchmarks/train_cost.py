"""What does STR cost per training step? Dense vs strfx (structured, unstructured) vs a naive STRConv.

    python benchmarks/train_cost.py                    # ResNet-18 + ResNet-50, writes docs/train_cost.{json,md}
    python benchmarks/train_cost.py --models resnet18 --rounds 3 --out /tmp/tc   # quick look

One train step = forward + cross-entropy + backward + SGD(momentum) step, on CPU. All variants of a
model live in the same process and are timed round-robin (the order rotates every round), and the
reported number is each variant's median step time divided by dense's median: noise from the shared
machine hits every variant alike. Memory: bytes of the (unique) tensors autograd saves for backward in
one step (measured with ``torch.autograd.graph.saved_tensors_hooks``), which is where the variants differ,
and, with ``--rss``, how far a fresh process's peak RSS rises above its post-build RSS over 3 steps.

Variants:

* ``dense``          — the torchvision model.
* ``strfx-struct``   — ``strfx.sparsify(m, "structured")``: STR-BN replaces every BatchNorm.
* ``strfx-unstruct`` — ``strfx.sparsify(m, "unstructured")``: a parametrization thresholds every conv/fc weight.
* ``naive-strconv``  — the original STR code's approach, written here: every Conv2d/Linear becomes a module
  that computes ``sign(w) * relu(|w| - sigmoid(s))`` in its own forward and calls F.conv2d/F.linear.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import strfx
from _env import environment
from strfx._torchvision import torchvision

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("dense", "strfx-struct", "strfx-unstruct", "naive-strconv")


class NaiveSTRConv(nn.Conv2d):
    """Conv2d thresholding its weight every forward, as in the STR authors' code (one scalar s per layer)."""

    def __init__(self, conv: nn.Conv2d, s_init: float = -15.0) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        self.load_state_dict(conv.state_dict())
        self.s = nn.Parameter(torch.tensor([s_init]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sign(self.weight) * torch.relu(self.weight.abs() - torch.sigmoid(self.s))
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class NaiveSTRLinear(nn.Linear):
    """Linear counterpart of :class:`NaiveSTRConv` (strfx thresholds the fc weight too)."""

    def __init__(self, fc: nn.Linear, s_init: float = -15.0) -> None:
        super().__init__(fc.in_features, fc.out_features, fc.bias is not None)
        self.load_state_dict(fc.state_dict())
        self.s = nn.Parameter(torch.tensor([s_init]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sign(self.weight) * torch.relu(self.weight.abs() - torch.sigmoid(self.s))
        return F.linear(x, w, self.bias)


def naive_str(model: nn.Module) -> nn.Module:
    """Swap every Conv2d/Linear of ``model`` (in place) for its naive STR version."""
    for name, mod in list(model.named_children()):
        if isinstance(mod, nn.Conv2d):
            setattr(model, name, NaiveSTRConv(mod))
        elif isinstance(mod, nn.Linear):
            setattr(model, name, NaiveSTRLinear(mod))
        else:
            naive_str(mod)
    return model


def build(model_name: str, variant: str, example: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    base = getattr(torchvision.models, model_name)(weights=None)
    if variant == "dense":
        return base
    if variant == "strfx-struct":
        return strfx.sparsify(base, "structured", example_inputs=(example[:2],))
    if variant == "strfx-unstruct":
        return strfx.sparsify(base, "unstructured", example_inputs=(example[:2],))
    if variant == "naive-strconv":
        return naive_str(base)
    raise ValueError(variant)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-5)
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the unique storages autograd keeps for backward during one forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _proc_status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_of(model_name: str, variant: str, batch: int, size: int, threads: int) -> float:
    """Peak RSS growth (MiB) of a fresh process running 3 train steps of one variant after building it.

    Imports and model construction are alike for every variant and would swamp the difference, so the
    high-water mark is reset (``/proc/self/clear_refs``) once the model is built.
    """
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torch; "
            f"torch.set_num_threads({threads}); import train_cost as t; "
            f"x = torch.randn({batch}, 3, {size}, {size}); y = torch.randint(0, 1000, ({batch},)); "
            f"m = t.build({model_name!r}, {variant!r}, x); s = t.make_step(m, x, y); "
            "open('/proc/self/clear_refs', 'w').write('5'); base = t._proc_status_kib('VmRSS'); "
            "[s() for _ in range(3)]; print(t._proc_status_kib('VmHWM') - base)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def measure(model_name: str, batch: int, size: int, rounds: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    models = {v: build(model_name, v, x) for v in VARIANTS}
    steps = {v: make_step(m, x, y) for v, m in models.items()}
    for _ in range(warmup):
        for v in VARIANTS:
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for v in order:
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
        print(f"  {model_name} round {r + 1}/{rounds}: " +
              ", ".join(f"{v} {times[v][-1]:.2f}s" for v in VARIANTS), flush=True)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    saved = {v: saved_bytes(models[v], x, y) for v in VARIANTS}
    return {"model": model_name, "batch": batch, "size": size, "rounds": rounds, "times_s": times,
            "median_s": med, "ratio": {v: med[v] / med["dense"] for v in VARIANTS},
            # paired: each round's time over the same round's dense time (robust to slow phases of the machine)
            "paired_ratio": {v: statistics.median(t / d for t, d in zip(times[v], times["dense"])) for v in VARIANTS},
            "saved_mib": {v: saved[v] / 2**20 for v in VARIANTS},
            "saved_ratio": {v: saved[v] / saved["dense"] for v in VARIANTS}}


def profile(model_name: str, batch: int, size: int, top: int = 12) -> dict[str, list[tuple[str, float]]]:
    """Self-CPU time per op (ms, one step after warm-up) for dense and both strfx variants."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    out = {}
    for v in ("dense", "strfx-struct", "strfx-unstruct"):
        step = make_step(build(model_name, v, x), x, y)
        step()
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        out[v] = [(e.key, e.self_cpu_time_total / 1e3) for e in rows[:top]]
    return out


def markdown(results: list[dict[str, Any]], env: dict[str, Any], argv: list[str],
             prof: dict[str, Any] | None) -> str:
    lines = [
        "# Train-step cost of STR (CPU)",
        "",
        f"Command: `python benchmarks/train_cost.py {' '.join(argv)}`  ",
        f"Machine: {env['nproc']} CPUs ({env['cpu']}), shared with other jobs (load average at the end "
        f"{env['loadavg'][0]:.1f}); {env['threads']} torch threads; "
        f"torch {env['torch']}, strfx {env['strfx']} (commit {env['commit']}); {env['date']}; seed 0 (weights, inputs).",
        "",
        "Step = forward + cross-entropy + backward + SGD step. Ratios = median step time / dense median, all "
        "variants timed round-robin in one process. Saved = bytes autograd keeps for backward (unique storages).",
        "Aims: strfx-struct ≤ 1.05×, strfx-unstruct ≤ 1.10×.",
        "",
        "| model | batch × size | variant | median step (s) | × dense (medians) | × dense (paired, median) | saved for backward (MiB) | × dense | peak RSS growth in a step (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for v in VARIANTS:
            rss = f"{r['rss_mib'][v]:.0f}" if r.get("rss_mib") else ""
            lines.append(f"| {r['model']} | {r['batch']} × {r['size']}² | {v} | {r['median_s'][v]:.3f} | "
                         f"{r['ratio'][v]:.3f} | {r['paired_ratio'][v]:.3f} | {r['saved_mib'][v]:.0f} | {r['saved_ratio'][v]:.2f} | {rss} |")
    if prof:
        lines += ["", f"## Profile ({prof['model']}, one step, top ops by self CPU time, ms)", ""]
        for v, rows in prof["ops"].items():
            lines.append(f"- **{v}**: " + ", ".join(f"{k} {ms:.0f}" for k, ms in rows))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--batch", type=int, nargs="+", default=[32], help="batch per model (one value: all models)")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rss", action="store_true", help="also measure peak RSS per variant in fresh processes")
    ap.add_argument("--profile", default=None, help="model to profile per op (e.g. resnet18)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    batches = args.batch * len(args.models) if len(args.batch) == 1 else args.batch
    for name, batch in zip(args.models, batches):
        res = measure(name, batch, args.size, args.rounds, args.warmup)
        if args.rss:
            res["rss_mib"] = {v: rss_of(name, v, batch, args.size, args.threads) for v in VARIANTS}
        results.append(res)
        print(json.dumps({k: res[k] for k in ("model", "median_s", "ratio", "paired_ratio", "saved_mib", "saved_ratio")}),
              flush=True)
    prof = None
    if args.profile:
        prof = {"model": args.profile, "ops": profile(args.profile, batches[args.models.index(args.profile)]
                                                      if args.profile in args.models else batches[0], args.size)}
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_cost.json").write_text(json.dumps({"env": env, "argv": sys.argv[1:], "results": results,
                                                          "profile": prof}, indent=1))
    md = markdown(results, env, sys.argv[1:], prof)
    (args.out / "train_cost.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
