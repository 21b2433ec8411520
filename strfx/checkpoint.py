"""Training checkpoints in a run directory: ``checkpoints/epoch-NNNN.pt`` or ``checkpoints/epoch-NNNN/``.

* DDP and one process: one ``torch.save`` file per epoch, written by the writer rank (every rank
  holds the same weights).
* FSDP (``strategy: fsdp``): a directory written with ``torch.distributed.checkpoint`` (DCP). Every
  rank writes its own shards of the model and optimizer state, the writer adds ``extra.pt`` (epoch,
  step, schedule, controller, RNG, config: everything that is not a tensor of the model). DCP stores
  each tensor with its global shape, so the checkpoint loads into any number of ranks, or into a
  plain unsharded model in one process (``strfx shrink``/``export`` of an unfinished run).

Both are atomic: a checkpoint is assembled under a hidden temporary name and renamed into place, so
a worker killed half-way leaves no checkpoint that looks complete. Across machines, a sharded
checkpoint needs the run directory on a filesystem every node sees at the same path.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from strfx.errors import CheckpointError, StrfxError
from strfx.rundir import atomic_torch_save
from strfx.safeload import load_tensors

CHECKPOINT_DIR = "checkpoints"
EXTRA_FILE = "extra.pt"
CHECKPOINT_RE = re.compile(r"^epoch-(\d{4,})(\.pt)?$")


def checkpoint_path(run_dir: Path, epoch: int, sharded: bool) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / (f"epoch-{epoch:04d}" if sharded else f"epoch-{epoch:04d}.pt")


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every complete checkpoint, oldest first (files and DCP directories alike)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p.is_file() if m.group(2) else (p / EXTRA_FILE).is_file()):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune(run_dir: Path, keep: int | None) -> None:
    """Delete all but the ``keep`` newest checkpoints (writer only)."""
    if keep is None:
        return
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files/directories of a save that was killed half-way (writer only)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return
    for tmp in folder.glob(".epoch-*.tmp*"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def read_checkpoint(path: Path) -> Any:
    """The ``torch.save`` part of a checkpoint (the whole file, or a DCP directory's ``extra.pt``), tensors only."""
    path = Path(path)
    target = path / EXTRA_FILE if path.is_dir() else path
    try:
        return load_tensors(target, "checkpoint", "delete it to resume from the one before, or start over with --force")
    except StrfxError as err:
        raise CheckpointError(str(err)) from None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


_TENSOR = "__strfx_dcp_tensor__"


def _split(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of a nested dict/list into ``tensors`` (by path); return the rest with markers.

    Only tensors go through DCP: its loader reads any other value with ``torch.load(weights_only=False)``,
    which strfx never does. The rest (optimizer hyper-parameters, FQN lists) goes into ``extra.pt``.
    """
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree
        return {_TENSOR: prefix}
    if isinstance(tree, dict):
        return {k: _split(v, f"{prefix}/{k}", tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split(v, f"{prefix}/{i}", tensors) for i, v in enumerate(tree)]
    return tree


def _join(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        return {k: _join(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [_join(v, tensors) for v in skeleton]
    return skeleton


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any],
                 is_writer: bool) -> None:
    """Write a DCP checkpoint directory at ``path`` atomically. Collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(_dcp_state(model, optimizer), "", tensors)
    with warnings.catch_warnings():  # one process without a process group (strategy fsdp, no torchrun) is fine
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(tensors, checkpoint_id=str(tmp))  # returns on every rank once .metadata is written
    if is_writer:
        atomic_torch_save({**extra, "dcp_skeleton": skeleton}, tmp / EXTRA_FILE)
        if path.exists():  # a checkpoint of the same epoch from before a restart
            shutil.rmtree(path)
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _barrier()


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a DCP checkpoint into ``model`` (sharded or not) and ``optimizer``, whatever world size wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    saved = read_checkpoint(path)
    skeleton = saved.get("dcp_skeleton") if isinstance(saved, dict) else None
    if not isinstance(skeleton, dict) or "model" not in skeleton:
        raise CheckpointError(f"{path} is not a strfx sharded checkpoint (no model in {EXTRA_FILE}); "
                              f"delete it or start over with --force")
    tensors: dict[str, torch.Tensor] = {}
    _split(_dcp_state(model, optimizer), "", tensors)  # this process's tensors, sharded as it trains now
    wanted = {k: v for k, v in tensors.items() if k.startswith("/model/") or optimizer is not None}
    try:
        with warnings.catch_warnings():  # loading in one process without a process group is what we mean
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(wanted, checkpoint_id=str(path))
        state = _join(skeleton if optimizer is not None else {"model": skeleton["model"]}, wanted)
    except Exception as err:  # noqa: BLE001 - DCP reports missing keys / shape mismatches in its own errors
        text = str(err).strip().splitlines()
        raise CheckpointError(f"checkpoint {path} does not fit this model ({type(err).__name__}: "
                              f"{text[0] if text else ''}); start over with --force") from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_model_weights(path: Path, model: nn.Module) -> None:
    """The model weights of any checkpoint into a plain (unsharded) model in this process."""
    path = Path(path)
    if path.is_dir():
        load_sharded(path, model, None)
        return
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} is not a strfx training checkpoint")
    model.load_state_dict(ckpt["model"])
