"""Export a (shrunk) model to ONNX and to a ``torch.export`` program, and prove both compute the same.

Every file written here has been run and compared with torch before it appears under its final name:

* ONNX: checked with ``onnx.checker``, run in onnxruntime (CPUExecutionProvider) on the input set of
  :func:`strfx.verify.verification_inputs` (the example, randn, 30·randn, relu(randn)) and, with a
  dynamic batch, at a second batch size; every output leaf is compared with torch's (structure,
  non-finite pattern, max relative error ≤ :data:`strfx.verify.TOLERANCE`). A disagreement is a refusal
  naming the first differing output and the input kind. The example input alone is not enough: the
  TorchScript exporter writes ``F.logsigmoid`` as ``Log(Sigmoid(x))``, which is −inf below about −88,
  so an export that agrees on the example gives non-finite outputs on large inputs.
* ``.pt2``: ``torch.export.save`` of the model's program, reloaded with ``torch.export.load`` — which
  needs neither the model's source code nor strfx — and run again on the same inputs.

The batch dimension (dim 0 of every tensor input) is dynamic by default: the model is captured once with
``torch.export`` and ``Dim.AUTO`` on dim 0 (at batch 2 when the example has batch 1, which torch.export
would specialise), and the same program is written as ``.pt2`` and converted to ONNX. Where the model
fixes its batch size (a ``view(2, -1)``), the dim stays static and the report says so.

Which ONNX exporter: the torch.export-based one (``dynamo=True``, onnxscript; the default since torch 2.9,
the TorchScript exporter is deprecated) goes first; it takes the captured ``ExportedProgram`` directly
and writes external data for models over the 2 GiB protobuf limit. The TorchScript exporter is the
fallback, and the report's ``exporter`` field and notes say when it was used and why. The price is
time: measured on a 2-core machine at one thread, a whole verified export (capture, conversion, the
onnxruntime and .pt2 checks, timing) takes 3.4 s for LeNet-5, 5.7 s for ResNet-20 and 14 s for
torchvision's ResNet-18 at 64 px, all three with a dynamic batch; with the TorchScript exporter first it
was about 3× faster (ShuffleNetV2 x0.5 with a reference: 12 s against 34 s).

Files are written under a temporary name next to the target and renamed only after verification, so a
failed export leaves nothing behind; an existing file is replaced only with ``force=True``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.utils._pytree import tree_leaves
from strfx.flops import FlopCounterMode, parametrizations_precomputed

from strfx.errors import ExportError, StrfxError, VerificationError, first_line
from strfx.rundir import check_writable
from strfx.verify import (TOLERANCE, InputSet, clone_inputs, compare_outputs, eval_mode, max_rel_error,
                          verification_inputs)

Exporter = Literal["torchscript", "dynamo"]
ONNX_OPSET = 18
# Above this many parameter bytes the ONNX protobuf (2 GiB limit) needs an external data file.
_EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB


class ExportMismatchError(ExportError, VerificationError):
    """onnxruntime or the reloaded program computes something else than torch: nothing is written."""


class Latency(BaseModel):
    """Wall time of one forward over timed runs after warm-up."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


class ModelStats(BaseModel):
    """Size and speed of one model on the example inputs."""

    params: int = Field(description="Parameters (STR thresholds excluded).")
    flops: int | None = Field(None, description="FLOPs of one forward (torch.utils.flop_counter).")
    torch_latency_ms: float | None = Field(None, description="Median wall time of one forward in torch.")
    ort_latency_ms: float | None = Field(None, description="Median wall time of one run in onnxruntime.")
    torch_latency: Latency | None = Field(None, description="torch: median and p10–p90 spread.")
    ort_latency: Latency | None = Field(None, description="onnxruntime: median and p10–p90 spread.")


class ExportReport(BaseModel):
    """What was exported, how big it is, how exactly it matches torch and how fast it runs."""

    onnx_path: str
    onnx_bytes: int = Field(description="Size of the .onnx file plus its external data, if any.")
    exporter: Exporter = Field(description="The torch.onnx exporter that produced the file.")
    opset: int
    pt2_path: str | None = None
    pt2_bytes: int | None = None
    input_shapes: list[list[int]]
    dynamic_dims: dict[str, list[int]] = Field(
        default_factory=dict, description="Input name → its dynamic dims (in the .onnx and the .pt2).")
    batch_sizes: list[int] = Field(default_factory=list, description="Batch sizes onnxruntime and the .pt2 were checked at.")
    checked_inputs: list[str] = Field(default_factory=list, description="Input kinds onnxruntime and the .pt2 were checked on.")
    tolerance: float = TOLERANCE
    onnx_max_error: float = Field(description="onnxruntime vs torch, max relative error over all checked inputs.")
    pt2_max_error: float | None = Field(None, description="Reloaded .pt2 program vs torch, max relative error.")
    reference_max_error: float | None = Field(None, description="Exported model vs the reference model (torch).")
    model: ModelStats = Field(description="The exported model (after).")
    reference: ModelStats | None = Field(None, description="The reference (un-shrunk) model (before), if given.")
    threads: int = Field(description="Threads used by torch and onnxruntime (intra-op) for the latency numbers.")
    repeats: int = Field(description="Timed runs per latency (after warm-up).")
    metadata: dict[str, str] = Field(default_factory=dict, description="Written into the ONNX metadata_props.")
    notes: list[str] = Field(default_factory=list, description="One line per fallback taken (static batch, exporter).")

    def table(self, title: str = "strfx export") -> Any:
        """A rich Table: before → after when a reference was given."""
        from rich.table import Table

        t = Table(title=title)
        t.add_column("")
        if self.reference is not None:
            t.add_column("before", justify="right")
        t.add_column("after" if self.reference is not None else "model", justify="right")

        def row(label: str, get: Callable[[ModelStats], Any], fmt: Callable[[Any], str]) -> None:
            cells = [self.reference, self.model] if self.reference is not None else [self.model]
            t.add_row(label, *[fmt(get(c)) if get(c) is not None else "-" for c in cells])

        def lat(v: Latency | float) -> str:
            if isinstance(v, Latency):
                return f"{v.median_ms:.3g} ms ({v.p10_ms:.3g}–{v.p90_ms:.3g})"
            return f"{v:.3g} ms"

        row("params", lambda s: s.params, lambda v: f"{v:,}")
        row("FLOPs", lambda s: s.flops, lambda v: f"{v / 1e6:,.2f}M")
        row("torch latency", lambda s: s.torch_latency or s.torch_latency_ms, lat)
        row("onnxruntime latency", lambda s: s.ort_latency or s.ort_latency_ms, lat)
        return t

    def summary(self) -> str:
        """The numeric checks, the shapes and the files, one line each (printed under the table)."""
        checks = [f"ORT vs torch {self.onnx_max_error:.2g}"]
        if self.pt2_max_error is not None:
            checks.append(f"pt2 vs torch {self.pt2_max_error:.2g}")
        if self.reference_max_error is not None:
            checks.append(f"vs reference {self.reference_max_error:.2g}")
        kinds = [k.removesuffix(" input").replace(" input with zeros", "") for k in self.checked_inputs
                 if " at batch " not in k]
        on = f" on the {', '.join(kinds[:-1])} and {kinds[-1]} inputs" if len(kinds) > 1 else ""
        if self.batch_sizes:
            on += f", at batch {' and '.join(map(str, self.batch_sizes))}"
        dyn = ", ".join(f"{k} dim {', '.join(map(str, v))}" for k, v in self.dynamic_dims.items()) or "none (static shapes)"
        files = [f"{self.onnx_path} ({self.onnx_bytes / 1e6:.2f} MB, {self.exporter} exporter)"]
        if self.pt2_path:
            files.append(f"{self.pt2_path} ({(self.pt2_bytes or 0) / 1e6:.2f} MB)")
        lines = [f"max relative error (≤ {self.tolerance:g}): {', '.join(checks)}{on}",
                 f"dynamic dims: {dyn}; latency: median (p10–p90) of {self.repeats} runs, {self.threads} thread(s)",
                 *[f"note: {n}" for n in self.notes],
                 *([f"input (in the ONNX metadata): {self.metadata['strfx.preprocessing']}"]
                   if "strfx.preprocessing" in self.metadata else []),
                 f"wrote {'; '.join(files)}"]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- helpers


def _as_inputs(model: Any, example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if example_inputs is None:
        meta = getattr(model, "_strfx", None)
        if isinstance(meta, dict) and meta.get("example_inputs") is not None:
            example_inputs = meta["example_inputs"]
        elif isinstance(model, torch.export.ExportedProgram) and model.example_inputs is not None:
            example_inputs = model.example_inputs[0]
    if example_inputs is None:
        raise StrfxError("export needs example inputs: pass example_inputs=(tensor, ...)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise StrfxError("export's example_inputs must be a tensor or a tuple of tensors")
    return inputs


def _runnable(model: nn.Module | torch.export.ExportedProgram) -> nn.Module:
    return model.module() if isinstance(model, torch.export.ExportedProgram) else model


def count_params(model: nn.Module | torch.export.ExportedProgram) -> int:
    """Parameters a deployed model (or exported program) computes with, as :func:`strfx.report.count_params`."""
    from strfx.report import count_params as count

    return count(_runnable(model))


@torch.no_grad()
def count_flops(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    counter = FlopCounterMode(display=False)
    if isinstance(model, nn.Module):
        with parametrizations_precomputed(model), counter:
            model(*inputs)
    else:
        with counter:
            model(*inputs)
    return int(counter.get_total_flops())


def measure_latency(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> Latency:
    """Median and p10–p90 of ``repeats`` timed calls after ``warmup`` untimed ones (first calls allocate,
    compile kernels and fill caches; one slow call must not become the reported number)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if len(times) == 1:
        return Latency(median_ms=times[0], p10_ms=times[0], p90_ms=times[0], runs=1)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return Latency(median_ms=statistics.median(times), p10_ms=q[0], p90_ms=q[-1], runs=len(times))



def _quiet() -> contextlib.AbstractContextManager[None]:
    """The exporters print progress and warn about every traced branch; strfx reports what matters."""
    from strfx.passes.capture import quiet

    return quiet()


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A temporary folder next to ``target``; removed whatever happens (its files are moved out on success)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(staged: Path, target: Path) -> None:
    """Move every file of ``staged`` next to ``target`` (the .onnx and its external data) by rename."""
    for f in sorted(staged.iterdir(), key=lambda p: p.name == target.name):  # main file last
        os.replace(f, target.parent / f.name)


# ------------------------------------------------------------------------------ capture, dynamic batch


class _Capture(BaseModel, arbitrary_types_allowed=True):
    program: torch.export.ExportedProgram | None
    dynamic_dims: dict[str, list[int]]
    input_names: list[str]
    notes: list[str]


def _with_batch(inputs: tuple[torch.Tensor, ...], batch: int, which: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """``inputs`` with dim 0 of the inputs in ``which`` resized to ``batch`` (rows repeated)."""
    out = []
    for k, x in enumerate(inputs):
        if k in which and x.dim() > 0 and x.shape[0] > 0:
            reps = -(-batch // x.shape[0])
            x = x.repeat(reps, *([1] * (x.dim() - 1)))[:batch].clone()
        out.append(x)
    return tuple(out)


def _user_placeholders(ep: torch.export.ExportedProgram) -> list[Any]:
    user = set(ep.graph_signature.user_inputs)
    return [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]


def _dynamic_of(ep: torch.export.ExportedProgram) -> dict[str, list[int]]:
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    dims: dict[str, list[int]] = {}
    for n in _user_placeholders(ep):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            dyn = [d for d, s in enumerate(val.shape) if not is_concrete_int(s)]  # a specialised SymInt is static
            if dyn:
                dims[n.name] = dyn
    return dims


def _capture(model: nn.Module | torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...],
             dynamic_batch: bool) -> _Capture:
    """One torch.export capture of the model, with a dynamic dim 0 on every tensor input where it allows."""
    from torch.export import Dim

    notes: list[str] = []
    if isinstance(model, torch.export.ExportedProgram):  # its module guards the shapes it was captured with
        dims = _dynamic_of(model)
        if dynamic_batch and not dims:
            notes.append("static shapes: the given ExportedProgram was captured without dynamic dims")
        return _Capture(program=model, dynamic_dims=dims, input_names=[n.name for n in _user_placeholders(model)],
                        notes=notes)
    module = model
    batched = [k for k, x in enumerate(inputs) if x.dim() > 0]
    if dynamic_batch and batched:
        # torch.export specialises a dim whose example size is 0 or 1: capture at batch 2 then
        capture_inputs = _with_batch(inputs, 2, [k for k in batched if inputs[k].shape[0] <= 1])
        spec = tuple({0: Dim.AUTO} if k in batched else None for k in range(len(inputs)))
        try:
            with _quiet():
                ep = torch.export.export(module, capture_inputs, dynamic_shapes=spec)
            dims = _dynamic_of(ep)
            names = [n.name for n in _user_placeholders(ep)]
            static = [names[k] for k in batched if k < len(names) and 0 not in dims.get(names[k], [])]
            if static:
                notes.append(f"static batch for {', '.join(static)}: the model fixes dim 0 of that input")
                if not dims:  # re-capture at the example's own shapes, so the program matches the example
                    with _quiet():
                        ep = torch.export.export(module, inputs)
            return _Capture(program=ep, dynamic_dims=dims, input_names=names, notes=notes)
        except Exception as err:  # noqa: BLE001 - fall back to the static capture below
            notes.append(f"static batch: torch.export could not make dim 0 dynamic ({first_line(err)})")
    try:
        with _quiet():
            ep = torch.export.export(module, inputs)
    except Exception as err:  # noqa: BLE001
        notes.append(f"torch.export could not capture the model ({first_line(err)})")
        return _Capture(program=None, dynamic_dims={}, input_names=[f"input_{k}" for k in range(len(inputs))],
                        notes=notes)
    return _Capture(program=ep, dynamic_dims={}, input_names=[n.name for n in _user_placeholders(ep)], notes=notes)


def _check_sets(inputs: tuple[torch.Tensor, ...], cap: _Capture) -> tuple[list[InputSet], list[int]]:
    """The verification input set, plus a random input at a second batch size when dim 0 is dynamic."""
    sets = verification_inputs(inputs)
    dyn = [k for k, name in enumerate(cap.input_names) if 0 in cap.dynamic_dims.get(name, [])]
    if not dyn:
        return sets, []
    b = int(inputs[dyn[0]].shape[0])
    b2 = b + 1 if b >= 2 else 3
    resized = _with_batch(inputs, b2, dyn)
    sets.append(InputSet(f"random input at batch {b2}", verification_inputs(resized, seed=1)[1].inputs))
    return sets, [b, b2]


# ------------------------------------------------------------------------------------------- ONNX


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """In eval mode nn.MultiheadAttention takes a fused kernel the TorchScript exporter cannot translate."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def _export_torchscript(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, cap: _Capture) -> None:
    names = [f"input_{k}" for k in range(len(inputs))]
    axes = {names[k]: {0: "batch"} for k, n in enumerate(cap.input_names[:len(inputs)])
            if 0 in cap.dynamic_dims.get(n, [])}
    kw: dict[str, Any] = dict(dynamo=False, opset_version=ONNX_OPSET, do_constant_folding=True, input_names=names,
                              dynamic_axes=axes or None)
    with _mha_fastpath_off():
        try:
            with _quiet(), torch.no_grad():
                torch.onnx.export(module, inputs, str(path), **kw)
        except NotImplementedError:
            # The module of an ExportedProgram cannot switch modes, which this exporter insists on: trace it first.
            with _quiet(), torch.no_grad():
                traced = torch.jit.trace(module, inputs, check_trace=False)
                torch.onnx.export(traced, inputs, str(path), **kw)


def _export_dynamo(program: torch.export.ExportedProgram, path: Path, large: bool) -> None:
    with _quiet(), torch.no_grad():
        onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=ONNX_OPSET, verbose=False)
        onnx_program.save(str(path), external_data=large)


def _files_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_feed(sess: Any, inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise ExportError(f"the ONNX graph takes {len(names)} inputs but {len(inputs)} example inputs were given")
    return {n: x.detach().cpu().numpy() for n, x in zip(names, inputs)}


def _ort_compare(outs: list[Any], expected: Any) -> Any:
    """onnxruntime's flat outputs against torch's output pytree (ONNX drops non-tensor leaves, or makes
    them 0-d tensors)."""
    from strfx.verify import Comparison

    leaves = tree_leaves(expected)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    got = [torch.from_numpy(o) for o in outs]
    if len(got) == len(tensors):
        return compare_outputs(got, tensors)
    if len(got) == len(leaves):
        as_tensors = [x if isinstance(x, torch.Tensor) else torch.tensor(x) for x in leaves]
        return compare_outputs([g.to(e.dtype) if g.dim() == 0 else g for g, e in zip(got, as_tensors)], as_tensors)
    return Comparison(error=math.inf, leaf="output",
                      reason=f"onnxruntime returns {len(got)} outputs, torch {len(tensors)} tensors")


def _verify_runs(run: Callable[[tuple[torch.Tensor, ...]], Any], module: nn.Module, sets: list[InputSet],
                 who: str, flat: bool) -> float:
    """Max relative error of ``run`` vs the torch module over ``sets``; ExportMismatchError on the first miss."""
    worst = 0.0
    for s in sets:
        try:
            with torch.no_grad():
                expected = module(*[x.clone() for x in s.inputs])
        except Exception as err:  # noqa: BLE001
            raise ExportError(f"the model itself fails on the {s.kind}: {first_line(err)}") from err
        try:
            got = run(tuple(x.clone() for x in s.inputs))
        except Exception as err:  # noqa: BLE001 - a runtime that fails on an input the model takes
            raise ExportMismatchError(f"{who} fails on the {s.kind}: {first_line(err)}") from err
        c = _ort_compare(got, expected) if flat else compare_outputs(got, expected)
        if not c.ok(TOLERANCE):
            what = c.reason if c.reason is not None else f"{c.leaf} differs, max relative error {c.error:.3g} > {TOLERANCE:g}"
            raise ExportMismatchError(f"{who} differs from torch on the {s.kind}: {what}")
        worst = max(worst, c.error)
    return worst


def _check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as err:  # noqa: BLE001 - onnx raises ValidationError and others
        raise ExportError(f"onnx.checker rejected the exported model: {first_line(err)}") from err


def _set_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)  # external data files stay where they are
    props = {p.key: p.value for p in m.metadata_props}
    props.update(metadata)
    onnx.helper.set_model_props(m, props)
    onnx.save_model(m, str(path))


def _write_onnx(module: nn.Module, cap: _Capture, inputs: tuple[torch.Tensor, ...], staged: Path,
                sets: list[InputSet], threads: int, exporters: Sequence[Exporter],
                metadata: dict[str, str]) -> tuple[Exporter, float, Any, list[str]]:
    """Export with the first exporter whose file passes the checker and matches torch in onnxruntime."""
    large = sum(p.numel() * p.element_size() for p in module.parameters()) > _EXTERNAL_DATA_BYTES
    failures: list[str] = []
    if large:  # only the torch.export-based exporter writes weights beyond the 2 GiB protobuf limit
        exporters = ["dynamo"]
    for exporter in exporters:
        for f in staged.iterdir():
            f.unlink()
        try:
            if exporter == "torchscript":
                _export_torchscript(module, inputs, staged / "model.onnx", cap)
            elif cap.program is None:
                raise ExportError("needs a torch.export capture, which failed")
            else:
                _export_dynamo(cap.program, staged / "model.onnx", large)
            if metadata:
                _set_metadata(staged / "model.onnx", metadata)
            _check_onnx(staged / "model.onnx")
            sess = _ort_session(staged / "model.onnx", threads)
            err = _verify_runs(lambda x: sess.run(None, _ort_feed(sess, x)), module, sets,
                               "onnxruntime", flat=True)
        except ExportMismatchError as e:
            failures.append(f"{exporter} exporter: {e}")
            continue
        except StrfxError as e:
            failures.append(f"{exporter} exporter: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - exporter and runtime failures are many kinds
            failures.append(f"{exporter} exporter: {first_line(e, innermost=True)}")
            continue
        return exporter, err, sess, [f"{f}; used the {exporter} exporter instead" for f in failures]
    mismatch = all(" differs from torch " in f or " fails on the " in f for f in failures)
    cls = ExportMismatchError if mismatch else ExportError
    raise cls("ONNX export refused, nothing written: " + "; ".join(failures))


# -------------------------------------------------------------------------------------------- pt2


def _write_pt2(cap: _Capture, module: nn.Module, staged_file: Path, sets: list[InputSet]) -> float:
    """Save the captured program, reload it from disk and compare the reloaded program with torch."""
    if cap.program is None:
        raise ExportError("cannot write the .pt2: " + (cap.notes[-1] if cap.notes else "torch.export failed"))
    torch.export.save(cap.program, str(staged_file))
    reloaded = torch.export.load(str(staged_file)).module()
    try:
        return _verify_runs(lambda x: reloaded(*x), module, sets, "the reloaded .pt2 program", flat=False)
    except ExportMismatchError as err:
        raise ExportMismatchError(f"{err}; nothing written") from err


# --------------------------------------------------------------------------------------- the API


def _stats(model: nn.Module, inputs: tuple[torch.Tensor, ...], repeats: int, sess: Any = None) -> ModelStats:
    inputs = clone_inputs(inputs)  # the caller's example must survive a model that writes into its input
    with torch.no_grad():
        torch_lat = measure_latency(lambda: model(*inputs), repeats)
    ort_lat = None
    if sess is not None:
        feed = _ort_feed(sess, inputs)
        ort_lat = measure_latency(lambda: sess.run(None, feed), repeats)
    try:
        flops: int | None = count_flops(model, inputs)
    except Exception:  # noqa: BLE001 - an op without a FLOP formula must not fail an export
        flops = None
    return ModelStats(params=count_params(model), flops=flops, torch_latency_ms=torch_lat.median_ms,
                      ort_latency_ms=ort_lat.median_ms if ort_lat else None, torch_latency=torch_lat,
                      ort_latency=ort_lat)


def _reference_session(reference: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int,
                       exporters: Sequence[Exporter]) -> Any:
    """An onnxruntime session of the reference, for its latency only (static, checked on the example)."""
    with tempfile.TemporaryDirectory(prefix="strfx-ref-") as d:
        try:
            cap = _capture(reference, inputs, dynamic_batch=False)
            _, _, sess, _ = _write_onnx(reference, cap, inputs, Path(d), verification_inputs(inputs)[:1], threads,
                                        exporters, {})
        except StrfxError:
            return None
        return sess  # onnxruntime has read the file; the session outlives it


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise StrfxError(f"ONNX metadata keys and values must be strings; {bad[0]!r} is not "
                         f"(write numbers and lists as text, e.g. json.dumps)")
    return dict(metadata)


def export(
    model: nn.Module | torch.export.ExportedProgram,
    path: str | Path,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    pt2_path: str | Path | None = None,
    *,
    reference: nn.Module | None = None,
    force: bool = False,
    repeats: int = 10,
    exporters: Sequence[Exporter] = ("dynamo", "torchscript"),
    dynamic_batch: bool = True,
    metadata: dict[str, str] | None = None,
) -> ExportReport:
    """Write ``model`` as ONNX to ``path`` (and as a ``torch.export`` program to ``pt2_path``), verified.

    ``example_inputs`` default to those recorded by :func:`strfx.sparsify` / in the ExportedProgram.
    Dim 0 of every tensor input is dynamic where the model allows (``dynamic_batch``); ``metadata`` is
    written into the ONNX file's ``metadata_props``. With ``reference`` (the un-shrunk model) the report
    has before → after numbers and the error of the model against it. Raises
    :class:`ExportMismatchError` (an :class:`ExportError` and a :class:`VerificationError`; nothing
    written) if onnxruntime or the reloaded program disagrees with torch on any verification input,
    :class:`ExportError` if no exporter can handle the model, :class:`OutputExistsError` if a target
    exists and not ``force``.
    """
    path = Path(path)
    pt2 = Path(pt2_path) if pt2_path is not None else None
    if path.suffix != ".onnx":
        raise StrfxError(f"ONNX output must end in .onnx, got {path}")
    if pt2 is not None and pt2.suffix != ".pt2":
        raise StrfxError(f"torch.export output must end in .pt2, got {pt2}")
    if pt2 is not None and pt2.resolve() == path.resolve():
        raise StrfxError("the .onnx and .pt2 outputs must be different files")
    meta = _check_metadata(metadata)
    check_writable(path, force)
    if pt2 is not None:
        check_writable(pt2, force)
    inputs = _as_inputs(model, example_inputs)
    module = _runnable(model)
    models = [m for m in (module, reference) if m is not None]
    with eval_mode(*models):  # the caller's modules come back in the modes they were given in
        return _export(model, module, path, pt2, inputs, reference, repeats, exporters, dynamic_batch, meta)


def _export(model: nn.Module | torch.export.ExportedProgram, module: nn.Module, path: Path, pt2: Path | None,
            inputs: tuple[torch.Tensor, ...], reference: nn.Module | None, repeats: int,
            exporters: Sequence[Exporter], dynamic_batch: bool, metadata: dict[str, str]) -> ExportReport:
    threads = torch.get_num_threads()  # torch and onnxruntime (intra-op) run with the same count
    cap = _capture(model, inputs, dynamic_batch)
    sets, batches = _check_sets(inputs, cap)

    ref_error = None
    if reference is not None:
        with torch.no_grad():
            ref_error = max(max_rel_error(module(*clone_inputs(s.inputs)), reference(*clone_inputs(s.inputs))) for s in sets[:4])

    with _staging(path) as onnx_dir:
        exporter, onnx_err, sess, fallback = _write_onnx(module, cap, inputs, onnx_dir, sets, threads, exporters,
                                                         metadata)
        # The exporter wrote model.onnx; with external data the .onnx names its data file, so both are
        # rewritten under the target's name rather than just renamed.
        staged_files = list(onnx_dir.iterdir())
        if len(staged_files) > 1:
            _externalize_name(onnx_dir, path.name)
        else:
            os.replace(onnx_dir / "model.onnx", onnx_dir / path.name)
        onnx_bytes = _files_size(onnx_dir)

        pt2_err = pt2_bytes = None
        with _staging(pt2 or path) as pt2_dir:
            if pt2 is not None:
                pt2_err = _write_pt2(cap, module, pt2_dir / pt2.name, sets)
                pt2_bytes = (pt2_dir / pt2.name).stat().st_size
            after = _stats(module, inputs, repeats, sess)
            before = None
            if reference is not None:
                ref_sess = _reference_session(reference, inputs, threads, [exporter])  # same exporter: comparable
                before = _stats(reference, inputs, repeats, ref_sess)
            # Everything verified: publish (renames only).
            _publish(onnx_dir, path)
            if pt2 is not None:
                os.replace(pt2_dir / pt2.name, pt2)

    dynamic = cap.dynamic_dims if exporter == "dynamo" else {
        n: [0] for n in cap.input_names if 0 in cap.dynamic_dims.get(n, [])}
    return ExportReport(
        onnx_path=str(path), onnx_bytes=onnx_bytes, exporter=exporter, opset=ONNX_OPSET,
        pt2_path=str(pt2) if pt2 is not None else None, pt2_bytes=pt2_bytes,
        input_shapes=[list(x.shape) for x in inputs], dynamic_dims=dynamic, batch_sizes=batches,
        checked_inputs=[s.kind for s in sets], onnx_max_error=onnx_err, pt2_max_error=pt2_err,
        reference_max_error=ref_error, model=after, reference=before, threads=threads, repeats=repeats,
        metadata=metadata, notes=cap.notes + fallback,
    )


def _externalize_name(folder: Path, name: str) -> None:
    """Rename model.onnx + its external data to ``name`` + ``name.data`` and point the graph at it."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    m = onnx.load(str(folder / "model.onnx"), load_external_data=True)
    for f in list(folder.iterdir()):
        f.unlink()
    convert_model_to_external_data(m, all_tensors_to_one_file=True, location=f"{name}.data")
    onnx.save_model(m, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{name}.data")
