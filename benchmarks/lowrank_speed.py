"""Does factoring pay? ResNet-50 and ViT-B/16 factored to half the FLOPs beside channel pruning (issue 12).

    # what wrote docs/lowrank_speed.{json,md} (two runs sharing one file; 1 thread on a loaded 2-core machine):
    nice -n 19 python benchmarks/lowrank_speed.py --models resnet50 --rounds 5 --threads 1 --append
    nice -n 19 python benchmarks/lowrank_speed.py --models vit_b_16 --vit-layers 4 --rounds 5 --threads 1 --append
    python benchmarks/lowrank_speed.py --models resnet50 --batches 1 --size 64 --rounds 1 --out /tmp/lrs  # quick look

Low rank: a randomly initialised model (``strfx.testing.randomize_``, seed 0, nothing downloaded) goes through
``strfx.sparsify(model, "lowrank")``; then the end of training is played as ``benchmarks/latency.py`` plays it
for channels: in every low-rank layer the raw singular values past rank ``r`` are set below the threshold
(what weight decay on σ does in training), and ``strfx.shrink`` factors each layer
(Linear → Linear(in, r) + Linear(r, out); k×k conv → k×k conv to r channels + 1×1 conv) where that saves
weights, else folds it back to one dense weight. **Rank rule**: one rank fraction ``f`` for every layer,
``r = max(1, round(f · full rank))`` (with ``round8``: rounded up to a multiple of 8), ``f`` found by bisection
so the whole model's FLOPs (torch.utils.flop_counter, attention matmuls, norms, everything) fall to
1/``--target``: the analogue of latency.py's uniform channel kill. The singular values killed are the
smallest ones.

Channels, at about the same FLOPs: ResNet-50 as ``benchmarks/latency.py`` does it (structured mode, a
fraction 1 - 1/sqrt(target) of every prunable channel group killed through STR, shrink, with and without
``round_to=8``). ViT-B/16: structured mode, half of every layer's attention heads and MLP neurons killed
through their importance vectors (the hidden size, i.e. the residual stream, and depth untouched;
``--vit-hidden`` adds a variant that also cuts the hidden size).

ViT-B/16's attention: torchvision's ``nn.MultiheadAttention`` keeps its q/k/v projection as one raw
``in_proj_weight`` that no nn.Linear owns, so neither low-rank mode nor a channel cut can give it a thinner
layer in the module's own class. Every ViT variant (dense included) therefore uses the same, numerically
equal attention written with two nn.Linear layers (``qkv``, ``proj``) and ``F.scaled_dot_product_attention``
(as timm's ViT does); the untouched torchvision model is timed beside it as ``dense-mha``.

Checks: ``strfx.shrink``'s float32 check of the shrunk model against the masked one (reported), and
onnxruntime against torch on a random batch of 2. Latency: median of ``--rounds`` interleaved rounds
(``benchmarks/latency.py``'s helpers), torch eager and onnxruntime, each model's own batch sizes.
Gain ratio = latency gain ÷ FLOPs gain (1.0: latency falls as much as FLOPs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, environment  # noqa: E402
from latency import flops, onnx_export, ort_max_error, ort_runner, time_batches  # noqa: E402

import strfx  # noqa: E402
import strfx.flops  # noqa: E402,F401  (registers the FLOPs formula of CPU attention with torch's counter)
from strfx._torchvision import torchvision  # noqa: E402
from strfx.lowrank import lowrank_parametrizations, lowrank_report, ranks  # noqa: E402
from strfx.modules import channel_carriers  # noqa: E402
from strfx.testing import kill_channels, randomize_  # noqa: E402

SEED = 0


# ---------------------------------------------------------------------------------------------------------
# ViT attention with nn.Linear projections


class QKVAttention(nn.Module):
    """``nn.MultiheadAttention(batch_first=True)``'s self-attention with its projections as nn.Linear layers.

    The number of heads is read from the qkv layer's width (``reshape(..., -1, head_dim)``), so a model whose
    heads were cut still runs in its own class.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e = mha.embed_dim
        self.head_dim = e // mha.num_heads
        self.qkv = nn.Linear(e, 3 * e)
        self.proj = nn.Linear(e, e)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            self.qkv.bias.copy_(mha.in_proj_bias)
            self.proj.weight.copy_(mha.out_proj.weight)
            self.proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query: torch.Tensor, key: Any = None, value: Any = None, need_weights: bool = False
                ) -> tuple[torch.Tensor, None]:
        b, n, _ = query.shape
        q, k, v = self.qkv(query).reshape(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, -1)), None


def with_linear_attention(vit: nn.Module) -> nn.Module:
    """A copy of a torchvision ViT whose every self-attention is a :class:`QKVAttention` (same function)."""
    import copy

    new = copy.deepcopy(vit)
    for block in new.encoder.layers:
        block.self_attention = QKVAttention(block.self_attention)
    return new


# ---------------------------------------------------------------------------------------------------------
# low rank: one rank fraction for every layer, bisected on the model's FLOPs


def rank_for(full: int, frac: float, round_to: int) -> int:
    r = max(1, round(frac * full))
    if round_to > 1:
        r = math.ceil(r / round_to) * round_to
    return min(full, r)


def plan_ranks(lr: nn.Module, x: torch.Tensor, dense_flops: int, target: float, round_to: int
               ) -> tuple[float, dict[str, int], int]:
    """(f, layer → rank, predicted model FLOPs) for the rank fraction whose FLOPs gain is closest to ``target``.

    A layer's FLOPs after factoring at rank r are its dense FLOPs × r·(g·cols + out)/(out·cols) where that is
    smaller, else unchanged (shrink folds it back); everything that is not a low-rank layer keeps its FLOPs.
    """
    rows = lowrank_report(lr, (x,)).layers
    rest = dense_flops - sum(r.flops_dense for r in rows)  # type: ignore[misc]

    def total(frac: float) -> tuple[int, dict[str, int]]:
        t, rk = rest, {}
        for row in rows:
            out, cols = row.shape
            r = rank_for(row.full_rank, frac, round_to)
            fact = r * (row.groups * cols + out)
            rk[row.name] = r
            t += row.flops_dense * fact // (out * cols) if fact < out * cols else row.flops_dense  # type: ignore[operator]
        return t, rk

    lo, hi = 0.0, 1.0  # gain(lo) ≥ target ≥ gain(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        if dense_flops / total(mid)[0] >= target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda f: abs(dense_flops / total(f)[0] - target))
    t, rk = total(best)
    return best, rk, t


@torch.no_grad()
def kill_ranks(lr: nn.Module, rank: dict[str, int]) -> None:
    """Push each layer's raw singular values past its rank below the threshold (they are stored largest first)."""
    for name, (mod, tname, _) in lowrank_parametrizations(lr).items():
        mod.parametrizations[tname].original1[rank[name]:] = -1.0


def lowrank_variant(dense: nn.Module, x1: torch.Tensor, dense_flops: int, target: float, round_to: int
                    ) -> tuple[nn.Module, dict[str, Any]]:
    t0 = time.perf_counter()
    # nothing is trained here, so U and V stay the SVD's (orthonormal) and the default "qr" would return them
    # unchanged: "none" gives the same factors without a QR of every U and V in every verification forward
    lr = strfx.sparsify(dense, "lowrank", example_inputs=(x1,), config={"lowrank": {"orthogonality": "none"}})
    frac, rank, predicted = plan_ranks(lr, x1, dense_flops, target, round_to)
    kill_ranks(lr, rank)
    got = ranks(lr)
    assert all(got[k][0] == rank[k] for k in rank), "a killed rank did not die"
    small = strfx.shrink(lr, (x1,)).eval()
    rep = small.strfx_shrink
    layers = small.strfx_lowrank.layers
    f = flops(small, x1)
    info = {"kind": "lowrank", "rank_fraction": frac, "round_to": round_to, "flops": f, "flops_predicted": predicted,
            "flops_gain": dense_flops / f, "params": rep["params_after"], "shrink_error": rep["max_error"],
            "factored": sum(r.factored for r in layers), "layers": len(layers),
            "ranks": {r.name: [r.rank, r.full_rank] for r in layers}, "build_s": time.perf_counter() - t0}
    return small, info


# ---------------------------------------------------------------------------------------------------------
# channels


def resnet_channel_variants(dense: nn.Module, x1: torch.Tensor, dense_flops: int, target: float
                            ) -> list[tuple[str, nn.Module, dict[str, Any]]]:
    """latency.py's structured variant: 1 - 1/sqrt(target) of every prunable group killed, shrunk (and round_to=8)."""
    frac = 1 - 1 / math.sqrt(target)
    work = strfx.sparsify(dense, "structured", example_inputs=(x1,))
    killed = kill_channels(work, frac, seed=SEED)["channels"]
    out = []
    for rt in (1, 8):
        t0 = time.perf_counter()
        small = strfx.shrink(work, round_to=rt).eval()
        f = flops(small, x1)
        rep = small.strfx_shrink
        out.append((f"channels{'-round8' if rt > 1 else ''}", small,
                    {"kind": "channels", "kill_fraction": frac, "round_to": rt, "killed": killed, "flops": f,
                     "flops_gain": dense_flops / f, "params": rep["params_after"], "shrink_error": rep["max_error"],
                     "result": rep["result"], "build_s": time.perf_counter() - t0}))
    return out


@torch.no_grad()
def vit_channel_variant(dense: nn.Module, x1: torch.Tensor, dense_flops: int, frac: float, hidden: float
                        ) -> tuple[nn.Module, dict[str, Any]]:
    """Half of every layer's heads and MLP neurons (and with ``hidden`` > 0 that fraction of the hidden size)."""
    from vit_units import _hidden_carriers, unit_kind

    t0 = time.perf_counter()
    work = strfx.sparsify(dense, "structured", example_inputs=(x1,))
    hidden_names = _hidden_carriers(work)
    rng = np.random.default_rng(SEED)
    units: dict[str, list[int]] = {}
    for c in channel_carriers(work).values():
        kind = unit_kind(c, hidden_names)
        n = c.raw.numel()
        p = {"heads": frac, "neurons": frac, "hidden": hidden}.get(kind, 0.0)
        k = min(n - 1, int(round(p * n)))
        if k > 0:
            c.raw[torch.as_tensor(rng.choice(n, size=k, replace=False))] = 0.0
        before, after = units.get(kind, [0, 0])
        units[kind] = [before + n, after + n - max(k, 0)]
    small = strfx.shrink(work, (x1,)).eval()
    f = flops(small, x1)
    rep = small.strfx_shrink
    return small, {"kind": "channels", "kill_fraction": frac, "hidden_fraction": hidden, "units": units, "flops": f,
                   "flops_gain": dense_flops / f, "params": rep["params_after"], "shrink_error": rep["max_error"],
                   "result": rep["result"], "build_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------


def build(name: str, vit_layers: int | None) -> nn.Module:
    """A torchvision model, random init; a ViT with ``vit_layers`` keeps only that many of its encoder blocks."""
    model = getattr(torchvision.models, name)(weights=None)
    if name.startswith("vit") and vit_layers:
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(image_size=model.image_size, patch_size=model.patch_size, num_layers=vit_layers,
                                  num_heads=model.encoder.layers[0].num_heads, hidden_dim=model.hidden_dim,
                                  mlp_dim=model.mlp_dim)
    return model


def run_model(name: str, target: float, batches: list[int], rounds: int, threads: int, tmp: Path, size: int,
              vit_hidden: float, vit_layers: int | None = None) -> dict[str, Any]:
    torch.manual_seed(SEED)
    base = randomize_(build(name, vit_layers), seed=SEED).eval()
    x1 = torch.randn(1, 3, size, size)
    variants: dict[str, nn.Module] = {}
    info: dict[str, Any] = {}
    if name.startswith("vit"):
        dense = with_linear_attention(base).eval()
        with torch.no_grad():
            xs = torch.randn(2, 3, size, size)
            rewrite_err = float((dense(xs) - base(xs)).abs().max() / base(xs).abs().max())
        print(f"  {name}: linear-projection attention vs nn.MultiheadAttention max rel error {rewrite_err:.1e}", flush=True)
        info["attention_rewrite_max_rel_error"] = rewrite_err
    else:
        dense = base
    dense_flops = flops(dense, x1)
    variants["dense"] = dense
    info["dense"] = {"kind": "dense", "flops": dense_flops, "flops_gain": 1.0,
                     "params": sum(p.numel() for p in dense.parameters())}
    if dense is not base:
        variants["dense-mha"] = base
        info["dense-mha"] = {"kind": "dense", "flops": dense_flops, "flops_gain": 1.0, "params": info["dense"]["params"],
                             "note": "torchvision's own nn.MultiheadAttention (fast path); FLOPs taken as dense's"}
    for rt in (1, 8):
        key = "lowrank" + ("-round8" if rt > 1 else "")
        variants[key], info[key] = lowrank_variant(dense, x1, dense_flops, target, rt)
        v = info[key]
        print(f"  {name} {key}: f={v['rank_fraction']:.3f}, {v['factored']}/{v['layers']} layers factored, FLOPs gain "
              f"{v['flops_gain']:.2f}× (predicted {dense_flops / v['flops_predicted']:.2f}×), shrink err "
              f"{v['shrink_error']:.1e}, {v['build_s']:.0f}s", flush=True)
    if name.startswith("vit"):
        chans = [("channels", *vit_channel_variant(dense, x1, dense_flops, 1 - 1 / target, 0.0))]
        if vit_hidden > 0:
            chans.append(("channels+hidden", *vit_channel_variant(dense, x1, dense_flops, vit_hidden, vit_hidden)))
    else:
        chans = resnet_channel_variants(dense, x1, dense_flops, target)
    for key, m, v in chans:
        variants[key], info[key] = m, v
        print(f"  {name} {key}: FLOPs gain {v['flops_gain']:.2f}×, shrink err {v['shrink_error']:.1e}, "
              f"result {v['result']}, {v['build_s']:.0f}s", flush=True)
    sessions = {}
    x2 = torch.randn(2, 3, size, size)  # torch.export (the fallback exporter) would specialise a batch of 1
    for key, m in variants.items():
        path = tmp / f"{name}-{key}.onnx"
        t0 = time.perf_counter()
        try:
            info[key]["exporter"] = onnx_export(m, x2, path)
            sessions[key] = ort_runner(path, threads)
            ort_max_error(sessions[key], m, size)
        except Exception as err:  # noqa: BLE001 - the reference model only: recorded, timed in eager alone
            if key != "dense-mha":
                raise
            info[key]["onnx_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            sessions.pop(key, None)
            print(f"  {name} {key}: not exported ({info[key]['onnx_error']})", flush=True)
            continue
        info[key]["onnx_mb"] = path.stat().st_size / 2**20
        info[key]["ort_max_abs_err"] = ort_max_error(sessions[key], m, size)
        print(f"  exported {path.name} ({info[key]['exporter']}, {time.perf_counter() - t0:.0f}s, "
              f"ort vs torch {info[key]['ort_max_abs_err']:.1e})", flush=True)
    lat = time_batches(variants, sessions, batches, rounds, size, name)
    rows = []
    for b, meds in lat.items():
        for key, sec in meds.items():
            backend, var = key.split("/")
            gain = meds[f"{backend}/dense"] / sec
            rows.append({"model": name, "batch": int(b), "backend": backend, "variant": var, "latency_ms": sec * 1e3,
                         "latency_gain": gain, "flops_gain": info[var]["flops_gain"],
                         "gain_ratio": gain / info[var]["flops_gain"]})
    label = f"{name} ({vit_layers} blocks)" if name.startswith("vit") and vit_layers else name
    for r in rows:
        r["model"] = label
    return {"model": label, "size": size, "batches": batches, "variants": info, "rows": rows}


ORDER = {"dense": 0, "dense-mha": 1, "lowrank": 2, "lowrank-round8": 3, "channels": 4, "channels-round8": 5,
         "channels+hidden": 6}


def markdown(res: dict[str, Any]) -> str:
    env = res["env"]
    lines = [
        "# Does factoring pay? Low rank vs channels at half the FLOPs (CPU)",
        "",
        f"Command: `nice -n 19 python benchmarks/lowrank_speed.py {' '.join(res['argv'])}`  ",
        f"Machine: {env['nproc']} CPUs ({env['cpu']}), shared with other jobs (uptime load average "
        f"{', '.join(f'{v:.1f}' for v in res['load_start'])} at the start, "
        f"{', '.join(f'{v:.1f}' for v in env['loadavg'])} at the end); {env['threads']} threads for torch and "
        f"onnxruntime; torch {env['torch']}, torchvision {env['torchvision']}, onnxruntime {env['onnxruntime']}, "
        f"python {env['python']}, strfx {env['strfx']} (commit {env['commit']}); {env['date']}; seed {res['seed']} "
        f"(weights, killed channels, inputs); input {res['size']}×{res['size']}, median of {res['rounds']} "
        f"interleaved rounds; target FLOPs gain {res['target']:g}×; wall time {res['wall_min']:.0f} min.",
        "",
    ]
    for m in res["models"]:
        if "env" in m:  # kept from an earlier run (--append)
            e = m["env"]
            lines += [f"{m['model']} is from an earlier run: `python benchmarks/lowrank_speed.py {' '.join(m['argv'])}`, "
                      f"commit {e['commit']}, {e['date']}, load average at its end "
                      f"{', '.join(f'{v:.1f}' for v in e['loadavg'])}.", ""]
    lines += [
        "Gain ratio = latency gain ÷ FLOPs gain (1.0: latency falls as much as FLOPs). Latency gains are against "
        "`dense` in the same backend and batch.",
        "",
        "Setup (details in the script's docstring): random init, nothing trained. **lowrank**: "
        "`strfx.sparsify(model, \"lowrank\")`, then in every low-rank layer the smallest singular values are killed "
        "through STR so that it keeps `round(f · full rank)` of them (`-round8`: rounded up to a multiple of 8), one "
        "fraction `f` for all layers, bisected until the model's FLOPs halve; `strfx.shrink` factors each layer "
        "(Linear → Linear(in, r) + Linear(r, out); k×k conv → k×k conv to r channels + 1×1 conv). **channels**: "
        "ResNet-50 as in [latency.md](latency.md) (1 − 1/√2 of every prunable channel group killed through STR, "
        "`strfx.shrink`, `-round8`: `round_to=8`); ViT: half of every layer's attention heads and MLP neurons killed "
        "through their importance vectors, the hidden size (the residual stream) untouched. The ViT variants all use "
        "an attention with nn.Linear `qkv`/`proj` layers and `F.scaled_dot_product_attention`, numerically equal "
        "to torchvision's `nn.MultiheadAttention` (whose packed `in_proj_weight` no layer owns, so neither method "
        "could thin it); `dense-mha` is torchvision's own model, timed for reference.",
        "",
        "| model | batch | backend | variant | FLOPs gain | latency (ms) | latency gain | gain ÷ FLOPs gain |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for m in res["models"]:
        for r in sorted(m["rows"], key=lambda r: (r["batch"], r["backend"], ORDER.get(r["variant"], 9))):
            lines.append(f"| {r['model']} | {r['batch']} | {r['backend']} | {r['variant']} | {r['flops_gain']:.2f} | "
                         f"{r['latency_ms']:.1f} | {r['latency_gain']:.2f} | {r['gain_ratio']:.2f} |")
    lines += ["", "Variants (params after; shrink error = max relative error of the shrunk model vs the masked one, "
              "float32; onnxruntime vs torch = max abs error on a random batch of 2):", ""]
    for m in res["models"]:
        if "attention_rewrite_max_rel_error" in m["variants"]:
            lines.append(f"- {m['model']}: attention with nn.Linear projections vs torchvision's nn.MultiheadAttention: "
                         f"max relative error {m['variants']['attention_rewrite_max_rel_error']:.1e}")
        for key, v in m["variants"].items():
            if not isinstance(v, dict):
                continue
            bits = [f"params {v['params']:,}", f"FLOPs {v['flops'] / 1e9:.2f} G (gain {v['flops_gain']:.2f}×)"]
            if v["kind"] == "lowrank":
                bits.insert(0, f"rank fraction {v['rank_fraction']:.3f}"
                               + (f" rounded up to a multiple of {v['round_to']}" if v["round_to"] > 1 else "")
                               + f", {v['factored']} of {v['layers']} layers factored")
            elif v["kind"] == "channels":
                if "units" in v:
                    bits.insert(0, "units " + ", ".join(f"{k} {a} → {b}" for k, (a, b) in v["units"].items()))
                else:
                    bits.insert(0, f"{v['killed']} channels killed (fraction {v['kill_fraction']:.3f}), "
                                   f"round_to {v['round_to']}")
                bits.append(f"shrink result {v['result']}")
            if "shrink_error" in v:
                bits.append(f"shrink error {v['shrink_error']:.1e}")
            if "onnx_error" in v:
                bits.append(f"not in onnxruntime ({v['onnx_error']})")
            else:
                bits.append(f"onnxruntime vs torch {v['ort_max_abs_err']:.1e} ({v['exporter']} exporter)")
            if v.get("note"):
                bits.append(v["note"])
            lines.append(f"- {m['model']} {key}: " + "; ".join(bits))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    ap.add_argument("--target", type=float, default=2.0, help="FLOPs reduction target")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32], help="batch sizes for CNNs")
    ap.add_argument("--vit-batches", nargs="+", type=int, default=[1, 8], help="batch sizes for ViTs")
    ap.add_argument("--vit-hidden", type=float, default=0.0,
                    help="also a ViT channel variant that cuts this fraction of heads, neurons and hidden size")
    ap.add_argument("--vit-layers", type=int, default=None,
                    help="keep only this many of a ViT's (identical) encoder blocks: a layer stack with its shapes")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stem", default="lowrank_speed", help="output file stem under --out")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--append", action="store_true",
                    help="keep the other models of an existing <stem>.json (each with its own run's environment)")
    ap.add_argument("--render", action="store_true", help="only rewrite <stem>.md from <stem>.json")
    args = ap.parse_args()
    if args.render:
        write_markdown(json.loads((args.out / f"{args.stem}.json").read_text()), args.out / f"{args.stem}.md")
        return
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"argv": sys.argv[1:], "size": args.size, "rounds": args.rounds, "target": args.target,
                           "seed": SEED, "load_start": os.getloadavg(), "models": []}
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            batches = args.vit_batches if name.startswith("vit") else args.batches
            res["models"].append(run_model(name, args.target, batches, args.rounds, args.threads, Path(d), args.size,
                                           args.vit_hidden, args.vit_layers))
            write(res, args, t_start)  # after every model: a late failure keeps what was measured
    print(markdown(write(res, args, t_start)))


def write(res: dict[str, Any], args: argparse.Namespace, t_start: float) -> dict[str, Any]:
    """Record the environment now and write ``<stem>.json`` / ``.md`` atomically; returns what was written.

    With ``--append`` the other models already in ``<stem>.json`` (read now, so two runs of different models
    can share one file) are kept, each with the command and environment of the run that measured it.
    """
    import onnxruntime

    earlier: list[dict[str, Any]] = []
    path = args.out / f"{args.stem}.json"
    if args.append and path.exists():
        old = json.loads(path.read_text())
        mine = {m["model"] for m in res["models"]}
        earlier = [m if "env" in m else dict(m, env=old["env"], argv=old["argv"]) for m in old["models"]
                   if m["model"] not in mine and m["model"].split(" ")[0] not in args.models]

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    res["env"] = environment(onnxruntime=onnxruntime.__version__, torchvision=torchvision.__version__, uptime=uptime)
    res["wall_min"] = (time.perf_counter() - t_start) / 60
    out = dict(res, models=earlier + res["models"])
    args.out.mkdir(parents=True, exist_ok=True)
    _atomic(args.out / f"{args.stem}.json", json.dumps(out, indent=1))
    write_markdown(out, args.out / f"{args.stem}.md")
    return out


HAND = "<!-- written by hand below this line; kept when the tables above are regenerated -->"


def write_markdown(res: dict[str, Any], path: Path) -> None:
    """The generated tables, plus whatever the existing file has below the ``HAND`` marker."""
    text = markdown(res)
    if path.exists() and HAND in path.read_text():
        text += "\n" + HAND + path.read_text().split(HAND, 1)[1]
    _atomic(path, text)


def _atomic(path: Path, text: str) -> None:
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(text)
    tmp_path.replace(path)


if __name__ == "__main__":
    main()
