"""STR training: ``strfx.train(...)`` (the launcher) and :class:`Trainer` (what each process runs).

A run goes through three stages:

1. :func:`prepare` (the launching process): load MODEL and DATA, check they fit each other,
   resolve the configuration, create or check the run directory. Every user mistake surfaces
   here as one line, before any worker starts.
2. :class:`Trainer` (one process, or each torchrun worker): DDP over gloo (CPU) or nccl (CUDA),
   ``DistributedSampler`` shards, optional SyncBatchNorm, bf16 autocast + channels_last +
   ``torch.compile`` on GPU; an atomic checkpoint every epoch; the threshold-decay controller when a
   target sparsity is set (strfx.controller).
3. The end of the run (rank 0): final report, ``weights.pt``, the layer-wise budget plot and, with
   ``export``, shrink + export with their checks.

SyncBatchNorm: ``sync_batchnorm: true`` converts the BatchNorms that carry no STR (in unstructured
mode, all of them). An STR-BN (a BatchNorm whose γ/β are STR parametrizations, structured mode)
keeps per-process batch statistics, like plain DDP does for BN; its running statistics are kept
identical by DDP's buffer broadcast.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Subset

from strfx.config import StrfxConfig, dump_config, load_config, parse_config
from strfx.contract import CONTRACT_FILE, InputContract, input_contract  # noqa: F401 - re-exported
from strfx.controller import SparsityMeter, ThresholdDecayController, steer
from strfx.data import Data, load_data
from strfx.checkpoint import CHECKPOINT_DIR, checkpoint_path, latest_checkpoint, read_checkpoint
from strfx.distributed import (DEBUG_ENV, DistEnv, LaunchOptions, from_writer, gather_full_state, init_distributed,
                               launch, local, maybe_inject_fault, shard_model, shutdown)
from strfx.errors import CheckpointError, DataError, OutputExistsError, StrfxError, TrainError
from strfx.loader import LoadedModel, load_init, load_model  # noqa: F401 - load_init re-exported
from strfx.rundir import CONFIG_FILE, REPORT_FILE, WEIGHTS_FILE, atomic_torch_save, atomic_write
from strfx.safeload import load_tensors
from strfx.train_config import TrainConfig

REWIND_FILE = "rewind_state.pt"  # train.rewind: the earlier state the fine-tuned model is cut from
REWIND_RAMP = {"ramp_start": 0.6, "ramp_end": 0.9}  # controller defaults under train.rewind "ramp" (of the run)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "budget.png"
CHECKPOINT_FORMAT = "strfx-train-checkpoint/1"


# --------------------------------------------------------------------------------------------- prepare


def resolve_config(loaded: LoadedModel, mode: str | None, config: StrfxConfig | dict[str, Any] | str | Path | None,
                   finetune_epochs: int = 0, **train_overrides: Any) -> StrfxConfig:
    """The run's full configuration: file/dict + command-line overrides, ``train`` always present; ``rewind:
    auto`` resolved (it depends on ``finetune_epochs``), so config.yaml records what the run does."""
    if isinstance(config, (str, Path)):
        cfg = load_config(config)
    elif isinstance(config, StrfxConfig):
        cfg = config
    else:
        cfg = parse_config(config or {})
    data = cfg.model_dump()
    data["model"] = loaded.spec
    if mode:
        data["sparsify"]["mode"] = mode
    data["train"] = data.get("train") or {}
    cpu_offload = train_overrides.pop("cpu_offload", None)
    data["train"].update({k: v for k, v in train_overrides.items() if v is not None})
    if cpu_offload is not None:
        data["train"]["fsdp"] = {**(data["train"].get("fsdp") or {}), "cpu_offload": cpu_offload}
    resolved = parse_config(data, "(resolved)")
    assert resolved.train is not None
    if cpu_offload and resolved.train.strategy != "fsdp":
        raise StrfxError("--cpu-offload only applies to sharded training; add --strategy fsdp")
    tc = resolved.train
    if tc.rewind == "auto":
        # STR picks the units or weights, the weights before the search are retrained: it beat STR's own weights
        # (and network slimming, and Han et al. at 95-99 %) on LeNet-5 (docs/results.md); low-rank cannot rewind
        searchable = resolved.sparsify.mode in ("structured", "unstructured") and not resolved.sparsify.ranks
        data["train"]["rewind"] = "ramp" if searchable and tc.target_sparsity is not None and finetune_epochs else "off"
        resolved = parse_config(data, "(resolved)")
    user_controller = cfg.train.controller.model_fields_set if cfg.train else set()
    if resolved.train.rewind == "ramp" and not {"ramp_start", "ramp_end"} & user_controller:
        # rewinding to the ramp's start: train unpushed for most of the run, so the weights rewound to are
        # well trained, then search (docs/results.md, "Issue 14", "Rewind")
        data["train"]["controller"] = {**(data["train"].get("controller") or {}), **REWIND_RAMP}
        resolved = parse_config(data, "(resolved)")
    s_init = resolved.train.s_init.get(resolved.sparsify.mode)
    if s_init is not None and "s_init" not in cfg.sparsify.model_fields_set:  # an explicit sparsify.s_init wins
        data["sparsify"]["s_init"] = s_init
        resolved = parse_config(data, "(resolved)")
    return resolved


def _class_check(loaded: LoadedModel, data: Data) -> None:
    """Run the model on two training images: shapes must fit and outputs must match the classes."""
    sample = data.train[[0, 1]] if data.batched else tuple(
        torch.stack([torch.as_tensor(data.train[i][k]) for i in range(min(2, len(data.train)))]) for k in (0, 1))
    x = sample[0]
    model = loaded.model
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # noqa: BLE001 - any shape/type error of the user's model
        raise DataError(f"{loaded.name} cannot run on {data.source} images of shape {tuple(x.shape[1:])}: "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
                        f"use data that matches the model's input") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise DataError(f"{loaded.name} returns {type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}; "
                        "strfx train needs a classifier returning logits of shape (batch, classes)")
    if data.num_classes is not None and out.shape[1] != data.num_classes:
        raise DataError(f"{loaded.name} outputs {out.shape[1]} classes but {data.source} has {data.num_classes} "
                        f"(labels 0..{data.num_classes - 1}); change the model's number of classes or the data")


def _latest_checkpoint(run_dir: Path) -> Path | None:
    return latest_checkpoint(run_dir)


def _without_epochs(cfg: dict[str, Any]) -> dict[str, Any]:
    """A config without ``train.epochs``: the one setting ``--resume`` may change (to extend a run)."""
    out = dict(cfg)
    out["train"] = {k: v for k, v in (cfg.get("train") or {}).items() if k != "epochs"}
    return out


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str | None:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            sub = _config_diff(va, vb, f"{prefix}{key}.")
            if sub:
                return sub
        elif va != vb:
            return f"{prefix}{key}: run has {va!r}, now {vb!r}"
    return None


def load_checkpoint(path: Path, config: StrfxConfig) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check it belongs to this configuration."""
    ckpt = read_checkpoint(path)  # a file, or a sharded (DCP) directory's extra.pt
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a strfx training checkpoint; delete it or start over with --force")
    diff = _config_diff(_without_epochs(json.loads(ckpt["config"])), _without_epochs(config.model_dump(mode="json")))
    if diff:
        raise CheckpointError(f"checkpoint {path} was made with a different configuration ({diff}); resume with "
                              f"the run's own settings or start a new run")
    return ckpt



def _flops_after(rep: Any) -> int:
    """FLOPs left: the shrunk model's where the report has them (structured), else the estimate."""
    if rep.shrunk_flops is not None:
        return rep.shrunk_flops
    return rep.effective_flops or 0

@dataclass
class Job:
    """A validated training job: what a worker needs (serialised as JSON for torchrun workers)."""

    model: str
    data: str | None
    run_dir: str
    config: dict[str, Any]
    resume: bool = False
    export: bool = False
    progress: bool | None = None
    finetune_epochs: int = 0  # --finetune-epochs: plain training of the shrunk model after --export (strfx.finetune)
    finetune_lr: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _check_rewind(tc: TrainConfig, mode: str, finetune_epochs: int, ranks: bool = False) -> None:
    """train.rewind needs a model to train after the run, and (ramp) a schedule to rewind to."""
    if tc.rewind in ("off", "auto"):
        return
    if not finetune_epochs:
        raise StrfxError(f"train.rewind {tc.rewind!r} needs --finetune-epochs N: the rewound model is the one trained "
                         f"after the run (N epochs, exported to RUN_DIR/finetuned/)")
    if mode == "lowrank" or ranks:
        raise StrfxError("train.rewind does not apply to low-rank STR (--mode lowrank or structured+lowrank: a singular "
                         "direction of the trained weight is not one of the earlier weight); use --rewind off")
    if tc.rewind == "ramp" and tc.target_sparsity is None:
        raise StrfxError("--rewind ramp rewinds to where the --target-sparsity schedule starts rising; give "
                         "--target-sparsity, or use --rewind start")


def _export_available() -> bool:
    import strfx

    return callable(getattr(strfx, "shrink", None)) and callable(getattr(strfx, "export", None))


def prepare(model: str, data: str | None, mode: str | None = None,
            config: StrfxConfig | dict[str, Any] | str | Path | None = None, run_dir: str | Path | None = None,
            resume: bool = False, force: bool = False, export: bool = False, world_size: int | None = 1,
            finetune_epochs: int = 0, **train_overrides: Any) -> Job:
    """Validate everything a run needs and set up its directory (see the module docstring)."""
    if resume and force:
        raise StrfxError("--resume and --force contradict each other: --resume continues RUN_DIR, --force deletes it")
    if export and not _export_available():
        raise StrfxError("--export needs strfx.shrink and strfx.export, which this installation does not have yet; "
                         "train without --export, then shrink/export the run directory once they are available")
    loaded = load_model(model)
    cfg = resolve_config(loaded, mode, config, finetune_epochs, **train_overrides)
    tc = cfg.train
    assert tc is not None
    _check_rewind(tc, cfg.sparsify.mode, finetune_epochs, cfg.sparsify.ranks)
    if tc.target_metric != "flops" and cfg.sparsify.mode != "structured":
        raise StrfxError(f"train.target_metric {tc.target_metric!r} applies to --mode structured; in {cfg.sparsify.mode} "
                         f"mode --target-sparsity is a fraction of the weights")
    if tc.init:
        load_init(loaded, tc.init)  # fail now, in one line, rather than in every worker
    if tc.strategy == "fsdp" and tc.fsdp.cpu_offload and not torch.cuda.is_available():
        raise StrfxError("--cpu-offload (train.fsdp.cpu_offload) moves sharded state from GPU to CPU memory, and "
                         "this machine trains on the CPU already; drop it")
    if world_size and tc.batch_size % world_size:
        raise StrfxError(f"train.batch_size {tc.batch_size} is the global batch and must divide evenly over "
                         f"{world_size} processes; pick a multiple of {world_size}")
    in_shape = tuple(loaded.example_inputs[0].shape) if loaded.example_inputs else ()
    datasets_hook = loaded.hook("datasets")
    d = load_data(data, datasets_hook, image_size=tuple(in_shape[-2:]) if len(in_shape) == 4 else (224, 224),
                  channels=in_shape[1] if len(in_shape) == 4 else 3, model_file=loaded.spec)
    _class_check(loaded, d)
    if len(d.train) < tc.batch_size:
        raise DataError(f"{d.source} has {len(d.train)} training images, fewer than one batch "
                        f"(train.batch_size {tc.batch_size}); lower the batch size")

    out = Path(run_dir or f"runs/{loaded.name}-{cfg.sparsify.mode}-train").expanduser().resolve()
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise StrfxError(f"nothing to resume in {out} (no {CONFIG_FILE}); start the run without --resume")
        saved = load_config(out / CONFIG_FILE)
        diff = _config_diff(_without_epochs(saved.model_dump(mode="json")), _without_epochs(cfg.model_dump(mode="json")))
        if diff:
            raise CheckpointError(f"{out} was started with other settings ({diff}); pass the run's original "
                                  f"options to --resume (only --epochs may grow), or start a new run")
        latest = _latest_checkpoint(out)
        if latest is not None:
            done = int(load_checkpoint(latest, cfg)["epoch"])  # fail now, in one line, rather than in every worker
            if tc.epochs < done:
                raise CheckpointError(f"{out} has done {done} epochs already; --resume --epochs N extends a run, "
                                      f"so N must be at least {done}")
        assert saved.train is not None
        if tc.epochs != saved.train.epochs:  # extending: the run's settings are now the longer run's
            atomic_write(out / CONFIG_FILE, dump_config(cfg))
    else:
        if out.exists():
            if not force:
                raise OutputExistsError(f"{out} already exists; pass --resume to continue it, --force to replace it, "
                                        f"or choose another -o")
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, trash)
            shutil.rmtree(trash, ignore_errors=True)
        out.mkdir(parents=True)
        atomic_write(out / CONFIG_FILE, dump_config(cfg))
    return Job(loaded.spec, data, str(out), cfg.model_dump(mode="json"), resume=resume, export=export)


@dataclass
class TrainResult:
    """What a finished run reports (also in RUN_DIR/summary.json)."""

    run_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


def train(model: str, data: str | None = None, mode: str | None = None, *,
          config: StrfxConfig | dict[str, Any] | str | Path | None = None, run_dir: str | Path | None = None,
          resume: bool = False, force: bool = False, export: bool = False, epochs: int | None = None,
          batch_size: int | None = None, target_sparsity: float | None = None, launch_options: LaunchOptions | None = None,
          progress: bool | None = None, lr: float | None = None, seed: int | None = None,
          init: str | Path | None = None, finetune_epochs: int = 0, finetune_lr: float | None = None,
          strategy: str | None = None, cpu_offload: bool | None = None, rewind: str | None = None,
          target_metric: str | None = None) -> TrainResult:
    """Train MODEL with STR; one process, or ``launch_options.nproc_per_node`` through torchrun.

    ``model`` and ``data`` are the CLI's MODEL and ``--data`` strings; ``epochs``, ``batch_size``, ``lr``,
    ``seed``, ``init``, ``strategy``, ``target_sparsity``, ``target_metric``, ``rewind`` and ``cpu_offload``
    (``train.fsdp.cpu_offload``) override the config's ``train:`` fields. ``finetune_epochs`` (implies ``export``) fine-tunes the shrunk model
    afterwards (strfx.finetune; with ``train.rewind`` the model cut from earlier weights). Returns the run's summary.
    """
    opts = launch_options
    if finetune_lr is not None and not finetune_epochs:
        raise StrfxError("--finetune-lr needs --finetune-epochs N (how long to fine-tune the shrunk model)")
    export = export or finetune_epochs > 0  # the fine-tuned model is the shrunk one, and it is exported
    job = prepare(model, data, mode, config, run_dir, resume, force, export,
                  world_size=opts.world_size() if opts else 1, epochs=epochs, batch_size=batch_size,
                  target_sparsity=target_sparsity, lr=lr, seed=seed, strategy=strategy, cpu_offload=cpu_offload,
                  rewind=rewind, target_metric=target_metric, finetune_epochs=finetune_epochs,
                  init=str(Path(init).expanduser().resolve()) if init is not None else None)
    job.progress = progress
    job.finetune_epochs, job.finetune_lr = finetune_epochs, finetune_lr
    if opts is None:
        run_job(job.to_dict())
    else:
        launch(job.to_dict(), opts)
    summary_path = Path(job.run_dir) / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return TrainResult(Path(job.run_dir), summary)


# --------------------------------------------------------------------------------------------- workers


def run_job(job: dict[str, Any]) -> None:
    """What each process runs: join the group, train, leave the group cleanly."""
    env = init_distributed()
    try:
        if env.distributed:
            job = {**job, "run_dir": _writer_run_dir(env, job["run_dir"])}
        Trainer(Job(**job), env).fit()
    except BaseException as err:
        if not env.distributed:
            raise
        # A peer died (or this rank failed): gloo's threads are still attached to the broken group, and
        # a normal interpreter exit then aborts ("terminate called without an active exception"). Report
        # and leave at once instead; torchrun sees the non-zero exit and restarts the group.
        import traceback

        if isinstance(err, StrfxError):
            print(f"error: {err}", file=sys.stderr)
        elif os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        elif not _peer_died(err):  # a bystander of a dead peer stays quiet: the launcher names the dead rank
            print(f"rank {env.rank} stopped: {_one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2 if isinstance(err, StrfxError) else 1)
    shutdown(env)


def _writer_run_dir(env: DistEnv, mine: str) -> str:
    """Every rank works in the writer's run directory (node 0's ``-o``); multi-node runs say so on every node.

    The other nodes read it too (checkpoints on resume; shards under FSDP), so across machines it must
    be on a filesystem they share, at the same path.
    """
    import socket

    run_dir, host = from_writer(env, (mine, socket.gethostname()))
    if env.local_rank == 0 and int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1) > 1:
        node = os.environ.get("STRFX_NODE_RANK")
        here = f"node rank {node}" if node is not None else "this node"
        print(f"{here}: the run's outputs go to {host}:{run_dir} (written by node 0, global rank {env.writer})",
              flush=True)
    return run_dir


def _convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` for every BatchNorm that carries no STR parametrization
    (converting an STR-BN would replace its parametrized γ/β with plain copies)."""
    from torch.nn.utils import parametrize

    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not parametrize.is_parametrized(module):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        new = _convert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _one_line(err: BaseException) -> str:
    """An exception as one short line (gloo prefixes its messages with a source location)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    text = re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")
    return f"{type(err).__name__}: {text}"


def _peer_died(err: BaseException) -> bool:
    """gloo/nccl errors a worker raises because another worker of the group died."""
    text = str(err)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "remote worker crashing"))


class WarmupCosine:
    """lr factor per step: linear warm-up, then cosine to 0. A class (not a lambda) so LambdaLR saves it."""

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup_steps, self.total_steps = int(warmup_steps), max(int(total_steps), 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        p = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class _Log:
    """Rank-0 output: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, env: DistEnv, progress: bool | None):
        from strfx._table import make_console

        self.console = make_console()
        self.on = env.is_main
        self.bar = self.on and (self.console.is_terminal if progress is None else progress)

    def print(self, msg: str) -> None:
        if self.on:
            self.console.print(msg, highlight=False, soft_wrap=True)

    def epoch_progress(self, epoch: int, epochs: int, steps: int) -> Any:
        if not self.bar:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        prog = Progress(TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console, transient=True)
        prog.start()
        prog.add_task("train", total=steps, info="")
        return prog


class Trainer:
    """STR training of one job on this process (one of ``env.world_size``)."""

    def __init__(self, job: Job, env: DistEnv):
        from strfx.api import param_groups, sparsify
        from strfx.report import report

        self.job, self.env = job, env
        self.cfg = StrfxConfig.model_validate(job.config)
        self.tc: TrainConfig = self.cfg.train or TrainConfig()
        self.run_dir = Path(job.run_dir)
        self.mode = self.cfg.sparsify.mode
        self.log = _Log(env, job.progress)
        tc = self.tc
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(tc.seed)  # same initial weights on every rank
        random.seed(tc.seed)
        np.random.seed(tc.seed)

        self.loaded = load_model(job.model)
        if tc.init:
            load_init(self.loaded, tc.init)
        self.example_inputs = tuple(self.loaded.example_inputs)
        gm = sparsify(self.loaded.model, config=self.cfg.sparsify, example_inputs=self.example_inputs)
        self.before = report(gm, self.example_inputs, name=self.loaded.name)  # dense params/FLOPs
        self.gm = gm

        dev = env.device
        self.cuda = dev.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if (tc.precision == "bf16" or (tc.precision == "auto" and self.cuda)) else None
        four_d = bool(self.example_inputs) and self.example_inputs[0].dim() == 4
        self.channels_last = tc.channels_last if tc.channels_last is not None else (self.cuda and four_d)
        if tc.sync_batchnorm and env.distributed:
            gm = _convert_sync_batchnorm(gm)
        # FSDP: shard before the optimizer sees the parameters. The writer keeps an unsharded CPU copy
        # (self.view), refreshed from the shards (gather_full_state) for the controller's meter, metrics,
        # the report, weights.pt and export; under DDP and in one process the view is the model itself.
        self.fsdp = tc.strategy == "fsdp" and env.distributed
        self.view: nn.Module | None = gm
        self.view_device = dev
        if self.fsdp:
            import copy

            self.view = copy.deepcopy(gm) if env.is_main else None  # still on the CPU: no second copy on the GPU
            self.view_device = torch.device("cpu")
        gm.to(dev)
        if self.channels_last:
            gm.to(memory_format=torch.channels_last)
        self.gm = gm
        if self.fsdp:
            self.fsdp_units = shard_model(gm, tc.fsdp, env)
        self.meter = SparsityMeter(self.view, self.mode, tuple(t.to(self.view_device) for t in self.example_inputs),
                                   metric=tc.target_metric) \
            if self.view is not None else None
        self.data = load_data(job.data, self.loaded.hook("datasets"),
                              image_size=tuple(self.example_inputs[0].shape[-2:]) if four_d else (224, 224),
                              channels=self.example_inputs[0].shape[1] if four_d else 3, model_file=self.loaded.spec)
        self.per_rank_batch = tc.batch_size // env.world_size
        self.train_loader, self.train_sampler = self._train_loader()
        self.val_loader = self._val_loader()
        self.steps_per_epoch = len(self.train_loader)
        if tc.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, tc.max_steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.data.source}: no full batch of {self.per_rank_batch} per process; lower train.batch_size")
        self.total_steps = self.steps_per_epoch * tc.epochs
        # train.rewind ramp: the run is the search phase of one schedule that the retraining completes, so its
        # cosine spans both (the search happens at a still high lr; the retraining restarts at the peak)
        retrain = self.steps_per_epoch * job.finetune_epochs if tc.rewind == "ramp" else 0
        self.schedule_steps = self.total_steps + retrain

        self.optimizer = torch.optim.SGD(
            param_groups(gm, tc.weight_decay, tc.threshold_decay, tc.norm_decay),
            lr=tc.peak_lr(), momentum=tc.momentum, nesterov=tc.nesterov)
        warmup = int(round(tc.warmup_epochs_for() * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(warmup, self.schedule_steps))
        self.scaler = torch.amp.GradScaler(dev.type, enabled=False)  # bf16 needs no loss scaling; kept for fp16 forks
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
        self.controller: ThresholdDecayController | None = None
        thr_group = self._group("thresholds")
        if tc.target_sparsity is not None:
            if thr_group is None:
                raise TrainError("--target-sparsity needs STR thresholds in the model, and there are none")
            self.controller = ThresholdDecayController(tc.target_sparsity, self.total_steps, tc.controller,
                                                       thr_group["weight_decay"], tc.momentum, mode=self.mode)

        # train.rewind: the state the fine-tuned model is cut from, saved after this many optimizer steps
        self.rewind_step: int | None = None
        if tc.rewind in ("start", "ramp"):  # prepare() resolved "auto"
            self.rewind_step = 0 if tc.rewind == "start" else math.ceil(tc.controller.ramp_start * self.total_steps)

        self.model: nn.Module = gm
        if env.distributed and not self.fsdp:  # FSDP2 modules reduce their own gradients
            self.model = nn.parallel.DistributedDataParallel(gm, device_ids=[dev.index] if self.cuda else None)
        if tc.compile:
            self.model = torch.compile(self.model)
        self.start_epoch, self.step = 0, 0
        self.tb = None

    # ---------------------------------------------------------------------------------------- data
    def _train_loader(self) -> tuple[DataLoader, DistributedSampler]:
        tc, env, d = self.tc, self.env, self.data
        sampler = DistributedSampler(d.train, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=tc.seed)
        workers = tc.workers if tc.workers is not None else (4 if self.cuda else (0 if d.batched else 2))
        common: dict[str, Any] = {"num_workers": workers, "pin_memory": self.cuda, "persistent_workers": False}
        if d.batched:  # whole batches straight from the in-memory arrays
            loader = DataLoader(d.train, sampler=BatchSampler(sampler, self.per_rank_batch, drop_last=True),
                                batch_size=None, **common)
        else:
            loader = DataLoader(d.train, sampler=sampler, batch_size=self.per_rank_batch, drop_last=True, **common)
        return loader, sampler

    def _val_loader(self) -> DataLoader:
        env, d = self.env, self.data
        indices = list(range(env.rank, len(d.val), env.world_size))  # no padding: every image counted once
        bs = max(self.per_rank_batch, 256)
        workers = self.tc.workers if self.tc.workers is not None else (4 if self.cuda else (0 if d.batched else 2))
        if d.batched:
            return DataLoader(d.val, sampler=BatchSampler(indices, bs, drop_last=False), batch_size=None,
                              num_workers=workers, pin_memory=self.cuda)
        return DataLoader(Subset(d.val, indices), batch_size=bs, num_workers=workers, pin_memory=self.cuda)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.env.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.env.device, non_blocking=True)

    def _group(self, name: str) -> dict[str, Any] | None:
        return next((g for g in self.optimizer.param_groups if g.get("name") == name), None)

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def _allreduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.env.device)
        if self.env.distributed:
            dist.all_reduce(t)
        return t.tolist()

    # ---------------------------------------------------------------------------------- checkpoints
    def _checkpoint_path(self, epoch: int) -> Path:
        return checkpoint_path(self.run_dir, epoch, sharded=self.tc.strategy == "fsdp")

    def save_checkpoint(self, epoch: int) -> None:
        from strfx.checkpoint import prune, save_sharded

        rng = _rng_state()
        per_rank = [rng["torch"]]
        if self.env.distributed:  # every rank's torch RNG, so a resumed worker continues its own stream
            per_rank = [None] * self.env.world_size
            dist.all_gather_object(per_rank, rng["torch"])
        rng["torch_per_rank"] = per_rank
        sharded = self.tc.strategy == "fsdp"
        if not (self.env.is_main or sharded):
            return
        state = {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": self.step, "world_size": self.env.world_size,
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "controller": {**self.controller.state_dict(), "meter": self.meter.state_dict()}
            if self.controller and self.meter is not None else {},
            "rng": rng, "config": json.dumps(self.cfg.model_dump(mode="json"), sort_keys=True),
        }
        (self.run_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)
        if sharded:  # torch.distributed.checkpoint: every rank writes its shards (also in one process)
            save_sharded(self._checkpoint_path(epoch), self.gm, self.optimizer, state, self.env.is_main)
        else:
            state |= {"model": self.gm.state_dict(), "optimizer": self.optimizer.state_dict()}
            atomic_torch_save(state, self._checkpoint_path(epoch))
        if self.env.is_main:
            prune(self.run_dir, self.tc.keep_checkpoints)

    def maybe_resume(self) -> None:
        """Continue from the newest checkpoint when asked to, or after a torchrun restart."""
        from strfx.checkpoint import load_sharded, remove_leftovers

        if not (self.job.resume or self.env.restart_count > 0):
            return
        if self.env.is_main:  # leftovers of a save that was killed half-way
            remove_leftovers(self.run_dir)
        if self.env.distributed:
            dist.barrier()
        latest = _latest_checkpoint(self.run_dir)
        if latest is None:
            self.log.print("no checkpoint yet: starting at epoch 1")
            return
        ckpt = load_checkpoint(latest, self.cfg)
        try:
            if latest.is_dir():  # sharded (DCP): resharded to this run's world size as it loads
                load_sharded(latest, self.gm, self.optimizer)
            else:
                self.gm.load_state_dict(ckpt["model"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {latest} does not fit this model: {str(err).splitlines()[0]}; "
                                  f"start over with --force") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        schedule = self.scheduler.lr_lambdas[0]
        extended = isinstance(schedule, WarmupCosine) and schedule.total_steps != self.schedule_steps
        if extended:  # --resume --epochs N: same warm-up, the cosine stretched over the longer run
            schedule.total_steps = self.schedule_steps
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.controller and ckpt["controller"]:
            state = dict(ckpt["controller"])
            meter_state = state.pop("meter", None)
            if meter_state is not None and self.meter is not None:
                self.meter.load_state_dict(meter_state)
            self.controller.load_state_dict(state)
        rng = ckpt["rng"]
        if ckpt["world_size"] == self.env.world_size:
            rng["torch"] = rng["torch_per_rank"][self.env.rank]
            _set_rng_state(rng)
        else:
            torch.manual_seed(self.tc.seed + 1000 * ckpt["epoch"] + self.env.rank)
        self.start_epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        if self.env.is_main:
            self._truncate_metrics(self.start_epoch)
        self.log.print(f"resumed from {latest} (epoch {self.start_epoch}/{self.tc.epochs} done"
                       + (f", written by {ckpt['world_size']} process(es), now {self.env.world_size}"
                          if ckpt["world_size"] != self.env.world_size else "") + ")"
                       + (f"; extended to {self.tc.epochs} epochs: the cosine learning-rate schedule is stretched over "
                          f"{self.total_steps} steps, so lr rises again to {self.scheduler.lr_lambdas[0](self.step) * self.tc.peak_lr():.4g}"
                          if extended else ""))

    def _truncate_metrics(self, epochs_done: int) -> None:
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= epochs_done]
        atomic_write(path, "".join(ln + "\n" for ln in lines))

    # ------------------------------------------------------------------------------------- training
    def _controller_step(self) -> None:
        if self.controller is not None:  # FSDP: measured on the writer's view, the same on every rank
            steer(self.optimizer, self.controller, self._measure, self.step, self.mode,
                  self._broadcast if self.env.distributed else None)

    def _broadcast(self, value: float) -> float:
        """Rank 0's value (the decay is identical on every rank already; this guards against float drift)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.env.device)
        dist.broadcast(t, 0)
        return float(t.item())

    def _sync_view(self) -> None:
        """FSDP: copy the current (gathered) weights into the writer's unsharded view. Collective."""
        if self.fsdp:
            state = gather_full_state(self.gm, self.env)
            if self.view is not None and state is not None:
                self.view.load_state_dict(state)

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        """FSDP: the writer's buffers (BatchNorm running statistics) on every rank, as DDP keeps them.

        DDP broadcasts rank 0's buffers before every forward; FSDP leaves each rank its own, so without
        this the ranks would evaluate with different statistics than the ones saved and exported.
        """
        if self.fsdp:
            for buf in self.gm.buffers():
                dist.broadcast(buf, src=self.env.writer)

    def _save_rewind_state(self) -> None:
        """train.rewind: the weights the fine-tuned model will be cut from (all ranks: FSDP gathers them)."""
        self._sync_view()
        if self.env.is_main:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.view.state_dict().items()}
            atomic_torch_save(state, self.run_dir / REWIND_FILE)

    def _measure(self) -> float:
        """What --target-sparsity steers, the same on every rank (FSDP: measured on the writer's view)."""
        if not self.fsdp:
            return self.meter()
        self._sync_view()
        return float(from_writer(self.env, self.meter() if self.meter is not None else None))

    def _diverged(self, epoch: int, i: int, what: str) -> TrainError:
        """One line: where the run diverged, what went non-finite, what to change, what is kept."""
        last = _latest_checkpoint(self.run_dir)
        kept = (f"the last good checkpoint {last} is kept (--resume continues from it with the run's settings)"
                if last is not None else "no checkpoint was written yet")
        return TrainError(f"training diverged at epoch {epoch + 1}, step {i + 1}/{self.steps_per_epoch}: {what}; "
                          f"lower the learning rate (--lr, now {self.tc.peak_lr():g}) or set "
                          f"train.grad_clip_norm (now {self.tc.grad_clip_norm}) and start again with --force; {kept}")

    def _clip_and_check(self, loss: torch.Tensor, epoch: int, i: int) -> None:
        """Clip the gradient norm (``train.grad_clip_norm``) and refuse a non-finite loss or gradient.

        The gradient norm is needed for clipping anyway; the check costs one host sync per step. DDP has
        already averaged the gradients, so every rank sees the same norm and stops at the same step.
        """
        params = [p for p in self.gm.parameters() if p.grad is not None]
        # FSDP: sharded gradients (DTensors) and the replicated ones of STR vectors spanning blocks
        # (strfx.distributed.shared_str_params) are normed apart, then combined
        parts = [[p for p in params if hasattr(p.grad, "full_tensor") == sharded] for sharded in (True, False)]
        norms = []
        for part in parts:
            if part:
                n = torch.nn.utils.get_total_norm([p.grad for p in part])
                norms.append((n.full_tensor() if hasattr(n, "full_tensor") else n).float().to(loss.device))
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=loss.device)
        if bool(torch.isfinite(torch.stack([loss.detach().float(), norm.float()])).all()):
            if self.tc.grad_clip_norm:
                for part in parts:
                    if part:
                        torch.nn.utils.clip_grads_with_norm_(part, self.tc.grad_clip_norm, norm)
            return
        if not bool(torch.isfinite(loss.detach()).all()):
            raise self._diverged(epoch, i, f"the loss is {float(loss.detach()):g}")
        name = next((n for n, p in self.gm.named_parameters()
                     if p.grad is not None and not bool(torch.isfinite(local(p.grad)).all())), "a parameter")
        raise self._diverged(epoch, i, f"the gradient of {name} is not finite")

    @torch.no_grad()
    def _check_str_params(self, epoch: int, i: int) -> None:
        """Thresholds and STR-BN γ/gates must stay finite (a NaN threshold would fail deep inside the forward)."""
        params = [p for g in self.optimizer.param_groups if g.get("name") in ("thresholds", "norms") for p in g["params"]]
        if not params:
            return
        finite = torch.isfinite(torch.stack([local(p).sum() for p in params])).all().to(torch.float32)
        if self.fsdp:  # each rank sees its own shards: all must agree before anyone stops
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if bool(finite):
            return
        names = {id(p): n for n, p in self.gm.named_parameters()}
        bad = next((names.get(id(p), "an STR parameter") for p in params if not bool(torch.isfinite(local(p)).all())),
                   "an STR parameter on another rank")
        raise self._diverged(epoch, i, f"the STR parameter {bad} became non-finite after the update")

    def _plain_progress(self, epoch: int, i: int, loss: torch.Tensor, t_epoch: float) -> None:
        """Without a progress bar (piped output), a plain line every ``log_every_steps`` or ``log_every_seconds``."""
        if not self.log.on or i + 1 >= self.steps_per_epoch:  # the epoch line follows anyway
            return
        now = time.monotonic()
        every = self.tc.log_every_steps
        if not ((every and (i + 1) % every == 0) or now - self._last_line >= self.tc.log_every_seconds):
            return
        self._last_line = now
        self.log.print(f"epoch {epoch + 1}/{self.tc.epochs} step {i + 1}/{self.steps_per_epoch}: loss {loss.item():.4f}"
                       f" · lr {self.scheduler.get_last_lr()[0]:.4g} · {now - t_epoch:.0f}s")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        self.train_sampler.set_epoch(epoch)
        prog = self.log.epoch_progress(epoch + 1, self.tc.epochs, self.steps_per_epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.env.device)
        seen = 0
        t_epoch = self._last_line = time.monotonic()
        try:
            for i, (x, y) in enumerate(self.train_loader):
                if i >= self.steps_per_epoch:
                    break
                maybe_inject_fault(self.env, epoch + 1, i)
                x, y = self._to_device(x, y)
                with self._autocast():
                    out = self.model(x)
                    loss = self.loss_fn(out.float(), y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self._clip_and_check(loss, epoch, i)  # raises before a non-finite update is applied
                self.optimizer.step()
                self._check_str_params(epoch, i)
                self.scheduler.step()
                self.step += 1
                if self.step == self.rewind_step:
                    self._save_rewind_state()
                self._controller_step()
                loss_sum += loss.detach().double() * len(y)
                correct += (out.detach().argmax(1) == y).sum().double()
                seen += len(y)
                if prog is not None:
                    prog.update(0, advance=1, info=f"loss {loss.item():.3f}")
                else:
                    self._plain_progress(epoch, i, loss, t_epoch)
        finally:
            if prog is not None:
                prog.stop()
        total_loss, total_correct, total = self._allreduce([loss_sum.item(), correct.item(), float(seen)])
        return {"train_loss": total_loss / max(total, 1), "train_top1": total_correct / max(total, 1)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.gm.eval()
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        loss_sum, correct, seen = 0.0, 0.0, 0
        batches = len(self.val_loader)
        for x, y in self.val_loader:
            x, y = self._to_device(x, y)
            with self._autocast():
                out = self.gm(x).float()
            loss_sum += float(loss_fn(out, y))
            correct += float((out.argmax(1) == y).sum())
            seen += len(y)
        if self.fsdp:  # every FSDP forward is collective: a rank with fewer batches runs idle ones
            most = torch.tensor([batches], device=self.env.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            for _ in range(int(most) - batches):
                with self._autocast():
                    self.gm(*(t.to(self.env.device) for t in self.example_inputs))
        self.gm.train()
        loss_sum, correct, total = self._allreduce([loss_sum, correct, float(seen)])
        return {"val_loss": loss_sum / max(total, 1), "val_top1": correct / max(total, 1)}

    def _report(self) -> Any:
        from strfx.report import report

        inputs = tuple(t.to(self.view_device) for t in self.example_inputs)
        return report(self.view, inputs, name=self.loaded.name)

    def _metrics(self, epoch: int, stats: dict[str, float], seconds: float) -> dict[str, Any]:
        rep = self._report()
        flops_removed = 1 - _flops_after(rep) / rep.dense_flops if rep.dense_flops else None
        row: dict[str, Any] = {"epoch": epoch, "step": self.step, "lr": self.scheduler.get_last_lr()[0], **stats,
                               "sparsity": rep.sparsity, "flops_removed": flops_removed,
                               "controlled": self.meter(),  # what --target-sparsity steers (strfx.controller)
                               "nonzero_params": rep.nonzero_params, "seconds": round(seconds, 3)}
        if self.controller is not None:
            row["target_now"] = self.controller.schedule(self.step)
            row["threshold_decay"] = self.controller.decay
        row["layers"] = {lr.name: {"sparsity": lr.sparsity, "threshold": lr.threshold} for lr in rep.layers}
        return row

    def _log_epoch(self, row: dict[str, Any]) -> None:
        target = f" (target {self.tc.target_sparsity:.0%})" if self.tc.target_sparsity else ""
        measure = row["controlled"]
        what = self.meter.what
        self.log.print(f"epoch {row['epoch']}/{self.tc.epochs}: loss {row['train_loss']:.4f} · "
                       f"train top-1 {row['train_top1']:.2%} · val top-1 {row['val_top1']:.2%} · "
                       f"{what} {measure:.2%}{target} · lr {row['lr']:.4g} · {row['seconds']:.1f}s")

    def _tensorboard(self, row: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        if self.tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: metrics.jsonl is the record
                self.tb = False
                return
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if self.tb:
            for key, value in row.items():
                if isinstance(value, (int, float)) and value is not None and key != "epoch":
                    self.tb.add_scalar(key, value, row["epoch"])
            self.tb.flush()

    def fit(self) -> None:
        self.maybe_resume()
        tc = self.tc
        if self.start_epoch == 0:
            self.log.print(f"training {self.loaded.name} ({self.cfg.sparsify.label} STR) on {self.data.source}: {tc.epochs} epochs × "
                           f"{self.steps_per_epoch} steps, global batch {tc.batch_size} on {self.env.world_size} "
                           f"process(es) on {self.env.device.type}, lr {tc.peak_lr():g}"
                           + (f"; FSDP: {len(self.fsdp_units)} sharded block(s) + the root" if self.fsdp else ""))
        if self.step == self.rewind_step:
            self._save_rewind_state()
        stats: dict[str, float] = {}
        for epoch in range(self.start_epoch, tc.epochs):
            t0 = time.perf_counter()
            stats = self.train_epoch(epoch)
            self._sync_buffers()
            stats |= self.evaluate()
            last = epoch + 1 == tc.epochs
            self._sync_view()
            if self.env.is_main:  # metrics first: a resume drops lines past its checkpoint, so none is lost
                row = self._metrics(epoch + 1, stats, time.perf_counter() - t0)
                with open(self.run_dir / METRICS_FILE, "a") as f:
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                self._log_epoch(row)
                self._tensorboard(row)
            if (epoch + 1) % tc.checkpoint_every == 0 or last:
                self.save_checkpoint(epoch + 1)
        if self.tb:
            self.tb.close()
        if not stats:  # resumed a run whose epochs were all done: measure it again (all ranks take part)
            stats = self.evaluate()
        stats["ranks_max_param_diff"] = self.rank_divergence()
        self._sync_view()
        if self.env.is_main:
            self.finish(stats)

    @torch.no_grad()
    def rank_divergence(self) -> float:
        """Largest difference between any rank's parameters and rank 0's (DDP must keep it 0)."""
        if not self.env.distributed or self.fsdp:  # FSDP: each element lives on one rank only
            return 0.0
        flat = torch.cat([p.detach().double().flatten() for p in self.gm.parameters()])
        mine = flat.to(self.env.device)
        theirs = mine.clone()
        dist.broadcast(theirs, 0)
        diff = (mine - theirs).abs().max()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return float(diff)

    # -------------------------------------------------------------------------------- end of run
    def finish(self, final: dict[str, float]) -> None:
        from strfx.plot import plot_budget

        rep = self._report()
        atomic_torch_save(self.view.state_dict(), self.run_dir / WEIGHTS_FILE)
        atomic_write(self.run_dir / REPORT_FILE, rep.model_dump_json(indent=2))
        plot_budget(rep, self.run_dir / PLOT_FILE, title=f"{self.loaded.name} · {self.cfg.sparsify.label} STR · layer-wise sparsity")
        b = self.before
        summary: dict[str, Any] = {
            "model": self.loaded.name, "mode": self.mode, "epochs": self.tc.epochs, "data": self.data.source,
            "val_top1": final["val_top1"], "sparsity": rep.sparsity,
            "flops_removed": 1 - _flops_after(rep) / rep.dense_flops if rep.dense_flops else None,
            "controlled": self.meter(), "target_sparsity": self.tc.target_sparsity,
            "target_metric": self.meter.what, "world_size": self.env.world_size,
            "ranks_max_param_diff": final.get("ranks_max_param_diff", 0.0),
            "params_before": b.params, "params_nonzero_after": rep.nonzero_params,
            "str_elements": rep.elements, "str_zeros": rep.zeros,
            "flops_before": b.dense_flops, "flops_after": _flops_after(rep),
        }
        contract = input_contract(self.data, self.example_inputs, self.num_classes())
        atomic_write(self.run_dir / CONTRACT_FILE, contract.model_dump_json(indent=2))
        summary["input_contract"] = contract.model_dump(mode="json")
        summary["warnings"] = self._warnings(summary)
        if self.job.export:
            summary["export"] = self.export(contract)
        if self.job.finetune_epochs:
            summary["finetune"] = self.finetune(contract)
        atomic_write(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
        self.print_summary(summary)

    @torch.no_grad()
    def num_classes(self) -> int:
        """Classes of the data, else the model's output width (a model file's datasets() may not say)."""
        if self.data.num_classes:
            return int(self.data.num_classes)
        was = self.view.training
        self.view.eval()
        try:
            return int(self.view(*(t.to(self.view_device) for t in self.example_inputs)).shape[-1])
        finally:
            self.view.train(was)

    #: A run whose sparsity ends further than this from --target-sparsity says so (fraction, i.e. 5 points).
    TARGET_TOLERANCE = 0.05

    def _warnings(self, s: dict[str, Any]) -> list[str]:
        """What the user must not miss: a model that learned nothing, a target that was not reached."""
        out = []
        n = self.num_classes()
        if n and n > 1 and s["val_top1"] < 1.5 / n:
            out.append(f"val top-1 {s['val_top1']:.2%} is at chance level ({1 / n:.2%} for {n} classes): the model "
                       f"did not learn; lower the learning rate (--lr, now {self.tc.peak_lr():g}) or train longer")
        target = s["target_sparsity"]
        if target is not None and abs(s["controlled"] - target) > self.TARGET_TOLERANCE:
            what = f"of {self.meter.what}"
            out.append(f"sparsity ended at {s['controlled']:.2%} {what}, {abs(s['controlled'] - target) * 100:.1f} "
                       f"points from the target {target:.0%}: {self.total_steps} optimizer steps were too few for "
                       f"the controller; train for more steps (--epochs, or a smaller --batch-size)")
        return out

    def export(self, contract: InputContract | None = None) -> dict[str, Any]:
        """Shrink away the dead channels and export ONNX (+ .pt2), each verified against the trained model;
        the input contract goes into the ONNX metadata. Keeps the shrunk model for ``--finetune-epochs``."""
        from strfx.deploy import shrink_and_export

        summary, self.shrunk = shrink_and_export(self.view, self.example_inputs, self.run_dir, force=True,
                                                 metadata=contract.metadata() if contract is not None else None)
        return summary

    def rewound(self) -> tuple[nn.Module, dict[str, Any]]:
        """train.rewind: STR's dead units (or weights) cut from the saved earlier state (strfx.rewind), shrunk."""
        from strfx.api import deepcopy_model
        from strfx.rewind import rewind
        from strfx.surgery import shrink

        path = self.run_dir / REWIND_FILE
        if not path.is_file():
            raise TrainError(f"{path} is missing (train.rewind {self.tc.rewind!r} saves it after step {self.rewind_step}); "
                             f"start the run again with --force")
        state = load_tensors(path, "the rewind state", "start the run again with --force")
        model = deepcopy_model(self.view).to("cpu", memory_format=torch.contiguous_format).eval()
        info = rewind(model, state)  # the dead sets are read off the trained copy before it loads the state
        small = shrink(model, tuple(t.cpu() for t in self.example_inputs))
        return small, {"to": self.tc.rewind, "step": self.rewind_step, **info,
                       "shrink_max_error": small.strfx_shrink["max_error"],
                       "shrink_max_error64": small.strfx_shrink["max_error64"]}

    def finetune(self, contract: InputContract) -> dict[str, Any]:
        """``--finetune-epochs``: plain training of the shrunk model, then its own export (strfx.finetune).

        With train.rewind the model trained is cut from the earlier weights: it is trained like the run (its
        peak lr, its warm-up fraction), not fine-tuned at a tenth of it."""
        from strfx.finetune import finetune_and_export

        tc = self.tc
        model, rewind_info, warmup = self.shrunk, None, 0.0
        if tc.rewind in ("start", "ramp"):
            model, rewind_info = self.rewound()
            # from the initialisation: warm up like the run; from trained weights (ramp): restart at the peak
            warmup = tc.warmup_epochs_for() / tc.epochs if tc.rewind == "start" else 0.0
            self.log.print(f"rewound to the weights after step {self.rewind_step} ({tc.rewind}): "
                           f"{rewind_info['dead']} of {rewind_info['entries']} STR entries kept dead")
        lr = self.job.finetune_lr or (tc.peak_lr() if rewind_info else tc.peak_lr() / 10)
        what = "rewound, shrunk model" if rewind_info else "shrunk model"
        self.log.print(f"fine-tuning the {what} for {self.job.finetune_epochs} epochs (plain SGD, lr {lr:g})")
        summary = finetune_and_export(
            model, self.data, self.example_inputs, self.run_dir, contract, epochs=self.job.finetune_epochs,
            lr=lr, device=self.env.device, log=self.log.print, batch_size=tc.batch_size, momentum=tc.momentum,
            weight_decay=tc.weight_decay, label_smoothing=tc.label_smoothing, grad_clip_norm=tc.grad_clip_norm,
            seed=tc.seed, max_steps_per_epoch=tc.max_steps_per_epoch, keep_zeros=self.mode == "unstructured",
            warmup_fraction=warmup)
        if rewind_info:
            summary["rewind"] = rewind_info
        return summary

    @staticmethod
    def _show(path: str | Path) -> str:
        """A path as the user would type it: relative to the working directory when inside it."""
        try:
            return str(Path(path).resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(path)

    def print_summary(self, s: dict[str, Any]) -> None:
        what = "of STR weights are zero" if self.mode == "unstructured" else f"of {self.meter.what}"
        measure = s["controlled"]
        target = f" (target {s['target_sparsity']:.0%})" if s["target_sparsity"] else ""
        elements = "weights" if self.mode == "unstructured" else "channels"
        lines = [
            f"[bold]done[/]: {s['model']} {self.cfg.sparsify.label} STR, {s['epochs']} epochs on {s['data']}",
            f"  accuracy   val top-1 {s['val_top1']:.2%}",
            f"  sparsity   {measure:.2%} {what}{target}"
            + (f"; {s['str_zeros']:,} of {s['str_elements']:,} STR {elements} zero ({s['sparsity']:.2%})"
               if self.mode == "structured" else ""),
        ]
        if self.mode == "unstructured":
            lines.append(f"  params     {s['params_before']:,} → {s['params_nonzero_after']:,} non-zero")
        if s["flops_before"]:
            lines.append(f"  FLOPs      {s['flops_before'] / 1e6:,.2f}M → {s['flops_after'] / 1e6:,.2f}M effective "
                         f"({s['flops_before'] / max(s['flops_after'], 1):.2f}×, on the example inputs"
                         + (", dead channels removed" if self.mode == "structured" else "") + ")")
        ex = s.get("export")
        if ex:
            cut = (f"{ex['channels_removed']:,} of {s['str_elements']:,} STR channels removed" if self.mode == "structured"
                   else f"{ex['channels_removed']:,} channels removed whole (every weight of theirs zero)")
            lines.append(f"  shrink     {cut}: params "
                         f"{ex['params_before']:,} → {ex['params_after']:,}"
                         + (f", FLOPs {ex['flops_before'] / 1e6:,.2f}M → {ex['flops_after'] / 1e6:,.2f}M"
                            if ex["flops_before"] and ex["flops_after"] else ""))
            checks = f"ORT vs torch {ex['onnx_max_error']:.2g}, shrunk vs trained {ex['shrink_max_error']:.2g}"
            if ex["pt2_max_error"] is not None:
                checks += f", .pt2 vs torch {ex['pt2_max_error']:.2g}"
            lines.append(f"  export     {self._show(ex['onnx'])} ({ex['exporter']}) · max relative error {checks} "
                         f"(≤ {ex['tolerance']:g}) [green]OK[/]")
        ft = s.get("finetune")
        if ft:
            what = "the shrunk model"
            if ft.get("rewind"):
                what = f"STR's units cut from the weights of step {ft['rewind']['step']} (rewind {ft['rewind']['to']})"
            lines.append(f"  finetune   {ft['epochs']} epochs of {what} (lr {ft['lr']:g}): val top-1 "
                         f"{ft['val_top1_before']:.2%} → {ft['val_top1']:.2%} · {self._show(ft['onnx'])} "
                         f"(ORT vs torch {ft['onnx_max_error']:.2g})")
        if s.get("input_contract"):
            lines.append(f"  input      {InputContract.model_validate(s['input_contract']).describe()}")
        lines += [f"  [bold yellow]warning[/]    {w}" for w in s.get("warnings", [])]
        lines.append(f"  plot       {self._show(self.run_dir / PLOT_FILE)} (layer-wise sparsity STR learned)")
        lines.append(f"  wrote      {self._show(self.run_dir)}/ (weights.pt, report.json, summary.json, input_contract.json, metrics.jsonl, checkpoints/)")
        for ln in lines:
            self.log.print(ln)
