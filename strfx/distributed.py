"""Processes for ``strfx train``: one in-process worker, or many through torchrun's elastic agent.

Why torchrun (``torch.distributed.run``) and no launcher of our own: its elastic agent already
does rendezvous (``--standalone`` on one machine, c10d endpoints across machines), starts one
worker per process slot, watches them, and on a worker's death tears the group down and restarts
all of them up to ``--max-restarts`` times. A restarted worker sees
``TORCHELASTIC_RESTART_COUNT > 0`` and resumes from the newest checkpoint (strfx.train).

Workers run ``python -m strfx.distributed JOB`` where JOB is the JSON of the already validated
job (config resolved, run directory created), so they never re-decide anything.

Clean shutdown matters: a gloo process that exits with its process group alive aborts now and
then ("terminate called without an active exception"), so :func:`shutdown` always runs a final
barrier and ``destroy_process_group``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from strfx.errors import StrfxError, TrainError

FAULT_ENV = "STRFX_FAULT_INJECT"
DEBUG_ENV = "STRFX_DEBUG"  # set by `strfx --debug`: workers print full tracebacks, torchrun logs stay on


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join the process group torchrun set up (env://), or describe a lone process."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv(device=torch.device("cuda" if cuda else "cpu"), restart_count=restart)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10),
                            **({"device_id": device} if cuda else {}))
    return DistEnv(rank, world, local_rank, device, True, restart)


def shutdown(env: DistEnv) -> None:
    """Leave the process group explicitly (see the module docstring)."""
    if env.distributed and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def maybe_inject_fault(env: DistEnv, epoch: int, step: int) -> None:
    """Test hook: ``STRFX_FAULT_INJECT=rank:epoch:step`` SIGKILLs that worker at that point.

    Used by the fault-tolerance tests to kill a worker mid-epoch, for real and reproducibly. Only on
    the first attempt (restart count 0), so torchrun's restart can then finish the run.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec or env.restart_count > 0:
        return
    rank, ep, st = (int(v) for v in spec.split(":"))
    if (env.rank, epoch, step) == (rank, ep, st):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class LaunchOptions:
    """The torchrun options ``strfx train`` passes through."""

    nproc_per_node: int = 1
    nnodes: str = "1"
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_backend: str = "c10d"
    rdzv_id: str | None = None
    max_restarts: int = 0

    def world_size(self) -> int | None:
        """Total processes, when fixed (``--nnodes 2``, not an elastic ``1:4`` range)."""
        try:
            return int(self.nnodes) * self.nproc_per_node
        except ValueError:
            return None

    def argv(self) -> list[str]:
        args = ["--nproc-per-node", str(self.nproc_per_node), "--nnodes", self.nnodes,
                "--max-restarts", str(self.max_restarts), "--monitor-interval", "0.1"]
        if self.rdzv_endpoint:
            args += ["--rdzv-backend", self.rdzv_backend, "--rdzv-endpoint", self.rdzv_endpoint,
                     "--rdzv-id", self.rdzv_id or "strfx"]
            if self.node_rank is not None:
                args += ["--node-rank", str(self.node_rank)]
        elif self.nnodes not in ("1", "1:1"):
            raise TrainError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node)")
        else:
            args += ["--standalone"]
        return args


def launch(job: dict[str, Any], options: LaunchOptions) -> None:
    """Run the job on ``options.nproc_per_node`` local workers through torch.distributed.run."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    argv = options.argv() + ["--module", "strfx.distributed", json.dumps(job)]
    args = get_args_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for >1 process, minus its warning
    # By default the workers share the agent's rendezvous TCPStore across restarts without a per-attempt
    # key prefix, so a restarted gloo group can read the dead worker's address and fail with "Connection
    # refused" (seen here on the first restart). Opting out gives every attempt a fresh store.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    quiet = not os.environ.get(DEBUG_ENV)
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    if quiet:  # torchrun logs every worker exit and SIGTERM it sends; strfx says what matters in one line
        elastic_log.setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as err:
        raise TrainError(failure_line(err.failures, options.max_restarts)) from None
    finally:
        elastic_log.setLevel(level)


def failure_line(failures: dict[int, Any], max_restarts: int) -> str:
    """Name the worker that caused the failure, and why, in one line.

    When one worker dies, torchrun records its peers as failed too (gloo raises "connection closed"
    in them, or the agent terminates them), so the lowest failed rank is usually a bystander. The
    cause is a worker killed by a signal if there is one, else the worker that failed first.
    """
    def key(item: tuple[int, Any]) -> tuple[int, float, int]:
        rank, f = item
        return (0 if f.exitcode is not None and f.exitcode < 0 else 1, float(f.timestamp or 0), rank)

    rank, f = min(failures.items(), key=key)
    if f.exitcode is not None and f.exitcode < 0:
        why = f"was killed by {f.signal_name()} (exit code {f.exitcode}; out of memory, or killed from outside)"
    elif f.exitcode == 2:
        why = "stopped with the error printed above"
    else:
        why = f"failed (exit code {f.exitcode}; its error is printed above)"
    others = sorted(r for r in failures if r != rank)
    peers = f"; rank(s) {', '.join(map(str, others))} stopped because of it" if others else ""
    return (f"training worker rank {rank} {why}{peers}; {max_restarts} restart(s) were allowed "
            f"(--max-restarts); rerun with --resume to continue from the last checkpoint")


def worker_main(argv: list[str]) -> int:
    """Entry point of a torchrun worker: ``python -m strfx.distributed JOB_JSON``."""
    from strfx.train import run_job

    try:
        run_job(json.loads(argv[0]))
    except StrfxError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
