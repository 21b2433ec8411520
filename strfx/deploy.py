"""From a run directory to deployable files: what ``strfx shrink`` and ``strfx export`` do.

A *shrink output* directory (``strfx shrink RUN_DIR -o OUT``) holds:

* ``model.pt2``   — the shrunk model as a ``torch.export`` program (with its example inputs). It loads
  with ``torch.export.load`` alone: no strfx, no model source code;
* ``shrink.json`` — a :class:`ShrinkOutput`: params/FLOPs before → after and the numeric checks.

The directory is assembled under a temporary name and renamed into place only after the saved
program has been reloaded and compared with the masked model, so it is never half-written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from strfx.verify import TOLERANCE
from strfx.errors import StrfxError, VerificationError
from strfx.export import (ExportMismatchError, ExportReport, ModelStats, _capture, _check_sets, _verify_runs,
                          count_flops, count_params, export)
from strfx.rundir import CONFIG_FILE, atomic_dir, check_writable, load_run

PT2_FILE = "model.pt2"
SHRINK_FILE = "shrink.json"


class ShrinkOutput(BaseModel):
    """What ``strfx shrink`` wrote and how it checked it (``shrink.json``)."""

    model: str = Field(description="MODEL the run was built from.")
    run_dir: str
    input_shapes: list[list[int]]
    params_before: int
    params_after: int
    flops_before: int | None
    flops_after: int | None
    channels: int = Field(description="Channels over all channel groups.")
    channels_removed: int
    groups: int
    blocked_groups: int
    unknown_ops: dict[str, str] = Field(description="Op kind → first node of it that blocked channels.")
    shrink_max_error: float = Field(description="Shrunk vs masked model in torch (example + random inputs).")
    shrink_max_error64: float | None = Field(None, description="The same in float64 (None: skipped, see notes).")
    pt2_max_error: float = Field(description="Reloaded model.pt2 vs the masked model.")
    tolerance: float = TOLERANCE
    constant_channels_folded: int = Field(0, description="Removed channels that were constants (e.g. network "
                                          "slimming's γ = 0, β ≠ 0), folded into the next layer's bias.")
    constant_channels_kept: list[str] = Field(default_factory=list,
                                              description="Constant channels kept, and why (no exact fold).")
    notes: list[str] = Field(default_factory=list)

    def table(self) -> Any:
        from rich.table import Table

        t = Table(title=f"strfx shrink: {self.model}")
        for col, justify in (("", "left"), ("before", "right"), ("after", "right"), ("ratio", "right")):
            t.add_column(col, justify=justify)  # type: ignore[arg-type]
        t.add_row("params", f"{self.params_before:,}", f"{self.params_after:,}",
                  f"{self.params_before / max(self.params_after, 1):.2f}×")
        if self.flops_before and self.flops_after:
            t.add_row("FLOPs", f"{self.flops_before / 1e6:,.2f}M", f"{self.flops_after / 1e6:,.2f}M",
                      f"{self.flops_before / max(self.flops_after, 1):.2f}×")
        t.add_row("channels", f"{self.channels:,}", f"{self.channels - self.channels_removed:,}",
                  f"-{self.channels_removed:,}")
        return t

    def summary(self) -> str:
        """Groups and the numeric checks, one line (printed under the table)."""
        blocked = f", {self.blocked_groups} blocked" if self.blocked_groups else ""
        return (f"{self.groups} channel groups{blocked} · max relative error vs masked model: "
                f"torch {self.shrink_max_error:.2g}"
                + (f" (float64 {self.shrink_max_error64:.2g})" if self.shrink_max_error64 is not None else "")
                + f", reloaded .pt2 {self.pt2_max_error:.2g} (≤ {self.tolerance:g})"
                + (f" · {self.constant_channels_folded} constant channel(s) folded into biases"
                   if self.constant_channels_folded else ""))


def _flops(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int | None:
    try:
        return count_flops(model, inputs)
    except Exception:  # noqa: BLE001 - an op without a FLOP formula must not fail shrinking
        return None


def shrink_run(run_dir: str | Path, out: str | Path, force: bool = False, round_to: int = 1,
               uniform: bool = False) -> ShrinkOutput:
    """Shrink the model of ``run_dir`` and write ``out`` (model.pt2 + shrink.json), verified."""
    from strfx.surgery import shrink

    run_dir, out = Path(run_dir), Path(out)
    _require_dir(run_dir)
    check_writable(out, force)  # fail before the work
    masked, loaded, config = load_run(run_dir)
    masked.eval()
    inputs = tuple(loaded.example_inputs)
    shrunk = shrink(masked, inputs, round_to=round_to, uniform=uniform).eval()
    rep = shrunk.strfx_shrink
    cap = _capture(shrunk, inputs, dynamic_batch=True)  # model.pt2 takes any batch size where the model does
    if cap.program is None:
        raise StrfxError(f"torch.export could not capture the shrunk model: {cap.notes[-1]}")
    sets, _ = _check_sets(inputs, cap)
    with atomic_dir(out, force=force) as tmp:
        torch.export.save(cap.program, str(tmp / PT2_FILE))
        reloaded = torch.export.load(str(tmp / PT2_FILE)).module()
        try:
            pt2_err = _verify_runs(lambda x: reloaded(*x), masked, sets, "the saved model.pt2", flat=False)
        except ExportMismatchError as err:
            raise VerificationError(f"{err} (vs the masked model); nothing written") from err
        summary = ShrinkOutput(
            model=config.model or loaded.spec, run_dir=str(run_dir), input_shapes=[list(x.shape) for x in inputs],
            params_before=count_params(masked), params_after=count_params(shrunk),
            flops_before=_flops(masked, inputs), flops_after=_flops(shrunk, inputs),
            channels=rep["channels"], channels_removed=rep["channels_removed"], groups=rep["groups"],
            blocked_groups=rep["blocked_groups"], unknown_ops=rep["unknown_ops"], shrink_max_error=rep["max_error"],
            shrink_max_error64=rep["max_error64"], pt2_max_error=pt2_err,
            constant_channels_folded=rep["constant_channels_folded"],
            constant_channels_kept=rep["constant_channels_kept"], notes=rep["notes"],
        )
        (tmp / SHRINK_FILE).write_text(summary.model_dump_json(indent=2))
        from strfx.contract import CONTRACT_FILE

        if (run_dir / CONTRACT_FILE).is_file():  # the shrunk model needs the same preprocessing
            (tmp / CONTRACT_FILE).write_bytes((run_dir / CONTRACT_FILE).read_bytes())
    return summary


def shrink_and_export(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], out_dir: str | Path, *,
                      metadata: dict[str, str] | None = None, force: bool = False,
                      repeats: int = 10) -> tuple[dict[str, Any], nn.Module]:
    """Shrink a trained STR model and export it to ``out_dir`` (model.onnx + model.pt2), each verified.

    The end of every strfx training loop (``strfx train --export``, the Lightning and HuggingFace
    callbacks): a CPU copy of ``model`` is folded and cut (:func:`strfx.shrink`), then exported with
    ``metadata`` (e.g. the input contract) in the ONNX file. ``model`` itself is left as it was.
    Returns the summary (what ``summary.json`` records under ``export``) and the shrunk model.
    """
    import copy

    from strfx.surgery import shrink

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    masked = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    inputs = tuple(t.cpu() for t in example_inputs)
    shrunk = shrink(masked, inputs)
    info = shrunk.strfx_shrink
    rep = export(shrunk, out / "model.onnx", inputs, pt2_path=out / "model.pt2", reference=masked, force=force,
                 repeats=repeats, metadata=metadata)
    summary = {
        "onnx": rep.onnx_path, "pt2": rep.pt2_path, "exporter": rep.exporter,
        "channels": info["channels"], "channels_removed": info["channels_removed"],
        "params_after": rep.model.params, "flops_after": rep.model.flops,
        "params_before": rep.reference.params if rep.reference else None,
        "flops_before": rep.reference.flops if rep.reference else None,
        "shrink_max_error": info["max_error"], "onnx_max_error": rep.onnx_max_error,
        "pt2_max_error": rep.pt2_max_error, "reference_max_error": rep.reference_max_error,
        "tolerance": rep.tolerance, "metadata": sorted(rep.metadata),
    }
    return summary, shrunk


def _require_dir(path: Path) -> None:
    if not path.exists():
        raise StrfxError(f"{path} does not exist; give a run directory written by `strfx transform` or `strfx train`")
    if not path.is_dir():
        raise StrfxError(f"{path} is not a directory; give a run directory or a `strfx shrink` output")


def load_shrunk(out_dir: str | Path) -> torch.export.ExportedProgram:
    """The program of a ``strfx shrink`` output directory (carries its example inputs)."""
    path = Path(out_dir) / PT2_FILE
    try:
        program = torch.export.load(str(path))
    except FileNotFoundError:
        raise StrfxError(f"{path} is missing; the shrink output is incomplete") from None
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file
        from strfx.safeload import reason

        raise StrfxError(f"cannot load {path}: {reason(err)}; re-create it with `strfx shrink`") from None
    if program.example_inputs is None:
        raise StrfxError(f"{path} carries no example inputs; re-create it with `strfx shrink`")
    return program


def export_source(source: str | Path, onnx_path: str | Path, pt2_path: str | Path | None = None,
                  force: bool = False, repeats: int = 10, round_to: int = 1, uniform: bool = False) -> ExportReport:
    """Export a run directory (shrunk first; the masked model is the "before") or a shrink output."""
    from strfx.surgery import shrink

    source = Path(source)
    _require_dir(source)
    check_writable(Path(onnx_path), force)
    if pt2_path is not None:
        check_writable(Path(pt2_path), force)
    from strfx.contract import CONTRACT_FILE, load_contract

    # the run's input contract travels in the ONNX file (what `strfx eval` and deployments read)
    metadata = load_contract(source / CONTRACT_FILE).metadata() if (source / CONTRACT_FILE).is_file() else None
    if (source / CONFIG_FILE).is_file():
        masked, loaded, _ = load_run(source)
        masked.eval()
        shrunk = shrink(masked, loaded.example_inputs, round_to=round_to, uniform=uniform).eval()
        return export(shrunk, onnx_path, loaded.example_inputs, pt2_path, reference=masked, force=force,
                      repeats=repeats, metadata=metadata)
    if (source / PT2_FILE).is_file():
        if round_to > 1 or uniform:
            flag = f"--round-to {round_to}" if round_to > 1 else "--uniform"
            raise StrfxError(f"{source} is already shrunk; {flag.split()[0]} applies to a run directory "
                             f"(`strfx shrink RUN_DIR -o OUT {flag}`)")
        program = load_shrunk(source)
        rep = export(program, onnx_path, None, pt2_path, force=force, repeats=repeats, metadata=metadata)
        if (source / SHRINK_FILE).is_file():  # the un-shrunk model is gone; its size is on record
            try:
                before = ShrinkOutput.model_validate_json((source / SHRINK_FILE).read_text())
                rep.reference = ModelStats(params=before.params_before, flops=before.flops_before)
            except ValueError:
                pass  # an unreadable shrink.json only costs the "before" column
        return rep
    raise StrfxError(f"{source} is neither a run directory ({CONFIG_FILE}) nor a `strfx shrink` output ({PT2_FILE})")
