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
from torch import nn

from strfx.errors import StrfxError, TrainError

FAULT_ENV = "STRFX_FAULT_INJECT"
NODE_RANK_ENV = "STRFX_NODE_RANK"  # the --node-rank the user gave this agent (c10d does not keep it, see writer_rank)
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
    writer: int = 0  # global rank of the process that writes the run's outputs (see writer_rank)

    @property
    def is_main(self) -> bool:
        """This process writes the outputs and prints (the node-rank-0 agent's first worker)."""
        return self.rank == self.writer


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
    return DistEnv(rank, world, local_rank, device, True, restart, writer_rank(local_rank))


def writer_rank(local_rank: int) -> int:
    """Global rank of the worker that writes the outputs: local rank 0 of the agent given ``--node-rank 0``.

    The c10d rendezvous hands out global ranks in the order agents join, so global rank 0 may live on
    the agent started with ``--node-rank 1``; the user looks for the outputs where they started node 0.
    Without any ``--node-rank`` (one node, or the user left it out) it is global rank 0.
    """
    node = os.environ.get(NODE_RANK_ENV)
    mine = node is not None and int(node) == 0 and local_rank == 0
    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, mine)
    return next((r for r, f in enumerate(flags) if f), 0)


def from_writer(env: DistEnv, value: Any) -> Any:
    """The writer's ``value`` on every rank (e.g. its run directory)."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=env.writer)
    return box[0]


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (FSDP2 DTensor) or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


# ------------------------------------------------------------------------------------------ FSDP2


def fsdp_units(model: nn.Module, wrap: list[str], min_params: int) -> list[str]:
    """Qualified names of the modules that become their own FSDP unit, innermost first (the root excluded).

    ``wrap`` picks blocks by class name (any class of its MRO, so ``Linear`` also names the
    ``ParametrizedLinear`` that STR makes of a linear layer); without it, a module becomes a unit when it holds at least
    ``min_params`` parameters not yet in a smaller unit (FSDP1's size policy). Only closed modules
    qualify: every name of every parameter under it lies inside it, but for STR importance vectors,
    which may span blocks (a hidden-size unit gates every layer's projections; they are left out of
    every unit, see :func:`shared_str_params`), and nothing inside STR's ``parametrizations``
    containers (their parameters belong to the module they parametrize).
    """
    names: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(fqn)
    spanning = {id(p) for p in shared_str_params(model)}
    taken: set[int] = set()
    units: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            visit(f"{prefix}{child_name}.", child)
        if not prefix or "parametrizations." in prefix or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            return  # containers are no block (FSDP1's size policy skips them too)
        params = {id(p): p for p in module.parameters() if id(p) not in spanning}
        if not params or any(not n.startswith(prefix) for i in params for n in names[i]):
            return
        free = sum(p.numel() for i, p in params.items() if i not in taken)
        if any(c.__name__ in wrap for c in type(module).__mro__) if wrap else free >= min_params:
            units.append(prefix[:-1])
            taken.update(params)

    visit("", model)
    return units


def shared_str_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of STR importance vectors read from more than one module (a hidden-size unit, a tied
    weight's gate): no FSDP unit owns them; they stay whole on every rank and their gradients are
    averaged across ranks by a hook (:func:`shard_model`)."""
    from strfx.modules import STRUnit

    names: dict[int, set[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), set()).add(fqn.split(".parametrizations.")[0])
    out: dict[int, nn.Parameter] = {}
    for unit in model.modules():
        if isinstance(unit, STRUnit):
            for p in unit.parameters():
                if len(names.get(id(p), ())) > 1:
                    out[id(p)] = p
    return list(out.values())


def _average_grad(world: int) -> Any:
    def hook(p: torch.Tensor) -> None:
        if p.grad is not None:
            dist.all_reduce(p.grad)  # gloo has no AVG: sum, then divide
            p.grad.div_(world)
    return hook


def shard_model(model: nn.Module, fsdp: Any, env: DistEnv) -> list[str]:
    """Apply ``fully_shard`` to the policy's units and the root, in place; returns the unit names.

    Mixed precision (bf16 parameters, fp32 reduction) only on CUDA: CPU bf16 matmuls are slow and
    gloo reduces fp32 anyway. Parameters must be at least 1-D (STR's are).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs: dict[str, Any] = {"reshard_after_forward": fsdp.reshard_after_forward,
                              "offload_policy": CPUOffloadPolicy() if fsdp.cpu_offload else OffloadPolicy()}
    if env.device.type == "cuda" and fsdp.mixed_precision == "auto":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        raise TrainError(f"--strategy fsdp cannot shard 0-d parameters ({', '.join(scalars[:3])}); "
                         f"make them 1-D (shape (1,)) or use --strategy ddp")
    units = fsdp_units(model, fsdp.wrap, fsdp.min_params)
    if fsdp.wrap and not units:
        raise TrainError(f"train.fsdp.wrap {fsdp.wrap} matches no closed module of the model; give class names "
                         f"of its blocks (e.g. {type(next(iter(model.children()), model)).__name__}) or leave it empty")
    shared = shared_str_params(model)
    if shared:  # replicated, not sharded: their gradients are averaged like DDP's
        kwargs["ignored_params"] = set(shared)
        for p in shared:
            p.register_post_accumulate_grad_hook(_average_grad(dist.get_world_size()))
    for name in units:
        fully_shard(model.get_submodule(name), **kwargs)
    fully_shard(model, **kwargs)
    return units


def gather_full_state(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """The whole (unsharded) state dict on the writer, on the CPU; None elsewhere. Collective.

    One parameter at a time is all-gathered (``DTensor.full_tensor``) and only the writer keeps a CPU
    copy, so no rank ever holds more than one full parameter beyond its shards. (The writer is not
    always global rank 0, see :func:`writer_rank`, which is why this is not
    ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``: that one fills rank 0.)
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        if env.is_main:
            out[key] = full.detach().to("cpu", copy=True)
        del full
    return out if env.is_main else None


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
            if self.node_rank is not None and self.rdzv_backend == "static":  # c10d ignores it (and says so);
                args += ["--node-rank", str(self.node_rank)]  # strfx uses it to pick the writer (NODE_RANK_ENV)
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
    if options.node_rank is not None or options.rdzv_endpoint is None:  # standalone: this is node 0
        os.environ[NODE_RANK_ENV] = str(options.node_rank or 0)
    else:
        os.environ.pop(NODE_RANK_ENV, None)  # unknown: global rank 0 writes
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
    cause is a worker killed by a signal other than SIGTERM if there is one, else the worker that
    failed first with an exit code, else one that was terminated. SIGTERM ranks last because it is
    what the agent itself sends the workers still running once one has failed: a peer still busy when
    the agent notices the dead worker is recorded as "killed by SIGTERM", with a timestamp (whole
    seconds) that ties with the dead worker's (once in 16 test runs this named the bystander rank 0).
    """
    def key(item: tuple[int, Any]) -> tuple[int, float, int]:
        rank, f = item
        signaled = f.exitcode is not None and f.exitcode < 0
        cls = 2 if signaled and f.exitcode == -signal.SIGTERM else 0 if signaled else 1
        return (cls, float(f.timestamp or 0), rank)

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
    code = worker_main(sys.argv[1:])
    # Even after shutdown() a C++ thread (gloo, FSDP's checkpoint I/O) can still be joinable when the
    # interpreter tears down, which aborts a finished worker now and then ("terminate called without an
    # active exception": 1 FSDP test run in ~40). Everything is written and closed by now; leave directly.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
