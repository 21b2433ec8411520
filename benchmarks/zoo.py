"""The torchvision zoo: sparsify → kill channels → shrink → verify in torch and onnxruntime, for every model.

For every classification builder in ``torchvision.models.list_models(module=torchvision.models)``
(random init, nothing downloaded) this script:

1. builds the model and gives it non-trivial parameters (``strfx.testing.randomize_``), input 1×3×S×S
   with S as small as the model allows (64 px; 224 for ViT/MaxViT, which fix their input size; 96 for
   Inception-v3);
2. times the channel-dependency analysis of strfx (``strfx.surgery.analyze``: trace, shapes on meta
   tensors, channel groups) **side by side with** Torch-Pruning's
   ``DependencyGraph().build_dependency(model, example_inputs)`` on the same model in the same process
   (each after a warm-up on a small net, so one-time initialisation is not counted), at S and again
   at 224 px;
3. ``strfx.sparsify(..., "structured")``, kills a random 30–50 % of the channels of every prunable
   group through the STR parameters (``strfx.testing.kill_channels``), ``strfx.shrink`` (which verifies
   the shrunk model against the masked one in torch), exports it with ``strfx.export`` and compares
   onnxruntime's output with the masked model's;
4. records groups, blocked groups and why, params/FLOPs before → after (before = the dense model),
   max errors, analysis and shrink time, and the peak RSS growth of ``strfx.shrink`` (analysis + cut
   + verification) against the model's own size (read from ``/proc/self/status`` VmHWM after
   resetting it through ``/proc/self/clear_refs``).

Each model runs in its own subprocess with a time limit, so one crash or hang is one row, not the
end of the run; results are appended after every model (``--resume`` continues an interrupted run).
Models whose estimated memory need exceeds what the machine has available are skipped, and say so.

Usage (standalone; torch-pruning is the optional ``bench`` extra: ``pip install -c constraints.txt
torch-pruning``; without it the Torch-Pruning column is empty)::

    python benchmarks/zoo.py                                   # all models → docs/zoo.json + docs/zoo.md
    python benchmarks/zoo.py --models resnet18,swin_t --out /tmp/zoo.json --md /tmp/zoo.md
    python benchmarks/zoo.py --resume                          # skip models already in --out
    python benchmarks/zoo.py --render-only                     # rewrite docs/zoo.md from docs/zoo.json
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "docs" / "zoo.json"
DEFAULT_MD = ROOT / "docs" / "zoo.md"
FRACTION = (0.3, 0.5)
SEED = 0


def input_size(name: str) -> int:
    if name.startswith(("vit_", "maxvit")):
        return 224  # fixed image_size / partition grid
    if name.startswith("inception"):
        return 96  # needs ≥ 75
    return 64


# ----------------------------------------------------------------------------------- one model (worker)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


class _HeapPeak:
    """Peak bytes in use by malloc (glibc ``mallinfo2``: heap + mmapped blocks), sampled every 5 ms.

    RSS growth undercounts when freed pages are reused; this counts what is allocated, whoever frees it.
    """

    def __init__(self) -> None:
        import ctypes
        import threading

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = MallInfo2
            self._info = libc.mallinfo2
        except (OSError, AttributeError):
            self._info = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.base = self.peak = self._used()

    def _used(self) -> int:
        if self._info is None:
            return -1
        i = self._info()
        return int(i.uordblks + i.hblkhd)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._used())

    def __enter__(self) -> "_HeapPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())

    @property
    def extra(self) -> int | None:
        return None if self._info is None else self.peak - self.base


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:240]}" if text else type(err).__name__


def _warm_up(tp: Any) -> None:
    """Run both analyses once on a small net so first-call costs (imports, caches) are not timed."""
    import torch
    from torch import nn

    from strfx.surgery import analyze

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    analyze(net, (x,))
    if tp is not None:
        tp.DependencyGraph().build_dependency(net, example_inputs=x, verbose=False)


def _reason_kind(reason: str) -> str:
    return re.sub(r"\s*\([^()]*\)$", "", reason)


def run_model(name: str, row: dict[str, Any]) -> dict[str, Any]:
    """Fill ``row`` with everything the zoo records for one model (runs in the worker process)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    import strfx
    from strfx._torchvision import torchvision
    from strfx.export import count_flops, count_params
    from strfx.surgery import analyze
    from strfx.testing import kill_channels, randomize_
    from strfx.verify import max_rel_error

    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
    row.update({"model": name, "status": "failed", "stage": "build"})
    torch.manual_seed(SEED)
    with torch.no_grad():
        model = randomize_(torchvision.models.get_model(name, weights=None).eval(), SEED)
    size = input_size(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(SEED))
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # noqa: BLE001 - too small for this architecture: use the standard size
        size = 224
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(SEED))
    inputs = (x,)
    row["input"] = size
    row["params_before"] = count_params(model)
    row["model_bytes"] = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    row["flops_before"] = count_flops(model, inputs)
    _warm_up(tp)

    row["stage"] = "analysis"
    t0 = time.perf_counter()
    _, analysis = analyze(model, inputs)  # trace, shapes on meta tensors, channel rules and groups
    row["analysis_s"] = time.perf_counter() - t0
    groups = analysis.groups
    row["groups"] = len(groups)
    row["prunable_groups"] = sum(g.prunable for g in groups)
    row["blocked_groups"] = sum(not g.prunable for g in groups)
    row["channels"] = sum(g.channels for g in groups)
    reasons = collections.Counter(_reason_kind(r) for g in groups if not g.prunable for r in g.blocked_by[:1])
    row["blocked_why"] = dict(reasons.most_common())
    row["unknown_ops"] = analysis.unknown_ops
    del analysis

    if tp is not None:
        try:
            t0 = time.perf_counter()
            tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
            row["tp_analysis_s"] = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - Torch-Pruning's failure is a result, not a crash
            row["tp_error"] = _first_line(err)
    if size != 224:  # the same two analyses at the standard 224 px (strfx's cost does not depend on it)
        x224 = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(SEED))
        t0 = time.perf_counter()
        analyze(model, (x224,))
        row["analysis_224_s"] = time.perf_counter() - t0
        if tp is not None and "tp_error" not in row:
            t0 = time.perf_counter()
            tp.DependencyGraph().build_dependency(model, example_inputs=x224, verbose=False)
            row["tp_analysis_224_s"] = time.perf_counter() - t0
    else:
        row["analysis_224_s"] = row["analysis_s"]
        if "tp_analysis_s" in row:
            row["tp_analysis_224_s"] = row["tp_analysis_s"]

    row["stage"] = "sparsify"
    masked = strfx.sparsify(model, "structured", example_inputs=inputs)
    del model
    row["stage"] = "kill"
    row["killed"] = kill_channels(masked, FRACTION, seed=SEED)
    masked.eval()

    row["stage"] = "shrink"
    base = _rss_kib("VmRSS")
    reset = _reset_peak()
    with _HeapPeak() as heap:
        shrunk = strfx.shrink(masked, inputs)
    peak = _rss_kib("VmHWM")
    if heap.extra is not None:
        row["shrink_peak_alloc_extra_bytes"] = heap.extra
    if reset and base > 0 and peak > 0:
        row["shrink_peak_extra_bytes"] = (peak - base) * 1024
    rep = shrunk.strfx_shrink
    row["shrink_analysis_s"] = rep["analysis_s"]
    row["shrink_s"] = rep["shrink_s"]
    row["channels_removed"] = rep["channels_removed"]
    row["max_error_torch"] = rep["max_error"]
    row["params_after"] = count_params(shrunk)
    row["flops_after"] = count_flops(shrunk, inputs)

    row["stage"] = "onnx"
    with tempfile.TemporaryDirectory(prefix="strfx-zoo-") as d:
        t0 = time.perf_counter()
        exp = strfx.export(shrunk, Path(d) / "m.onnx", inputs, repeats=1)
        row["export_s"] = time.perf_counter() - t0
        row["exporter"] = exp.exporter
        row["onnx_bytes"] = exp.onnx_bytes
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(Path(d) / "m.onnx"), opts, providers=["CPUExecutionProvider"])
        fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(SEED + 1))
        errs = []
        for xi in (x, fresh):  # the ORT model against the masked (un-shrunk) torch model
            out = sess.run(None, {sess.get_inputs()[0].name: xi.numpy()})
            with torch.no_grad():
                expected = masked(xi)
            errs.append(max_rel_error([torch.from_numpy(np.asarray(o)) for o in out],
                                      list(torch.utils._pytree.tree_leaves(expected))))
        row["max_error_ort"] = max(errs)
    ok = row["max_error_torch"] <= strfx.api.TOLERANCE and row["max_error_ort"] <= strfx.api.TOLERANCE
    dropped = row["params_after"] < row["params_before"]
    row["status"] = "ok" if ok and dropped else ("no params removed" if ok else "mismatch")
    row.pop("stage")
    return row


def worker(name: str, out: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    row: dict[str, Any] = {"model": name}
    try:
        run_model(name, row)
    except Exception as err:  # noqa: BLE001 - recorded as this model's result
        row.update(status="failed", error=f"in {row.get('stage', '?')}: {_first_line(err)}",
                   trace=traceback.format_exc(limit=-3)[-1500:])
    Path(out).write_text(json.dumps(row))


# -------------------------------------------------------------------------------------------- driver


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


@functools.lru_cache(maxsize=None)
def _param_bytes_on_meta(name: str) -> int:
    """fp32 parameter bytes without building the model: the weights' metadata (no download), else a meta build."""
    import torch

    from strfx._torchvision import torchvision

    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]) * 4
    except Exception:  # noqa: BLE001 - no published weights: count on the meta device
        with torch.device("meta"):
            m = torchvision.models.get_model(name, weights=None)
        return sum(p.numel() * 4 for p in m.parameters())


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch

    from strfx._torchvision import torchvision

    v = {"torch": torch.__version__, "torchvision": torchvision.__version__, "onnxruntime": onnxruntime.__version__,
         "python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    try:
        v["torch_pruning"] = version("torch-pruning")
    except PackageNotFoundError:
        v["torch_pruning"] = "not installed"
    return v


def _fmt_int(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v / 1e6:,.2f}M" if v >= 1e5 else f"{v:,}"


def _fmt_s(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}"


def _fmt_e(v: Any) -> str:
    return "–" if v is None else f"{v:.1e}"


def _peak(r: dict[str, Any]) -> int | None:
    """Peak extra memory of strfx.shrink: allocated bytes when measured, else RSS growth."""
    return r.get("shrink_peak_alloc_extra_bytes") or r.get("shrink_peak_extra_bytes")


def render_markdown(data: dict[str, Any]) -> str:
    rows = data["results"]
    meta = data["meta"]
    n_all = len(meta["all_models"])
    ok = [r for r in rows if r["status"] == "ok"]
    done = {r["model"] for r in rows}
    missing = [m for m in meta["all_models"] if m not in done]
    both = [r for r in rows if r.get("analysis_s") is not None and r.get("tp_analysis_s") is not None]
    s_sum = sum(r["analysis_s"] for r in both)
    tp_sum = sum(r["tp_analysis_s"] for r in both)
    tp_fail = [r for r in rows if r.get("tp_error")]
    lines = [
        "# The torchvision zoo: shrink and verify every classification model",
        "",
        "Generated by `python benchmarks/zoo.py` (see its docstring); do not edit by hand.",
        "",
    ]
    if missing:
        lines += [f"> **Partial run: {len(rows)} of {n_all} models measured.** Not measured yet: "
                  f"{', '.join(missing)}. Run `python benchmarks/zoo.py --resume` to complete it.", ""]
    lines += [
        f"- Date: {meta['date']}; strfx commit {meta.get('commit', 'unknown')}; machine: {meta['machine']}; torch threads per model: {meta['threads']}.",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.",
        *([f"- Note: {meta['note']}."] if meta.get("note") else []),
        f"- Recipe: random init + `strfx.testing.randomize_`, `sparsify(structured)`, kill a random "
        f"{int(FRACTION[0] * 100)}–{int(FRACTION[1] * 100)}% of the channels of every prunable group, `shrink` "
        "(verified vs the masked model on the example and 2 random inputs), `export` to ONNX, onnxruntime vs the "
        f"masked model on the example and a fresh input. Tolerance: max relative error ≤ 1e-4. Seed "
        f"{meta.get('seed', SEED)} (weights, inputs, killed channels).",
        f"- **{len(ok)}/{n_all}** models shrunk with fewer parameters and max error ≤ 1e-4 in torch and onnxruntime"
        + (f" ({len(rows) - len(ok)} of the measured ones did not: see the status column)." if len(rows) > len(ok) else "."),
    ]
    if both:
        both224 = [r for r in both if r.get("analysis_224_s") is not None and r.get("tp_analysis_224_s") is not None]
        s224, tp224 = sum(r["analysis_224_s"] for r in both224), sum(r["tp_analysis_224_s"] for r in both224)
        lines.append(
            f"- Dependency analysis, same models, same run ({len(both)} models both tools analysed), at the input "
            f"size of this table: strfx `analyze` {s_sum:.1f} s vs Torch-Pruning `build_dependency` {tp_sum:.1f} s "
            f"— strfx takes **{s_sum / tp_sum:.2f}×** Torch-Pruning's time (target ≤ 0.33×); per model the median "
            f"ratio is {statistics.median(r['analysis_s'] / r['tp_analysis_s'] for r in both):.2f}×. "
            + (f"At the standard 224 px input: strfx {s224:.1f} s vs Torch-Pruning {tp224:.1f} s = "
               f"**{s224 / tp224:.2f}×** ({len(both224)} models). " if both224 and tp224 else "")
            + "strfx's time is torch.fx tracing, shapes on meta tensors (no data) and the channel rules, which "
            "read each weight once to find all-zero filters; none of it grows with the input. Torch-Pruning's "
            "is one real forward pass with hooks on the live model, so it does.")
    if tp_fail:
        lines.append(f"- Torch-Pruning's `build_dependency` raised on {len(tp_fail)} models: "
                     + ", ".join(f"{r['model']}" for r in tp_fail) + ".")
    vit = next((r for r in rows if r["model"] == "vit_l_16" and _peak(r)), None)
    if vit:
        rss = vit.get("shrink_peak_extra_bytes")
        rss_txt = (f"; by peak RSS growth (VmHWM, undercounts reused pages) {rss / 2**20:,.0f} MiB = "
                   f"{rss / vit['model_bytes']:.2f}×" if rss and vit.get("shrink_peak_alloc_extra_bytes") else "")
        lines.append(
            f"- Peak memory of analyse+shrink (`strfx.shrink`: copy, trace, analysis, cut and verification) on "
            f"vit_l_16, beyond the model already in memory: {_peak(vit) / 2**20:,.0f} MiB for a "
            f"{vit['model_bytes'] / 2**20:,.0f} MiB model = **{_peak(vit) / vit['model_bytes']:.2f}×** the model's "
            f"size (target ≤ 1.5×), measured as "
            + ("peak malloc'ed bytes (glibc mallinfo2, sampled every 5 ms)" if vit.get("shrink_peak_alloc_extra_bytes")
               else "peak RSS growth (VmHWM after resetting it)") + f"{rss_txt}.")
    else:
        lines.append("- Peak memory on vit_l_16: not measured in this run.")
    lines += [
        "",
        "| model | input | groups (prunable/blocked) | blocked why | params before → after | FLOPs before → after "
        "| max err torch | max err ORT | strfx analysis s | TP analysis s | at 224 px: strfx / TP s | shrink s "
        "| peak extra / model | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["model"]):
        if "groups" not in r:
            lines.append(f"| {r['model']} | {r.get('input', '–')} | – | – | – | – | – | – | – | – | – | – | – | "
                         f"{r['status']}: {r.get('error', '')[:160].replace('|', '/')} |")
            continue
        why = "; ".join(f"{k} ×{v}" for k, v in list(r["blocked_why"].items())[:3]) or "–"
        if len(r["blocked_why"]) > 3:
            why += f"; +{len(r['blocked_why']) - 3} more"
        peak = f"{_peak(r) / r['model_bytes']:.2f}×" if _peak(r) else "–"
        tp_cell = _fmt_s(r.get("tp_analysis_s")) if not r.get("tp_error") else "error"
        tp224_cell = _fmt_s(r.get("tp_analysis_224_s")) if not r.get("tp_error") else "error"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:160]}"
        lines.append(
            f"| {r['model']} | {r['input']} | {r['groups']} ({r['prunable_groups']}/{r['blocked_groups']}) | "
            f"{why.replace('|', '/')} | {_fmt_int(r.get('params_before'))} → {_fmt_int(r.get('params_after'))} | "
            f"{_fmt_int(r.get('flops_before'))} → {_fmt_int(r.get('flops_after'))} | {_fmt_e(r.get('max_error_torch'))} | "
            f"{_fmt_e(r.get('max_error_ort'))} | {_fmt_s(r.get('analysis_s'))} | {tp_cell} | "
            f"{_fmt_s(r.get('analysis_224_s'))} / {tp224_cell} | "
            f"{_fmt_s((r.get('shrink_analysis_s') or 0) + (r.get('shrink_s') or 0) if 'shrink_s' in r else None)} | "
            f"{peak} | {status.replace('|', '/')} |")
    lines += [
        "",
        "Columns: *groups* are channel groups (channels that must be removed together); *blocked why* counts "
        "blocked groups by the first reason the analysis gives; *params/FLOPs before* are the dense model's; "
        "*max err torch* is the shrunk model vs the masked model, *max err ORT* is onnxruntime running the "
        "exported shrunk model vs the masked torch model; *shrink s* is strfx.shrink's own analysis + cut "
        "(verification excluded); *peak extra / model* is the peak of malloc'ed bytes during `strfx.shrink` beyond "
        "those before it (RSS growth where that was not measured), divided by the size of the model's parameters "
        "and buffers. Small models are dominated by fixed overheads (tracing, activations).",
    ]
    if tp_fail:
        lines += ["", "Torch-Pruning errors:", ""]
        lines += [f"- {r['model']}: `{r['tp_error']}`" for r in tp_fail]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="Comma-separated subset (default: every classification model).")
    ap.add_argument("--out", default=str(DEFAULT_JSON), help="JSON results file.")
    ap.add_argument("--md", default=None, help="Markdown report (default: docs/zoo.md when --out is the default, "
                    "else next to --out).")
    ap.add_argument("--timeout", type=int, default=1800, help="Seconds per model.")
    ap.add_argument("--threads", type=int, default=1, help="torch/onnxruntime threads per model.")
    ap.add_argument("--resume", action="store_true", help="Keep results already in --out and skip those models.")
    ap.add_argument("--render-only", action="store_true", help="Rewrite the markdown from --out; run nothing.")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.worker_out, args.threads)
        return

    from strfx._torchvision import torchvision

    out = Path(args.out)
    md = Path(args.md) if args.md else (DEFAULT_MD if out == DEFAULT_JSON else out.with_suffix(".md"))
    if args.render_only:
        _atomic_write(md, render_markdown(json.loads(out.read_text())))
        return
    all_models = sorted(torchvision.models.list_models(module=torchvision.models))
    names = args.models.split(",") if args.models else all_models
    unknown = [n for n in names if n not in all_models]
    if unknown:
        sys.exit(f"error: not torchvision classification models: {', '.join(unknown)}")
    results: list[dict[str, Any]] = []
    if args.resume and out.exists():
        results = [r for r in json.loads(out.read_text())["results"] if r["model"] in names]
    done = {r["model"] for r in results}
    # vit_l_16 first (its peak memory is a headline number), then small models first
    todo = sorted((n for n in names if n not in done), key=lambda n: (n != "vit_l_16", _param_bytes_on_meta(n)))
    commit = os.environ.get("STRFX_COMMIT", "")  # set when running from an exported snapshot without .git
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)", "threads": args.threads,
            "versions": _versions(), "all_models": names, "fraction": FRACTION, "seed": SEED}
    for name in todo:
        need = _param_bytes_on_meta(name) * 5  # model + sparsified copy + shrunk model + ONNX + onnxruntime
        t0 = time.perf_counter()
        if need > _mem_available():
            row = {"model": name, "status": "skipped",
                   "error": f"needs ~{need / 2**30:.1f} GiB, {_mem_available() / 2**30:.1f} GiB available"}
        else:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                tmp = f.name
            try:
                proc = subprocess.run([sys.executable, __file__, "--worker", name, "--worker-out", tmp,
                                       "--threads", str(args.threads)], capture_output=True, text=True,
                                      timeout=args.timeout)
                text = Path(tmp).read_text()
                row = json.loads(text) if text else {
                    "model": name, "status": "failed",
                    "error": f"worker exited {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:200]}"}
            except subprocess.TimeoutExpired:
                row = {"model": name, "status": "timeout", "error": f"over {args.timeout} s"}
            finally:
                Path(tmp).unlink(missing_ok=True)
        row["wall_s"] = time.perf_counter() - t0
        results.append(row)
        print(f"{name:24s} {row['status']:8s} {row['wall_s']:7.1f}s  "
              f"params {_fmt_int(row.get('params_before'))} → {_fmt_int(row.get('params_after'))}  "
              f"err torch {_fmt_e(row.get('max_error_torch'))} ORT {_fmt_e(row.get('max_error_ort'))}  "
              f"analysis strfx {_fmt_s(row.get('analysis_s'))} TP {_fmt_s(row.get('tp_analysis_s'))}  "
              f"{row.get('error', '')[:120]}", flush=True)
        data = {"meta": meta, "results": results}
        _atomic_write(out, json.dumps(data, indent=1))
        _atomic_write(md, render_markdown(data))


if __name__ == "__main__":
    main()
