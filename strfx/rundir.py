"""Run directories and atomic file output.

A run directory (written by ``strfx transform`` and ``strfx train``) holds:

* ``config.yaml`` — the resolved configuration, including ``model`` (the MODEL it was built from);
* ``weights.pt``  — the state dict of the sparsified model (loads with ``weights_only=True``); a training
  run that has not finished has none, and :func:`load_run` takes its newest checkpoint instead;
* ``report.json`` — the :class:`strfx.report.Report`.

Nothing is ever half-written: files go to a temporary name and are renamed into place, and a
directory is assembled under a temporary name and renamed as a whole. Existing outputs are only
replaced with ``force=True``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from strfx.config import StrfxConfig, dump_config, load_config
from strfx.errors import OutputExistsError, StrfxError
from strfx.loader import LoadedModel, load_model
from strfx.safeload import load_tensors, reason

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "weights.pt"
REPORT_FILE = "report.json"


def _normal_mode(path: Path | str, base: int) -> None:
    """mkdtemp/mkstemp make private entries; give the result the mode any new file would get."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, base & ~umask)


def check_writable(path: Path, force: bool) -> None:
    """Refuse to replace an existing path unless ``force``."""
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to replace it or choose another output")


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds."""
    path = Path(path)
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    _normal_mode(tmp, 0o777)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def atomic_write(path: str | Path, data: bytes | str, force: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        _normal_mode(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file, fsync and rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _normal_mode(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_run(folder: Path, model: nn.Module, config: StrfxConfig, report_json: str) -> None:
    """Write the three run files into ``folder`` (normally the temporary dir of :func:`atomic_dir`)."""
    (folder / CONFIG_FILE).write_text(dump_config(config))
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    (folder / REPORT_FILE).write_text(report_json)


def load_run(run_dir: str | Path) -> tuple[nn.Module, LoadedModel, StrfxConfig]:
    """Rebuild the sparsified model of a run directory: MODEL + config + weights."""
    from strfx.api import sparsify

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise StrfxError(f"{run_dir} is not a strfx run directory (no {CONFIG_FILE}); give what `strfx transform` or `strfx train` wrote")
    config = load_config(run_dir / CONFIG_FILE)
    if not config.model:
        raise StrfxError(f"{run_dir / CONFIG_FILE} does not name the model (key 'model')")
    loaded = load_model(config.model)
    gm = sparsify(loaded.model, config=config.sparsify, example_inputs=loaded.example_inputs, verify=False)
    weights = run_dir / WEIGHTS_FILE
    if not weights.exists():  # an unfinished `strfx train` run: its newest checkpoint (file or sharded DCP directory)
        from strfx.checkpoint import latest_checkpoint, load_model_weights

        latest = latest_checkpoint(run_dir)
        if latest is not None:
            try:
                load_model_weights(latest, gm)
            except StrfxError:
                raise
            except Exception as err:  # noqa: BLE001 - a checkpoint of another model or configuration
                raise StrfxError(f"{latest} does not fit {config.model} ({reason(err)}); the run directory was "
                                 f"written for another model or configuration") from None
            return gm, loaded, config
    state = load_tensors(weights, "weights file", "the run directory is incomplete or damaged; train or transform again")
    try:
        gm.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - a state dict of another model or configuration
        raise StrfxError(f"{weights} does not fit {config.model} ({reason(err)}); the run directory was written "
                         f"for another model or configuration") from None
    return gm, loaded, config
