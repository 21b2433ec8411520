"""The ``strfx`` command: a thin click layer over the Python API.

Errors strfx can explain are printed as one line (``error: ...``) with exit status 2; anything
else is an internal error (exit 1). ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import click
from strfx._table import make_console
from strfx.errors import StrfxError

console = make_console()
err_console = make_console(stderr=True)


def _fail(message: str, code: int) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _replay(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def command(group: click.Group, name: str) -> Callable[[Callable[..., Any]], click.Command]:
    """Register a subcommand with ``--debug`` and one-line error handling."""

    def decorate(fn: Callable[..., Any]) -> click.Command:
        @functools.wraps(fn)
        def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
            debug = debug or bool(click.get_current_context().find_root().params.get("debug"))
            if debug:  # training workers (other processes) read it from the environment
                os.environ["STRFX_DEBUG"] = "1"
            # Warnings (torch's, mostly) are held back and shown after the command, so that a failure
            # explained in one line is not preceded by unrelated warnings; with --debug they all show.
            error: BaseException | None = None
            with warnings.catch_warnings(record=True) as caught:
                try:
                    result = fn(*args, **kwargs)
                except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - reported below, never swallowed
                    error = err
            if error is None:
                _replay(caught)
                return result
            if isinstance(error, KeyboardInterrupt):
                _fail("interrupted", 130)
            if isinstance(error, StrfxError) and not debug:
                _fail(str(error), 2)
            _replay(caught)
            if debug:
                raise error
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            _fail(f"internal error: {type(error).__name__}: {first} (rerun with --debug for the traceback)", 1)
            return None

        wrapper = click.option("--debug", is_flag=True, help="Show tracebacks.")(wrapper)
        return group.command(name)(wrapper)

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="strfx")
def main(debug: bool) -> None:
    """strfx: learnable sparsity (STR) for any PyTorch model torch.export can capture.

    MODEL is a Python file defining build_model() (and optionally example_inputs()),
    torchvision:NAME or timm:NAME (random init, nothing downloaded), or hf:PATH (a local
    HuggingFace directory with a config.json; never the network).
    """


MODE = click.option("--mode", type=click.Choice(["structured", "unstructured", "lowrank", "structured+lowrank"]),
                    default=None,
                    help="Unstructured: STR on weights. Structured: STR-BN on BatchNorm γ/β and an STR importance "
                    "vector per channel group elsewhere. Lowrank: STR on each layer's singular values. "
                    "Structured+lowrank: both; shrink cuts channels, then factors each layer at its learned rank. "
                    "Default: the config's mode (unstructured).")
INIT = click.option("--init", "init", type=click.Path(dir_okay=False), default=None,
                    help="Start from these weights: a state dict of MODEL's build_model() "
                    "(torch.save(model.state_dict())), loaded with weights_only=True; every key must match.")
CONFIG = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                      help="YAML configuration file (see docs/config.md).")


def _resolve(model: str, mode: str | None, config_path: str | None, init: str | None = None) -> tuple[Any, Any]:
    from strfx.config import StrfxConfig, load_config, parse_config
    from strfx.loader import load_init, load_model

    cfg = load_config(config_path) if config_path else parse_config({})
    loaded = load_model(model)
    if init:
        load_init(loaded, init)
    data = cfg.model_dump()
    data["model"] = loaded.spec
    if mode:
        data["sparsify"]["mode"] = mode
    return loaded, StrfxConfig.model_validate(data)


@command(main, "transform")
@click.argument("model")
@MODE
@INIT
@CONFIG
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Run directory to write (default: runs/<model>-<mode>).")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
def transform(model: str, mode: str | None, init: str | None, config_path: str | None, output: str | None,
              force: bool, as_json: bool) -> None:
    """Trace MODEL, insert STR and save a run directory (weights, config, report).

    With --init, MODEL starts from trained weights: channels already dead in them (e.g. network slimming's
    γ = 0) are cut by `strfx shrink RUN_DIR` right away, constant channels folded into the next layer.
    """
    from strfx.api import sparsify
    from strfx.report import report
    from strfx.rundir import atomic_dir, check_writable, write_run

    loaded, cfg = _resolve(model, mode, config_path, init)
    out = Path(output or f"runs/{loaded.name}-{cfg.sparsify.mode}")
    check_writable(out, force)  # fail before the (possibly long) work
    gm = sparsify(loaded.model, config=cfg.sparsify, example_inputs=loaded.example_inputs)
    rep = report(gm, loaded.example_inputs, name=loaded.name)
    with atomic_dir(out, force=force) as tmp:
        write_run(tmp, gm, cfg, rep.model_dump_json(indent=2))
    if as_json:
        click.echo(rep.model_dump_json(indent=2))
    else:
        console.print(rep.table())
        console.print(f"wrote {out}/ (weights.pt, config.yaml, report.json)", highlight=False)  # Path: no trailing /


@command(main, "inspect")
@click.argument("model")
@INIT
@CONFIG
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--groups", is_flag=True, help="Print the channel groups (size, members, blocked-by) instead.")
def inspect_cmd(model: str, init: str | None, config_path: str | None, as_json: bool, groups: bool = False) -> None:
    """Show which layers STR would touch in each mode, and how (--groups: which channels are dead already)."""
    from strfx.inspect import plan

    loaded, cfg = _resolve(model, None, config_path, init)
    if groups:
        _print_groups(loaded, as_json)
        return
    rows = plan(loaded.model, loaded.example_inputs, cfg.sparsify)
    _print_rows(rows, as_json, f"what STR would touch in {loaded.name}",
                ("layer", "type", "weight shape", "unstructured", "structured"),
                lambda r: (r.layer, r.type, "×".join(map(str, r.weight_shape)), r.unstructured, r.structured),
                footer=lambda rs: f"{len(rs)} weight layers")


def _print_groups(loaded: Any, as_json: bool) -> None:
    from strfx.inspect import channel_groups

    def cells(r: Any) -> tuple[str, ...]:
        members = ", ".join(r.members[:6]) + (f", … (+{len(r.members) - 6})" if len(r.members) > 6 else "")
        return str(r.group), str(r.channels), str(r.dead), members, "; ".join(r.blocked_by[:3]) or "—"

    def footer(rs: list[Any]) -> str:
        n_blocked = sum(bool(r.blocked_by) for r in rs)
        return f"{len(rs)} groups, {len(rs) - n_blocked} prunable, {n_blocked} blocked"

    rows = channel_groups(loaded.model, loaded.example_inputs)
    _print_rows(rows, as_json, f"channel groups of {loaded.name}",
                ("group", "channels", "dead", "members", "blocked by"), cells, footer)


def _print_rows(rows: list[Any], as_json: bool, title: str, columns: tuple[str, ...],
                cells: Callable[[Any], tuple[str, ...]], footer: Callable[[list[Any]], str]) -> None:
    """Pydantic rows as JSON, or as a rich table with one cell per column and a one-line footer."""
    if as_json:
        click.echo(json.dumps([r.model_dump() for r in rows], indent=2))
        return
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col)
    for r in rows:
        t.add_row(*cells(r))
    console.print(t)
    console.print(footer(rows), highlight=False)


@command(main, "shrink")
@click.argument("run_dir", type=click.Path())
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True,
              help="Directory to write: model.pt2 (a torch.export program) and shrink.json.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--round-to", type=click.IntRange(1), default=1, show_default=True,
              help="Keep a few dead channels (as zeros) so every channel group is a multiple of this wide.")
@click.option("--uniform", is_flag=True,
              help="Keep the same number of heads/neurons/channels in every layer (the widest layer's).")
@click.option("--json", "as_json", is_flag=True, help="Print shrink.json instead of a table.")
def shrink_cmd(run_dir: str, output: str, force: bool, round_to: int, uniform: bool, as_json: bool) -> None:
    """Remove the dead channels of RUN_DIR's model, verify, and save it as a torch.export program."""
    from strfx.deploy import shrink_run

    summary = shrink_run(run_dir, output, force=force, round_to=round_to, uniform=uniform)
    if as_json:
        click.echo(summary.model_dump_json(indent=2))
        return
    console.print(summary.table())
    console.print(summary.summary(), highlight=False)
    console.print(f"wrote {output.rstrip('/') or '/'}/ (model.pt2, shrink.json)", highlight=False)


@command(main, "export")
@click.argument("source", type=click.Path())
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), required=True, help="ONNX file to write.")
@click.option("--pt2", "pt2_path", type=click.Path(dir_okay=False), default=None,
              help="Also write a torch.export program (.pt2).")
@click.option("--force", is_flag=True, help="Replace existing output files.")
@click.option("--repeats", type=click.IntRange(1), default=10, show_default=True,
              help="Timed runs per latency measurement.")
@click.option("--round-to", type=click.IntRange(1), default=1, show_default=True,
              help="When SOURCE is a run directory: shrink it keeping every channel group a multiple of this wide.")
@click.option("--uniform", is_flag=True,
              help="When SOURCE is a run directory: the same number of heads/neurons/channels in every layer.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export_cmd(source: str, onnx_path: str, pt2_path: str | None, force: bool, repeats: int, round_to: int,
               uniform: bool, as_json: bool) -> None:
    """Export SOURCE to ONNX (verified in onnxruntime): a run directory (shrunk first) or a `strfx shrink` output."""
    from strfx.deploy import export_source

    rep = export_source(source, onnx_path, pt2_path, force=force, repeats=repeats, round_to=round_to,
                        uniform=uniform)
    if as_json:
        click.echo(rep.model_dump_json(indent=2))
    else:
        console.print(rep.table(f"strfx export: {source}"))
        console.print(rep.summary(), highlight=False)


@command(main, "eval")
@click.argument("source", type=click.Path())
@click.option("--data", default=None, metavar="DATA", help="demo | npz:PATH | mnist:PATH | cifar10:PATH | "
              "imagefolder:PATH: its validation split is evaluated.")
@click.option("--contract", "contract_path", type=click.Path(dir_okay=False), default=None,
              help="input_contract.json to use (default: the ONNX metadata or the one next to SOURCE).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(source: str, data: str | None, contract_path: str | None, batch_size: int, as_json: bool) -> None:
    """Top-1 and loss of SOURCE (run directory, shrink output, .onnx or .pt2) on DATA, preprocessed as in training."""
    from strfx.evaluate import evaluate

    if not data:
        from strfx.errors import StrfxError

        raise StrfxError("strfx eval needs --data (demo, npz:PATH, mnist:PATH, cifar10:PATH or imagefolder:PATH)")
    res = evaluate(source, data, contract_path, batch_size)
    if as_json:
        click.echo(res.model_dump_json(indent=2))
    else:
        console.print(res.line(), highlight=False)


import strfx.train_cli  # noqa: E402,F401 - registers `strfx train` (kept in its own module)

if __name__ == "__main__":  # `python -m strfx.cli`: use the registered copy of the group
    from strfx.cli import main as _main

    _main()
