"""Tokens/s of the LM benchmark's shrunk models in torch eager and onnxruntime, without retraining them.

    python benchmarks/lm_speed.py           # the rows of docs/lm.json, lm_rewind.json, lm_tp.json -> docs/lm_speed.{json,md}
    python benchmarks/lm_speed.py --runs docs/lm.json --limit 1 --out /tmp/lms   # a quick look

Speed depends on the shapes, not on the weights. ``benchmarks/lm.py`` records, for every method and target,
how many query heads and MLP neurons each layer kept, the hidden size and which residual branches remain;
this script rebuilds models of exactly those shapes: a randomly initialised Llama of the run's config goes
through ``strfx.sparsify(structured)`` (depth gates where the method had them), the recorded number of
kv head groups, neurons, hidden channels and branches per layer is killed through strfx's STR carriers
(which ones is seeded and does not matter), and ``strfx.shrink`` cuts them — the path the benchmark's own
models took. Torch-Pruning's rows (MLP neurons only) are rebuilt the same way; its model has the same
module shapes. A rebuilt model is used only if its parameter count and FLOPs equal the recorded ones.

Each shrunk model is then timed beside the (random) dense model with :class:`lm.SpeedMeter`: exported with
``strfx.export`` (verified in onnxruntime), checked on the timed batch, and timed in rounds that interleave
dense and shrunk, torch eager and onnxruntime.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm  # noqa: E402  (imports strfx before transformers)
import strfx  # noqa: E402
import strfx.modules  # noqa: E402
from _env import environment  # noqa: E402

DOCS = lm.DOCS
RUNS = [DOCS / "lm.json", DOCS / "lm_rewind.json", DOCS / "lm_tp.json"]
SOFTMAX_OPS = ("Softmax", "Where", "IsNaN")  # the exported attention outside its matmuls
ORDER = ["str-all", "str-hn", "str-all+rw", "str-hn+rw", "uniform", "tp"]


@torch.no_grad()
def shaped_like(dense: nn.Module, kept: dict[str, Any], b: lm.Budget, depth: bool, seed: int = 0) -> nn.Module:
    """A shrunk copy of ``dense`` with the widths in ``kept`` (as :func:`lm.kept_units` records them): per layer
    query heads (whole kv groups) and neurons, the hidden size and the residual branches (1 kept, 0 removed)."""
    rep = b.heads // b.kv_heads
    odd = [h for h in kept["heads"] if h % rep]
    if odd:
        raise ValueError(f"{odd[0]} query heads kept in a layer: not whole kv groups of {rep}")
    sparse = strfx.sparsify(copy.deepcopy(dense), "structured", example_inputs=lm.example(b), verify=False,
                            config={"depth": depth})
    gen = torch.Generator().manual_seed(seed)
    for name, c in strfx.modules.channel_carriers(sparse).items():
        kind, layer = lm.unit_kind(name, c.kind), lm.layer_of(name)
        if kind == "heads":
            alive = kept["heads"][layer] // rep
        elif kind == "neurons":
            alive = kept["neurons"][layer]
        elif kind == "hidden":
            alive = kept["hidden"]
        else:
            alive = kept["branches"][layer][0 if ".self_attn." in name else 1]
        raw = c.raw.view(-1)
        dead = torch.randperm(raw.numel(), generator=gen)[:raw.numel() - alive]
        raw[dead] = 0.0
    got = lm.kept_units(sparse, b)
    if got != kept:
        raise AssertionError(f"killed the wrong units: {got} instead of {kept}")
    small = strfx.shrink(sparse.eval(), lm.example(b))
    small.strfx_result = small.strfx_shrink.get("result")  # type: ignore[attr-defined]
    return small


def row_speed(r: dict[str, Any], source: str, dense: nn.Module, dense_row: dict[str, Any], b: lm.Budget,
              meter: lm.SpeedMeter) -> dict[str, Any]:
    variant = r["method"].removesuffix("+rw").removesuffix("-rewind")
    t0 = time.perf_counter()
    small = shaped_like(dense, r["kept"], b, depth=variant == "str-all")
    out: dict[str, Any] = {"method": r["method"], "target": r["target"], "source": source, "kept": r["kept"],
                           "shrink": small.strfx_result, "params": lm.params(small), "flops": lm.flops(small, b)}
    out["recorded"] = {"params": r["params"], "flops": r["flops"], "speedup": r.get("speedup")}
    if (out["params"], out["flops"]) != (r["params"], r["flops"]):
        raise AssertionError(f"{r['method']} @{r['target']}: rebuilt {out['params']:,} params / {out['flops']:,} FLOPs, "
                             f"the run recorded {r['params']:,} / {r['flops']:,}")
    out["flops_removed"] = 1 - out["flops"] / dense_row["flops"]
    out.update(meter.pair(small, f"{r['method']}-{r['target']:g}"))
    gain = dense_row["flops"] / out["flops"]
    out["flops_gain"] = gain
    out["speedup_per_flops_gain"] = out["speedup"] / gain
    if "ort_speedup" in out:
        out["ort_speedup_per_flops_gain"] = out["ort_speedup"] / gain
    out["wall_s"] = time.perf_counter() - t0
    ort = (f", onnxruntime {out['ort_tokens_s']:.0f} vs {out['ort_dense_tokens_s']:.0f} ({out['ort_speedup']:.2f}×)"
           if "ort_speedup" in out else "")
    print(f"  {r['method']} @{r['target']:g}: FLOPs gain {gain:.2f}×; eager {out['tokens_s']:.0f} vs "
          f"{out['dense_tokens_s']:.0f} tokens/s ({out['speedup']:.2f}×){ort} ({out['wall_s']:.0f}s)", flush=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    env, b, d = res["env"], res["budget"], res["dense"]
    lines = [
        "# Language model: tokens/s of the shrunk models in torch eager and onnxruntime",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/lm_speed.py', *res['argv']])}`  ",
        f"Machine: {env['nproc']} CPUs ({env['cpu']}), shared with other jobs (load average "
        f"{', '.join(f'{x:.2f}' for x in res['loadavg_start'])} at the start, "
        f"{', '.join(f'{x:.2f}' for x in env['loadavg'])} at the end; run at `nice -n 19`); torch {env['torch']}, "
        f"onnxruntime {env['onnxruntime']}, transformers {env['transformers']}, strfx {env['strfx']} (commit "
        f"{env['commit']}), Python {env['python']}; {env['date']}; {env['threads']} thread for torch and for "
        f"onnxruntime (intra-op); seed {res['seed']}; wall time {res['wall_s'] / 60:.1f} min.",
        "",
        f"Models: the shapes recorded by {', '.join(f'`{s}`' for s in res['sources'])} (HF Llama, {b['layers']} "
        f"layers × hidden {b['hidden']}, {b['heads']}/{b['kv_heads']} heads, SwiGLU {b['ffn']}), rebuilt from a "
        "random initialisation by killing the recorded number of units per layer through strfx and shrinking "
        "(speed depends on shapes, not weights); every rebuilt model has exactly the parameters and FLOPs the run "
        f"recorded. Input: {b['batch']}×{b['seq']} tokens (one training batch, prefill). Each model is exported "
        "with `strfx.export` (torch.export → ONNX, verified in onnxruntime) and checked again on the timed batch. "
        f"Timing: median of {res['rounds']} rounds; every round calls dense and shrunk, eager and onnxruntime, "
        "in a rotating order. Gain ratio = speed-up ÷ FLOPs gain (1.0: time falls as fast as FLOPs); FLOPs with "
        "the attention matmuls counted.",
        "",
        f"Dense ({d['params']:,} parameters, {d['flops'] / 1e6:.1f} MFLOPs per window): median over the rows "
        f"{d['tokens_s']:.0f} tokens/s eager, {d['ort_tokens_s']:.0f} tokens/s onnxruntime "
        f"(onnxruntime ÷ eager {d['ort_tokens_s'] / d['tokens_s']:.2f}).",
        "",
        "| method | target | FLOPs removed | FLOPs gain | eager tokens/s (dense) | eager speed-up | ÷ FLOPs gain "
        "| onnxruntime tokens/s (dense) | onnxruntime speed-up | ÷ FLOPs gain | ORT time in softmax + NaN guard¹ "
        "| ORT vs torch max abs err | kept: q heads / neurons per layer, hidden, branches |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| dense | | 0 % | 1.00 | {d['tokens_s']:.0f} | 1.00 | | {d['ort_tokens_s']:.0f} | 1.00 | | "
        f"{_share(d['ort'])} | {d['ort']['timed_max_abs_error']:.1e} | {b['heads']} / {b['ffn']}, {b['hidden']}, "
        f"{2 * b['layers']} |",
    ]
    for r in res["rows"]:
        k = r["kept"]
        label = lm.LABELS.get(r["method"], r["method"]) + (": neurons only" if r["method"] == "tp" else "")
        lines.append(
            f"| {label} | {100 * r['target']:.0f} % | {100 * r['flops_removed']:.1f} % | "
            f"{r['flops_gain']:.2f} | {r['tokens_s']:.0f} ({r['dense_tokens_s']:.0f}) | {r['speedup']:.2f} | "
            f"{r['speedup_per_flops_gain']:.2f} | {r['ort_tokens_s']:.0f} ({r['ort_dense_tokens_s']:.0f}) | "
            f"{r['ort_speedup']:.2f} | {r['ort_speedup_per_flops_gain']:.2f} | {_share(r['ort'])} | "
            f"{r['ort']['timed_max_abs_error']:.1e} | {'-'.join(map(str, k['heads']))} / "
            f"{'-'.join(map(str, k['neurons']))}, {k['hidden']}, {sum(sum(x) for x in k['branches'])} |")
    exporters = sorted({r["ort"]["exporter"] for r in res["rows"]} | {d["ort"]["exporter"]})
    worst = max(r["ort"]["export_max_rel_error"] for r in res["rows"])
    lines += ["", f"Exporter: {', '.join(exporters)}; `strfx.export`'s max relative error over its verification inputs "
              f"≤ {worst:.1e} for every model (dense {d['ort']['export_max_rel_error']:.1e}).", "",
              "¹ Share of onnxruntime's kernel time (its profiler, 3 runs of the timed batch) in the ops "
              f"{', '.join(f'`{o}`' for o in SOFTMAX_OPS)}: the attention's softmax and the NaN guard the exporter puts "
              "after it (`Where(IsNaN(p), 0, p)`), spelled out op by op (opset 18 has no fused attention) and left "
              "out of the FLOPs count; "
              "it scales with query heads × sequence², so removing heads pays more in onnxruntime than removing "
              "neurons or hidden channels.", ""]
    return "\n".join(lines)


def _share(ort: dict[str, Any]) -> str:
    ops = ort.get("ort_op_share")
    return f"{100 * sum(ops.get(o, 0.0) for o in SOFTMAX_OPS):.0f} %" if ops else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", default=RUNS, help="JSON files benchmarks/lm.py wrote")
    ap.add_argument("--out", type=Path, default=DOCS)
    ap.add_argument("--stem", default="lm_speed")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows (a quick look)")
    ap.add_argument("--force", action="store_true", help="overwrite existing outputs")
    ap.add_argument("--replot", type=Path, default=None, help="only rebuild the Markdown from a JSON this wrote")
    args = ap.parse_args(argv)
    if args.replot:
        lm._write((args.out if args.out != DOCS else args.replot.parent) / f"{args.stem}.md",
                  markdown(json.loads(args.replot.read_text())))
        return 0
    missing = [p for p in args.runs if not p.is_file()]
    if missing:
        print(f"{missing[0]}: no such file; pass --runs with JSON files benchmarks/lm.py wrote", file=sys.stderr)
        return 2
    out_json = args.out / f"{args.stem}.json"
    if out_json.exists() and not args.force:
        print(f"{out_json} exists; pass --force to overwrite or --out elsewhere", file=sys.stderr)
        return 2
    runs = [(p, json.loads(p.read_text())) for p in args.runs]
    budgets = {json.dumps({k: v for k, v in r["budget"].items() if k in ("hidden", "layers", "heads", "kv_heads", "ffn",
                                                                         "seq", "batch")}, sort_keys=True)
               for _, r in runs}
    if len(budgets) != 1:
        print("the runs have different model or batch shapes; pass --runs of one configuration", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    import transformers

    t_all = time.perf_counter()
    loadavg_start = os.getloadavg()
    b = lm.Budget(**{k: v for k, v in runs[0][1]["budget"].items() if k in lm.Budget.__dataclass_fields__})
    b.throughput_rounds = args.rounds
    torch.manual_seed(args.seed)
    dense = transformers.LlamaForCausalLM(lm.llama_config(b)).eval()
    dense_row: dict[str, Any] = {"params": lm.params(dense), "flops": lm.flops(dense, b)}
    if dense_row["params"] != runs[0][1]["dense"]["params"]:
        raise AssertionError(f"dense: {dense_row['params']:,} params, the run recorded {runs[0][1]['dense']['params']:,}")
    meter = lm.SpeedMeter(dense, b, args.rounds, args.threads, profile=True)
    dense_row["ort"] = meter.dense_ort[1] if meter.dense_ort else None
    todo = [(p, r) for p, res in runs for r in res["rows"]][:args.limit]
    rows = [row_speed(r, p.name, dense, dense_row, b, meter) for p, r in todo]
    rows.sort(key=lambda r: (r["target"], ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER)))
    dense_row["tokens_s"] = statistics.median(r["dense_tokens_s"] for r in rows)
    dense_row["ort_tokens_s"] = statistics.median(r["ort_dense_tokens_s"] for r in rows)
    res = {"argv": sys.argv[1:] if argv is None else argv, "seed": args.seed, "rounds": args.rounds,
           "sources": [p.name for p in args.runs], "budget": vars(b),
           "dense": dense_row, "rows": rows, "loadavg_start": loadavg_start, "wall_s": time.perf_counter() - t_all,
           "env": environment(**lm.versions())}
    args.out.mkdir(parents=True, exist_ok=True)
    lm._write(out_json, json.dumps(res, indent=1, default=str))
    lm._write(args.out / f"{args.stem}.md", markdown(res))
    print(f"wrote {args.out / (args.stem + '.md')} ({res['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
