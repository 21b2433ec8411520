"""Does shrinking pay? Inference latency of dense vs shrunk models, eager PyTorch and onnxruntime.

    python benchmarks/latency.py                                  # writes docs/latency.{json,md}
    python benchmarks/latency.py --models mobilenet_v2 --rounds 3 --out /tmp/lat   # quick look

Structured: a randomly initialised ResNet-50 / MobileNetV2 goes through ``strfx.sparsify(structured)``;
the same fraction of every prunable channel group is then killed through STR
(``strfx.testing.kill_channels``, i.e. what training with a higher threshold would leave) and
``strfx.shrink`` removes the dead channels. The fraction is 1 - 1/sqrt(r) for r = 1.5, 2, 4 (conv FLOPs
scale with in × out channels); the FLOPs gain actually reached is measured (torch.utils.flop_counter) and
reported. ``--round-to 8`` adds, for the same dead channels, ``strfx.shrink(..., round_to=8)``: a few dead
channels are kept (as zeros) so every group stays a multiple of 8 wide (vector-friendly widths).

Latency: median of ``--rounds`` timed calls per variant; every round calls all variants of a model in
a rotating order (eager and onnxruntime alike), so machine noise hits all of them. Gain ratio =
(dense latency / shrunk latency) / (dense FLOPs / shrunk FLOPs); 1.0 = latency falls exactly like FLOPs.

Unstructured: ResNet-50 with 90 % of every conv/fc weight zeroed through STR thresholds (per-layer s set
at the 90 % magnitude quantile) and folded; dense kernels gain nothing from zeros, so its latency is
measured beside dense's, and the exported ONNX file is compressed (zlib -9) to show what the zeros do
buy: size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

import strfx
from _env import environment
from strfx._torchvision import torchvision
from strfx.modules import str_weights
from strfx.testing import kill_channels, randomize_

ROOT = Path(__file__).resolve().parents[1]


def flops(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


def onnx_export(model: nn.Module, x: torch.Tensor, path: Path) -> str:
    """ONNX export with a dynamic batch dimension; returns the exporter used.

    The TorchScript-based exporter first: 20-40× faster here than the torch.export-based one, which
    is the fallback (the same choice as strfx.export on the export branch).
    """
    try:
        with torch.no_grad():
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, do_constant_folding=True,
                              input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
        return "torchscript"
    except Exception:  # noqa: BLE001 - any failure: try the other exporter
        batch = torch.export.Dim("batch", min=1, max=64)
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
        return "dynamo"


def ort_max_error(run: Callable[[np.ndarray], Any], model: nn.Module, size: int) -> float:
    """Max |onnxruntime - torch| on a random batch of 2: the timed files compute the same function."""
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x).numpy()
    return float(np.abs(run(x.numpy())[0] - ref).max())


def ort_runner(path: Path, threads: int) -> Callable[[np.ndarray], Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda a: sess.run(None, {name: a})


def time_interleaved(calls: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each entry, calls interleaved in a rotating order."""
    keys = list(calls)
    for _ in range(warmup):
        for k in keys:
            calls[k]()
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            t0 = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def time_batches(variants: dict[str, nn.Module], sessions: dict[str, Callable[[Any], Any]], batches: list[int],
                 rounds: int, size: int, label: str) -> dict[str, dict[str, float]]:
    """Median seconds per ``backend/variant`` and batch size: eager for every variant, ORT where exported."""
    lat: dict[str, dict[str, float]] = {}
    for b in batches:
        x = torch.randn(b, 3, size, size)
        xa = x.numpy()
        calls: dict[str, Callable[[], Any]] = {}
        for name, m in variants.items():
            calls[f"eager/{name}"] = (lambda m=m: _eager(m, x))
            if name in sessions:
                calls[f"ort/{name}"] = (lambda s=sessions[name]: s(xa))
        lat[str(b)] = time_interleaved(calls, rounds)
        print(f"  {label} batch {b}: " + ", ".join(f"{k} {v * 1e3:.1f}ms" for k, v in lat[str(b)].items()),
              flush=True)
    return lat


def structured(model_name: str, targets: list[float], round_to: int | None, round_targets: list[float],
               batches: list[int], rounds: int,
               ort_variants: set[str] | None, threads: int, tmp: Path, size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    dense = randomize_(getattr(torchvision.models, model_name)(weights=None), seed=0).eval()
    x1 = torch.randn(1, 3, size, size)
    gm = strfx.sparsify(dense, "structured", example_inputs=(x1,))
    dense_flops = flops(dense, x1)
    variants: dict[str, nn.Module] = {"dense": dense}
    info: dict[str, Any] = {"dense": {"flops": dense_flops, "flops_gain": 1.0}}
    for r in targets:
        frac = 1 - 1 / math.sqrt(r)
        work = strfx.sparsify(dense, "structured", example_inputs=(x1,))
        killed = kill_channels(work, frac, seed=0)["channels"]
        for rt in ([None, round_to] if round_to and r in round_targets else [None]):
            # the same dead channels; with round_to, shrink keeps a few of them so widths are multiples
            t0 = time.perf_counter()
            small = strfx.shrink(work, round_to=rt or 1).eval()
            name = f"{r:g}x" + (f"-round{rt}" if rt else "")
            f = flops(small, x1)
            rep = small.strfx_shrink
            info[name] = {"target": r, "kill_fraction": frac, "round_to": rt, "killed": killed, "flops": f,
                          "flops_gain": dense_flops / f, "params": rep["params_after"],
                          "shrink_error": rep["max_error"], "shrink_s": time.perf_counter() - t0}
            variants[name] = small
            print(f"  {model_name} {name}: FLOPs gain {dense_flops / f:.2f}×, shrink max err {rep['max_error']:.1e}",
                  flush=True)
    del gm
    sessions = {}
    for name in variants:
        if ort_variants is None or name in ort_variants:
            path = tmp / f"{model_name}-{name}.onnx"
            t0 = time.perf_counter()
            info[name]["exporter"] = onnx_export(variants[name], x1, path)
            sessions[name] = ort_runner(path, threads)
            info[name]["onnx_mb"] = path.stat().st_size / 2**20
            info[name]["ort_max_abs_err"] = ort_max_error(sessions[name], variants[name], size)
            print(f"  exported {path.name} ({time.perf_counter() - t0:.0f}s)", flush=True)
    lat = time_batches(variants, sessions, batches, rounds, size, model_name)
    rows = []
    for b, meds in lat.items():
        for key, sec in meds.items():
            backend, name = key.split("/")
            dense_s = meds[f"{backend}/dense"]
            gain = dense_s / sec
            rows.append({"model": model_name, "batch": int(b), "backend": backend, "variant": name,
                         "latency_ms": sec * 1e3, "latency_gain": gain, "flops_gain": info[name]["flops_gain"],
                         "gain_ratio": gain / info[name]["flops_gain"]})
    return {"model": model_name, "size": size, "variants": info, "rows": rows}


def _eager(m: nn.Module, x: torch.Tensor) -> Any:
    with torch.no_grad():
        return m(x)


@torch.no_grad()
def unstructured(batches: list[int], rounds: int, threads: int, tmp: Path, size: int, sparsity: float = 0.9
                 ) -> dict[str, Any]:
    torch.manual_seed(0)
    dense = randomize_(torchvision.models.resnet50(weights=None), seed=0).eval()
    x1 = torch.randn(1, 3, size, size)
    gm = strfx.sparsify(dense, "unstructured", example_inputs=(x1,))
    for qual, strw in str_weights(gm).items():
        owner, _, attr = qual.rpartition(".")
        raw = gm.get_submodule(owner).parametrizations[attr].original
        q = float(torch.quantile(raw.abs().flatten()[:2_000_000].float(), sparsity))
        strw.s.fill_(math.log(q / (1 - q)))  # g(s) = q: the 90 % smallest magnitudes become zero
    for qual in list(str_weights(gm)):
        owner, _, attr = qual.rpartition(".")
        parametrize.remove_parametrizations(gm.get_submodule(owner), attr, leave_parametrized=True)
    ws = [m.weight for m in gm.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    variants = {"dense": dense, f"{int(sparsity * 100)}%-zeros": gm.eval()}
    info: dict[str, Any] = {"weight_sparsity": zeros}
    sessions = {}
    for name, m in variants.items():
        path = tmp / f"resnet50-unstructured-{name.replace('%', 'pct')}.onnx"
        exporter = onnx_export(m, x1, path)
        raw = path.read_bytes()
        sessions[name] = ort_runner(path, threads)
        info[name] = {"onnx_mb": len(raw) / 2**20, "onnx_zlib9_mb": len(zlib.compress(raw, 9)) / 2**20,
                      "exporter": exporter, "ort_max_abs_err": ort_max_error(sessions[name], m, size)}
    lat = time_batches(variants, sessions, batches, rounds, size, "resnet50 unstructured")
    info["latency_ms"] = {b: {k: v * 1e3 for k, v in meds.items()} for b, meds in lat.items()}
    return info


def markdown(res: dict[str, Any]) -> str:
    env = res["env"]
    lines = [
        "# Inference latency: dense vs shrunk (CPU)",
        "",
        f"Command: `python benchmarks/latency.py {' '.join(res['argv'])}`  ",
        f"Machine: {env['nproc']} CPUs ({env['cpu']}), shared (load average at the end {env['loadavg'][0]:.1f}); "
        f"{env['threads']} threads for torch and onnxruntime; torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
        f"strfx {env['strfx']} (commit {env['commit']}); {env['date']}; seed 0 (weights, killed channels, inputs); "
        f"input {res['size']}×{res['size']}, median of {res['rounds']} interleaved rounds.",
        "",
        "Gain ratio = latency gain ÷ FLOPs gain (1.0: latency falls as much as FLOPs). Aim: ≥ 0.9 for ResNet-50 at 2×.",
        "",
        "| model | batch | backend | variant | FLOPs gain | latency (ms) | latency gain | gain ÷ FLOPs gain |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for s in res["structured"]:
        for r in sorted(s["rows"], key=lambda r: (r["batch"], r["backend"], r["flops_gain"], r["variant"])):
            lines.append(f"| {r['model']} | {r['batch']} | {r['backend']} | {r['variant']} | {r['flops_gain']:.2f} | "
                         f"{r['latency_ms']:.1f} | {r['latency_gain']:.2f} | {r['gain_ratio']:.2f} |")
    lines += ["", "Shrunk variants (params after shrinking, max relative error of the shrunk model vs the masked one):", ""]
    for s in res["structured"]:
        for name, v in s["variants"].items():
            if name != "dense":
                lines.append(f"- {s['model']} {name}: killed {v['killed']} channels (fraction {v['kill_fraction']:.3f}), "
                             f"params {v['params']:,}, FLOPs gain {v['flops_gain']:.2f}×, shrink error {v['shrink_error']:.1e}"
                             f", onnxruntime vs torch max abs error {v.get('ort_max_abs_err', float('nan')):.1e}")
    u = res.get("unstructured")
    if u:
        names = [k for k in u if k not in ("weight_sparsity", "latency_ms")]
        lines += ["", f"## Unstructured: ResNet-50 with {100 * u['weight_sparsity']:.1f} % zero conv/fc weights", "",
                  "| variant | ONNX (MiB) | ONNX zlib -9 (MiB) | " +
                  " | ".join(f"{k} b{b} (ms)" for b in u["latency_ms"] for k in ("eager", "ort")) + " |",
                  "|---|---:|---:|" + "---:|" * (2 * len(u["latency_ms"]))]
        for n in names:
            cells = [f"{u['latency_ms'][b][f'{k}/{n}']:.1f}" for b in u["latency_ms"] for k in ("eager", "ort")]
            lines.append(f"| {n} | {u[n]['onnx_mb']:.1f} | {u[n]['onnx_zlib9_mb']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--targets", nargs="+", type=float, default=[1.5, 2.0, 4.0], help="FLOPs reduction targets")
    ap.add_argument("--round-to", type=int, default=8, help="also measure channel counts rounded up to this (0: off)")
    ap.add_argument("--round-targets", nargs="+", type=float, default=None,
                    help="targets that also get a rounded variant (default: every target)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ort", nargs="+", default=None,
                    help="variants also exported to ONNX and timed in onnxruntime (default: all)")
    ap.add_argument("--no-unstructured", action="store_true")
    ap.add_argument("--unstructured-batches", nargs="+", type=int, default=None, help="default: --batches")
    ap.add_argument("--stem", default="latency", help="output file stem under --out")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res: dict[str, Any] = {"argv": sys.argv[1:], "size": args.size, "rounds": args.rounds, "structured": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in args.models:
            res["structured"].append(structured(name, args.targets, args.round_to or None,
                                                args.round_targets or args.targets,
                                                args.batches, args.rounds,
                                                set(args.ort) if args.ort else None, args.threads, tmp, args.size))
        if not args.no_unstructured:
            res["unstructured"] = unstructured(args.unstructured_batches or args.batches, args.rounds, args.threads, tmp, args.size)
    import onnxruntime

    res["env"] = environment(onnxruntime=onnxruntime.__version__)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (args.out / f"{args.stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
