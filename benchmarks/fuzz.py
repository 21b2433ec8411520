"""Fuzz strfx.shrink on random DAG CNNs and write docs/fuzz.md.

Each case: build ``strfx.testing.random_cnn(seed, extended=True)`` (residual adds, concat, chunk,
grouped/depthwise conv, shuffle, SE, norms, and the edges: keyword-called hardtanh/threshold/clamp
with non-zero images of 0, sizes computed from ``x.shape``, in-place ops through views, pad modules on
the channel dim, InstanceNorm with running stats, BatchNorm γ = 0 constants, non-tensor outputs),
sparsify (structured), kill a random fraction of every prunable group through the STR parameters,
shrink, and compare the shrunk model with the masked one on a fresh verification input set (random,
30·randn, relu(randn)) over the whole output pytree, independently of shrink's own verification;
shrink's own float64 error must be ≤ 1e-9. Outcomes:

* exact            — shrink succeeded and the outputs match (float32 ≤ 1e-4, float64 ≤ 1e-9);
* refused          — shrink raised a StrfxError (a clear, one-line refusal);
* not applicable   — structured STR had nothing to gate (every channel blocked);
* SILENT MISMATCH  — shrink returned a model whose outputs differ (must be 0);
* CRASH            — any other exception (must be 0).

    python benchmarks/fuzz.py                # 10,000 cases
    python benchmarks/fuzz.py -n 500 --workers 2 --out /tmp/fuzz.md
    python benchmarks/fuzz.py --resume       # continue: seeds already in docs/fuzz.partial.jsonl are kept

Every case is appended to a JSON-lines log (``--log``, default docs/fuzz.partial.jsonl, with the commit it ran
on) as it finishes, so a long run can stop and continue (``--resume``) on the same or another machine; the
report counts every case in the log and names the commits and the wall time of each run.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402


def _own_rounding(model: torch.nn.Module, inputs: tuple[Any, ...]) -> float:
    """``model``'s own float32 rounding on ``inputs`` (shrink's rule: a float32 gap within 4× of it that float64
    proves exact is the model's conditioning, not the cut)."""
    import copy

    from strfx.verify import float32_rounding, to_float64

    return float32_rounding(model, to_float64(copy.deepcopy(model)), inputs) or 0.0


def _float64_cut_error(masked: torch.nn.Module, example: tuple[Any, ...], inputs: tuple[Any, ...]) -> float:
    """The float64 criterion on one input: shrink a float64 copy of the masked model (so every folded or cut value
    is computed in float64, not float32 values cast up) and compare it with that copy on ``inputs`` in float64."""
    import copy

    import strfx
    from strfx.verify import compare_outputs, to_float64

    def up(ts: tuple[Any, ...]) -> list[Any]:
        return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in ts]

    m64 = to_float64(copy.deepcopy(masked)).eval()
    small64 = strfx.shrink(m64, tuple(up(example)))
    cmp = compare_outputs(small64(*up(inputs)), m64(*up(inputs)))
    return float("inf") if cmp.reason is not None else cmp.error


def run_case(seed: int) -> dict[str, Any]:
    import random

    import strfx
    from strfx.errors import NothingToSparsifyError, StrfxError
    from strfx.testing import kill_channels, random_cnn
    from strfx.verify import compare_outputs, verification_inputs

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    fraction = random.Random(seed ^ 0x5EED).uniform(0.1, 0.9)
    out: dict[str, Any] = {"seed": seed}
    try:
        model, x = random_cnn(seed, extended=True)
        try:
            s = strfx.sparsify(model, "structured", example_inputs=x)
        except NothingToSparsifyError:
            return {**out, "outcome": "not applicable", "s": time.perf_counter() - t0}
        kill_channels(s, fraction, seed=seed)
        small = strfx.shrink(s)
        rep = small.strfx_shrink
        err, why = 0.0, None
        ill = 0
        with torch.no_grad():
            s.eval()  # the shrunk model is already in eval mode (an exported graph cannot switch modes)
            for inp in verification_inputs(x, seed=seed + 1)[1:]:
                cmp = compare_outputs(small(*[t.clone() for t in inp.inputs]), s(*[t.clone() for t in inp.inputs]))
                if cmp.reason is None and cmp.error > 1e-4 and (
                        cmp.error <= 4 * _own_rounding(s, inp.inputs)
                        or _float64_cut_error(s, x, tuple(t.clone() for t in inp.inputs)) <= 1e-9):
                    # the masked model's own float32 rounding there is as large, or the same cut made in float64
                    # agrees on this input to float64 rounding: conditioning, not the cut (issue 10's criterion)
                    ill += 1
                elif cmp.reason is not None or cmp.error > 1e-4:
                    why = f"{inp.kind}: {cmp.reason or f'{cmp.error:.2e}'} at {cmp.leaf}"
                    break
                err = max(err, cmp.error)
        if why is None and (rep["max_error64"] or 0.0) > 1e-9:
            why = f"float64 error {rep['max_error64']:.2e}"
        if why is not None:
            return {**out, "outcome": "SILENT MISMATCH", "why": why, "s": time.perf_counter() - t0}
        return {**out, "outcome": "exact", "err": err, "err64": rep["max_error64"], "ill": ill, "before": rep["params_before"],
                "after": rep["params_after"], "removed": rep["channels_removed"],
                "folded": rep.get("constant_channels_folded", 0), "result": rep["result"], "s": time.perf_counter() - t0}
    except StrfxError as err:
        why = str(err).split(":")[0][:120]
        if "the cut is exact" in str(err):
            why += " (exact in float64: float32 rounding in an ill-conditioned op)"
        return {**out, "outcome": "refused", "why": why, "s": time.perf_counter() - t0}
    except Exception as err:  # noqa: BLE001 - every crash is counted and reported
        return {**out, "outcome": "CRASH", "why": f"{type(err).__name__}: {str(err)[:160]}", "s": time.perf_counter() - t0}


def render(results: list[dict[str, Any]], wall: float, workers: int, requested: int | None = None,
           note: str = "", runs: list[dict[str, Any]] | None = None) -> str:
    counts = collections.Counter(r["outcome"] for r in results)
    exact = [r for r in results if r["outcome"] == "exact"]
    shrunk = [r for r in exact if r["after"] < r["before"]]
    ratio = sum(r["after"] / r["before"] for r in exact) / max(len(exact), 1)
    worst = max((r["err"] for r in exact), default=0.0)
    worst64 = max((r["err64"] or 0.0 for r in exact), default=0.0)
    folded = sum(r.get("folded", 0) for r in exact)
    exported = sum(r.get("result") == "exported" for r in exact)
    env = environment()
    lines = [
        "# strfx fuzz: shrink on random DAG CNNs",
        "",
        "Generated by `python benchmarks/fuzz.py` (do not edit by hand). Each case builds a random CNN "
        "(`strfx.testing.random_cnn(seed, extended=True)`: residual adds, mul, concat, chunk, depthwise/grouped conv, "
        "channel shuffle, SE, GroupNorm, InstanceNorm with running stats, channels-last LayerNorm+MLP, keyword-called "
        "hardtanh/threshold/clamp with non-zero images of 0, `layer_norm(x, x.shape[1:])` and `x / x.shape[1]`, "
        "in-place ops through views, pad modules on the channel dim, BatchNorm channels with γ = 0 and β ≠ 0, "
        "tensor / (tensor, int) / dict outputs, flatten→linear or pooled head), sparsifies it (structured), kills a "
        "random 10–90% of every prunable channel group through the STR parameters, shrinks it and compares the shrunk "
        "model with the masked model on a fresh random, large-magnitude (30·randn) and non-negative input over the whole "
        "output pytree (float32, ≤ 1e-4; a larger float32 gap counts as exact only if it is within 4× of the masked "
        "model's own float32 rounding on that input, shrink's rule, or the same cut made on a float64 copy agrees with "
        "it on that input to ≤ 1e-9, issue 10's float64 criterion) — independently of shrink's own verification — "
        "and requires shrink's own float64 error to be ≤ 1e-9.",
        "",
        *([note, ""] if note else []),
        f"- cases: **{len(results):,}** (seeds {min(r['seed'] for r in results)}–{max(r['seed'] for r in results)})"
        + (f" — stopped by the time budget after {len(results):,} of {requested:,} requested"
           if requested and len(results) < requested else ""),
        f"- exact: **{counts['exact']:,}** (max relative error over all of them: {worst:.2e} float32, "
        f"{worst64:.2e} float64; {exported:,} returned as the exported graph; {folded:,} constant channels folded)",
        f"- clear refusals (StrfxError): **{counts['refused']:,}**",
        f"- not applicable (nothing to gate: every channel blocked): {counts['not applicable']:,}",
        f"- **silent mismatches: {counts['SILENT MISMATCH']}**",
        f"- crashes: **{counts['CRASH']}**",
        f"- exact cases whose parameter count dropped: {len(shrunk):,}; mean params after/before: {ratio:.3f}",
        f"- exact cases with a float32 gap > 1e-4 that float64 shows is the model's conditioning (within 4× of its own "
        f"float32 rounding, or the cut made in float64 exact on that input): {sum(bool(r.get('ill')) for r in exact):,}",
        f"- wall time {wall:.0f} s on {workers} worker(s), {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}; finished {env['date']}, strfx commit {env['commit']}, {env['nproc']} CPUs "
        f"(load average at the end {env['loadavg'][0]:.1f})",
        "",
    ]
    if runs and len(runs) > 1:
        lines[-2] = f"- {len(runs)} runs continued from one log (`--resume`); the wall time above is the last run's"
        lines += ["| run | cases | seeds | strfx commit | finished | wall s | workers | load at end |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, run in enumerate(runs, 1):
            lines.append(f"| {i} | {run['cases']:,} | {run['seeds']} | {run['commit']} | {run['date']} | "
                         f"{run['wall']:.0f} | {run['workers']} | {run['load']:.1f} |")
        lines.append("")
    bad = [r for r in results if r["outcome"] in ("refused", "SILENT MISMATCH", "CRASH")]
    if bad:
        lines += ["## Cases that were not exact", "", "| seed | outcome | detail |", "|---|---|---|"]
        for r in bad[:50]:
            lines.append(f"| {r['seed']} | {r['outcome']} | {r.get('why', r.get('err', ''))} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10_000, help="number of cases (default 10,000)")
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "fuzz.md"))
    ap.add_argument("--note", default="", help="a paragraph to put under the title (e.g. why a run is short)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="stop after this many seconds and report the cases done (the report says so)")
    ap.add_argument("--log", default=str(Path(__file__).resolve().parent.parent / "docs" / "fuzz.partial.jsonl"),
                    help="JSON-lines log every case is appended to (default docs/fuzz.partial.jsonl)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the cases already in --log and run only the missing seeds")
    args = ap.parse_args()
    from strfx.rundir import atomic_write

    log = Path(args.log)
    results: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    if args.resume and log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            (runs if "run" in rec else results).append(rec.get("run", rec))
    elif log.exists():
        log.unlink()  # a fresh run starts a fresh log
    done = {r["seed"] for r in results}
    seeds = [s for s in range(args.start, args.start + args.n) if s not in done]
    commit = environment()["commit"]
    print(f"{len(done):,} cases from the log, {len(seeds):,} to run", flush=True)
    t0 = time.perf_counter()
    first = len(results)
    log.parent.mkdir(parents=True, exist_ok=True)
    logf = log.open("a")

    def progress(i: int) -> bool:
        """Log the case; print and save the report every 500 cases; False once the time budget is spent."""
        logf.write(json.dumps({**results[-1], "commit": commit}) + "\n")
        logf.flush()
        if (i + 1) % 500 == 0:
            print(f"{i + 1}/{len(seeds)} {collections.Counter(x['outcome'] for x in results)}", flush=True)
            atomic_write(args.out, render(sorted(results, key=lambda r: r["seed"]), time.perf_counter() - t0,
                                          args.workers, args.n, args.note))
        return args.time_budget is None or time.perf_counter() - t0 < args.time_budget

    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            for i, r in enumerate(pool.imap(run_case, seeds, chunksize=4)):
                results.append(r)
                if not progress(i):
                    pool.terminate()
                    break
    else:
        for i, seed in enumerate(seeds):
            results.append(run_case(seed))
            if not progress(i):
                break
    wall = time.perf_counter() - t0
    mine = results[first:]
    if mine:
        env = environment()
        runs.append({"cases": len(mine), "seeds": f"{min(r['seed'] for r in mine)}–{max(r['seed'] for r in mine)}",
                     "commit": commit, "date": env["date"], "wall": wall, "workers": args.workers,
                     "load": env["loadavg"][0]})
        logf.write(json.dumps({"run": runs[-1]}) + "\n")
    logf.close()
    results.sort(key=lambda r: r["seed"])
    text = render(results, wall, args.workers, args.n, args.note, runs)
    atomic_write(args.out, text)
    print(text)
    counts = collections.Counter(r["outcome"] for r in results)
    return 1 if counts["SILENT MISMATCH"] or counts["CRASH"] else 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    sys.exit(main())
