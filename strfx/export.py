"""Export a (shrunk) model to ONNX and to a ``torch.export`` program, and prove both compute the same.

Every file written here has been run and compared with torch before it appears under its final name:

* ONNX: checked with ``onnx.checker``, run in onnxruntime (CPUExecutionProvider), outputs compared
  with torch's (max relative error ≤ :data:`strfx.api.TOLERANCE`).
* ``.pt2``: ``torch.export.save`` of the model's program, reloaded with ``torch.export.load`` — which
  needs neither the model's source code nor strfx — and run again.

Which ONNX exporter, and why: torch 2.13 has two. ``benchmarks/onnx_exporters.py`` exports fx-traced
torchvision models with both and runs them in onnxruntime. On 14 models (ResNet, MobileNetV3,
EfficientNet, ShuffleNetV2, SqueezeNet, DenseNet, ConvNeXt, Swin, ViT, MaxViT, RegNet, Inception,
GoogLeNet, MNASNet) both were exact (≤ 1.3e-6) wherever they worked; the TorchScript-based one
(``dynamo=False``) exported 13 of them in 22.6 s in total, the torch.export-based one (``dynamo=True``,
onnxscript) all 14 in 179 s, 3–15× longer per model. The TorchScript exporter failed only on ViT,
because eval-mode ``nn.MultiheadAttention`` takes a fused kernel it cannot translate; strfx turns that
fast path off while exporting (same math), after which it handles ViT too. So the TorchScript exporter
goes first and the torch.export-based one is the fallback: it is where torch is heading, it takes an
``ExportedProgram`` (what ``strfx shrink`` saves) directly, and it writes external data for models over
the 2 GiB protobuf limit. The report says which exporter produced the file, and ``benchmarks/zoo.py``
records it for every torchvision model.

Files are written under a temporary name next to the target and renamed only after verification, so a
failed export leaves nothing behind; an existing file is replaced only with ``force=True``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from strfx.api import TOLERANCE
from strfx.errors import ExportError, StrfxError, VerificationError
from strfx.rundir import check_writable
from strfx.verify import max_rel_error

Exporter = Literal["torchscript", "dynamo"]
ONNX_OPSET = 18
# Above this many parameter bytes the ONNX protobuf (2 GiB limit) needs an external data file.
_EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB


class ModelStats(BaseModel):
    """Size and speed of one model on the example inputs."""

    params: int = Field(description="Parameters (STR thresholds excluded).")
    flops: int | None = Field(None, description="FLOPs of one forward (torch.utils.flop_counter).")
    torch_latency_ms: float | None = Field(None, description="Median wall time of one forward in torch.")
    ort_latency_ms: float | None = Field(None, description="Median wall time of one run in onnxruntime.")


class ExportReport(BaseModel):
    """What was exported, how big it is, how exactly it matches torch and how fast it runs."""

    onnx_path: str
    onnx_bytes: int = Field(description="Size of the .onnx file plus its external data, if any.")
    exporter: Exporter = Field(description="The torch.onnx exporter that produced the file.")
    opset: int
    pt2_path: str | None = None
    pt2_bytes: int | None = None
    input_shapes: list[list[int]]
    tolerance: float = TOLERANCE
    onnx_max_error: float = Field(description="onnxruntime vs torch, max relative error.")
    pt2_max_error: float | None = Field(None, description="Reloaded .pt2 program vs torch, max relative error.")
    reference_max_error: float | None = Field(None, description="Exported model vs the reference model (torch).")
    model: ModelStats = Field(description="The exported model (after).")
    reference: ModelStats | None = Field(None, description="The reference (un-shrunk) model (before), if given.")
    threads: int = Field(description="Threads used by torch and onnxruntime for the latency numbers.")
    repeats: int = Field(description="Timed runs per latency (after warm-up).")

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

        row("params", lambda s: s.params, lambda v: f"{v:,}")
        row("FLOPs", lambda s: s.flops, lambda v: f"{v / 1e6:,.2f}M")
        row("torch latency", lambda s: s.torch_latency_ms, lambda v: f"{v:.2f} ms")
        row("onnxruntime latency", lambda s: s.ort_latency_ms, lambda v: f"{v:.2f} ms")
        return t

    def summary(self) -> str:
        """The numeric checks and the files, one line each (printed under the table)."""
        checks = [f"ORT vs torch {self.onnx_max_error:.2g}"]
        if self.pt2_max_error is not None:
            checks.append(f"pt2 vs torch {self.pt2_max_error:.2g}")
        if self.reference_max_error is not None:
            checks.append(f"vs reference {self.reference_max_error:.2g}")
        files = [f"{self.onnx_path} ({self.onnx_bytes / 1e6:.2f} MB, {self.exporter} exporter)"]
        if self.pt2_path:
            files.append(f"{self.pt2_path} ({(self.pt2_bytes or 0) / 1e6:.2f} MB)")
        return f"max relative error (≤ {self.tolerance:g}): {', '.join(checks)}\nwrote {'; '.join(files)}"


# ----------------------------------------------------------------------------------------- helpers


def _as_inputs(model: Any, example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if example_inputs is None:
        meta = getattr(model, "meta", None)
        if isinstance(meta, dict) and isinstance(meta.get("strfx"), dict):
            example_inputs = meta["strfx"].get("example_inputs")
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


def _eval(model: nn.Module) -> None:
    # The module of an ExportedProgram refuses .train()/.eval(); it is frozen in the mode it was exported in.
    with contextlib.suppress(NotImplementedError):
        model.eval()


def count_params(model: nn.Module | torch.export.ExportedProgram) -> int:
    """Parameters a deployed model carries: STR thresholds ``s`` are training state, not weights."""
    from strfx.modules import threshold_parameters

    module = _runnable(model)
    skip = {id(p) for p in threshold_parameters(module)}
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)


@torch.no_grad()
def count_flops(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        model(*inputs)
    return int(counter.get_total_flops())


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and warn about every traced branch; strfx reports what matters."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


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


def _export_torchscript(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    with _mha_fastpath_off():
        _export_torchscript_inner(model, inputs, path)


def _export_torchscript_inner(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=ONNX_OPSET,
                              do_constant_folding=True)
    except NotImplementedError:
        # The module of an ExportedProgram cannot switch modes, which this exporter insists on: trace it first.
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(module, inputs, check_trace=False)
            torch.onnx.export(traced, inputs, str(path), dynamo=False, opset_version=ONNX_OPSET,
                              do_constant_folding=True)


def _export_dynamo(model: nn.Module | torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...],
                   path: Path, large: bool) -> None:
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(model, inputs, dynamo=True, opset_version=ONNX_OPSET, verbose=False)
        program.save(str(path), external_data=large)


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


def _ort_error(sess: Any, inputs: Sequence[torch.Tensor], expected: Any) -> float:
    outs = sess.run(None, _ort_feed(sess, inputs))
    return max_rel_error([torch.from_numpy(o) for o in outs], list(tree_leaves(expected)))


def _check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as err:  # noqa: BLE001 - onnx raises ValidationError and others
        raise ExportError(f"onnx.checker rejected the exported model: {_first_line(err)}") from err


def _write_onnx(model: nn.Module | torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...],
                staged: Path, expected: Any, threads: int, exporters: Sequence[Exporter]) -> tuple[Exporter, float, Any]:
    """Export with the first exporter whose file passes the checker and matches torch in onnxruntime."""
    module = _runnable(model)
    large = sum(p.numel() * p.element_size() for p in module.parameters()) > _EXTERNAL_DATA_BYTES
    failures: list[str] = []
    if large:  # only the torch.export-based exporter writes weights beyond the 2 GiB protobuf limit
        exporters = ["dynamo"]
    for exporter in exporters:
        for f in staged.iterdir():
            f.unlink()
        try:
            if exporter == "torchscript":
                _export_torchscript(module, inputs, staged / "model.onnx")
            else:
                _export_dynamo(model, inputs, staged / "model.onnx", large)
            _check_onnx(staged / "model.onnx")
            sess = _ort_session(staged / "model.onnx", threads)
            err = _ort_error(sess, inputs, expected)
        except StrfxError as e:
            failures.append(f"{exporter}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - exporter and runtime failures are many kinds
            failures.append(f"{exporter}: {_first_line(e)}")
            continue
        if err <= TOLERANCE:
            return exporter, err, sess
        failures.append(f"{exporter}: onnxruntime output differs from torch, max relative error {err:.3g} > {TOLERANCE:g}")
    mismatch = all("differs from torch" in f for f in failures)
    cls = VerificationError if mismatch else ExportError
    raise cls("ONNX export failed, nothing written: " + "; ".join(failures))


# -------------------------------------------------------------------------------------------- pt2


def _write_pt2(model: nn.Module | torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...],
               staged_file: Path, expected: Any) -> float:
    """torch.export the model, save, reload from disk and compare the reloaded program with torch."""
    try:
        with _quiet():
            ep = model if isinstance(model, torch.export.ExportedProgram) else torch.export.export(model, inputs)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"torch.export could not capture the model: {_first_line(err)}") from err
    torch.export.save(ep, str(staged_file))
    reloaded = torch.export.load(str(staged_file))
    with torch.no_grad():
        err = max_rel_error(list(tree_leaves(reloaded.module()(*inputs))), list(tree_leaves(expected)))
    if err > TOLERANCE:
        raise VerificationError(
            f"the reloaded .pt2 program differs from torch: max relative error {err:.3g} > {TOLERANCE:g}; nothing written")
    return err


# --------------------------------------------------------------------------------------- the API


def _stats(model: nn.Module, inputs: tuple[torch.Tensor, ...], repeats: int, sess: Any = None) -> ModelStats:
    with torch.no_grad():
        torch_ms = _median_ms(lambda: model(*inputs), repeats)
    ort_ms = None
    if sess is not None:
        feed = _ort_feed(sess, inputs)
        ort_ms = _median_ms(lambda: sess.run(None, feed), repeats)
    try:
        flops: int | None = count_flops(model, inputs)
    except Exception:  # noqa: BLE001 - an op without a FLOP formula must not fail an export
        flops = None
    return ModelStats(params=count_params(model), flops=flops, torch_latency_ms=torch_ms, ort_latency_ms=ort_ms)


def _reference_session(reference: nn.Module, inputs: tuple[torch.Tensor, ...], expected: Any, threads: int,
                       exporters: Sequence[Exporter]) -> Any:
    """An onnxruntime session of the reference, for its latency only (a temp file, deleted)."""
    with tempfile.TemporaryDirectory(prefix="strfx-ref-") as d:
        try:
            _, _, sess = _write_onnx(reference, inputs, Path(d), expected, threads, exporters)
        except StrfxError:
            return None
        return sess  # onnxruntime has read the file; the session outlives it


def export(
    model: nn.Module | torch.export.ExportedProgram,
    path: str | Path,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    pt2_path: str | Path | None = None,
    *,
    reference: nn.Module | None = None,
    force: bool = False,
    repeats: int = 10,
    exporters: Sequence[Exporter] = ("torchscript", "dynamo"),
) -> ExportReport:
    """Write ``model`` as ONNX to ``path`` (and as a ``torch.export`` program to ``pt2_path``), verified.

    ``example_inputs`` default to those recorded by :func:`strfx.sparsify` / in the ExportedProgram.
    With ``reference`` (the un-shrunk model) the report has before → after numbers and the error of
    the model against it. Raises :class:`VerificationError` (nothing written) if onnxruntime or the
    reloaded program disagrees with torch beyond :data:`strfx.api.TOLERANCE`, :class:`ExportError` if
    no exporter can handle the model, :class:`OutputExistsError` if a target exists and not ``force``.
    """
    path = Path(path)
    pt2 = Path(pt2_path) if pt2_path is not None else None
    if path.suffix != ".onnx":
        raise StrfxError(f"ONNX output must end in .onnx, got {path}")
    if pt2 is not None and pt2.suffix != ".pt2":
        raise StrfxError(f"torch.export output must end in .pt2, got {pt2}")
    if pt2 is not None and pt2.resolve() == path.resolve():
        raise StrfxError("the .onnx and .pt2 outputs must be different files")
    check_writable(path, force)
    if pt2 is not None:
        check_writable(pt2, force)
    inputs = _as_inputs(model, example_inputs)
    module = _runnable(model)
    modes = [(m, m.training) for m in (module, reference) if m is not None]
    try:
        return _export(model, module, path, pt2, inputs, reference, repeats, exporters)
    finally:
        for m, training in modes:  # the caller's modules come back in the mode they were given in
            with contextlib.suppress(NotImplementedError):
                m.train(training)


def _export(model: nn.Module | torch.export.ExportedProgram, module: nn.Module, path: Path, pt2: Path | None,
            inputs: tuple[torch.Tensor, ...], reference: nn.Module | None, repeats: int,
            exporters: Sequence[Exporter]) -> ExportReport:
    _eval(module)
    threads = torch.get_num_threads()
    with torch.no_grad():
        expected = module(*inputs)

    ref_error = None
    if reference is not None:
        _eval(reference)
        with torch.no_grad():
            ref_error = max_rel_error(list(tree_leaves(module(*inputs))), list(tree_leaves(reference(*inputs))))

    with _staging(path) as onnx_dir:
        exporter, onnx_err, sess = _write_onnx(model, inputs, onnx_dir, expected, threads, exporters)
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
                pt2_err = _write_pt2(model, inputs, pt2_dir / pt2.name, expected)
                pt2_bytes = (pt2_dir / pt2.name).stat().st_size
            after = _stats(module, inputs, repeats, sess)
            before = None
            if reference is not None:
                with torch.no_grad():
                    ref_out = reference(*inputs)
                ref_sess = _reference_session(reference, inputs, ref_out, threads, exporters)
                before = _stats(reference, inputs, repeats, ref_sess)
            # Everything verified: publish (renames only).
            _publish(onnx_dir, path)
            if pt2 is not None:
                os.replace(pt2_dir / pt2.name, pt2)

    return ExportReport(
        onnx_path=str(path), onnx_bytes=onnx_bytes, exporter=exporter, opset=ONNX_OPSET,
        pt2_path=str(pt2) if pt2 is not None else None, pt2_bytes=pt2_bytes,
        input_shapes=[list(x.shape) for x in inputs], onnx_max_error=onnx_err, pt2_max_error=pt2_err,
        reference_max_error=ref_error, model=after, reference=before, threads=threads, repeats=repeats,
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
