"""``strfx train``: the command-line face of :func:`strfx.train.train`."""

from __future__ import annotations

import click

from strfx.cli import CONFIG, INIT, MODE, command, main


@command(main, "train")
@click.argument("model")
@MODE
@click.option("--data", default=None, metavar="DATA",
              help="demo | npz:PATH | mnist:PATH | cifar10:PATH | imagefolder:PATH; omit to use the model "
              "file's datasets(). Nothing is ever downloaded.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override train.epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Override train.batch_size (global; lr follows as 0.256 × batch/256 unless train.lr is set).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
              help="Override train.lr, the peak learning rate (default 0.256 × batch/256).")
@click.option("--seed", type=int, default=None, help="Override train.seed (initial weights, data order).")
@INIT
@CONFIG
@click.option("--target-sparsity", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="End the run at this sparsity (unstructured: fraction of weights zero; structured: fraction "
              "of FLOPs removed) by steering the threshold decay; STR still picks each layer's share.")
@click.option("--target-metric", type=click.Choice(["flops", "params"]), default=None,
              help="Override train.target_metric: in structured mode --target-sparsity is a fraction of the FLOPs "
              "(default) or of the parameters the shrunk model saves.")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default=None,
              help="Override train.strategy: ddp replicates the model on every process; fsdp shards parameters, "
              "gradients and optimizer state (FSDP2) and writes sharded, reshardable checkpoints.")
@click.option("--cpu-offload", is_flag=True, default=None,
              help="With --strategy fsdp: keep parameters, gradients and optimizer state in CPU memory (GPU runs).")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=None,
              help="Processes on this machine, launched through torchrun (torch.distributed.run). Default: "
              "train in this process.")
@click.option("--nnodes", default=None, help="torchrun --nnodes (N or MIN:MAX).")
@click.option("--node-rank", type=int, default=None, help="torchrun --node-rank.")
@click.option("--rdzv-endpoint", default=None, help="torchrun --rdzv-endpoint HOST:PORT (needed for >1 node).")
@click.option("--rdzv-id", default=None, help="torchrun --rdzv-id (same on every node).")
@click.option("--rdzv-backend", default="c10d", show_default=True, help="torchrun --rdzv-backend.")
@click.option("--max-restarts", type=click.IntRange(min=0), default=None,
              help="torchrun --max-restarts: restarts after a worker dies; the run resumes from its last checkpoint.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: runs/<model>-<mode>-train).")
@click.option("--resume", is_flag=True, help="Continue the run in the output directory from its newest checkpoint.")
@click.option("--force", is_flag=True, help="Delete the output directory first if it exists.")
@click.option("--export", is_flag=True, help="After training, shrink the model and export it (with verification).")
@click.option("--finetune-epochs", type=click.IntRange(min=1), default=None,
              help="After training, shrink the model, fine-tune the small dense model this many epochs (no STR, "
              "same data) and export it to RUN_DIR/finetuned/ (implies --export).")
@click.option("--finetune-lr", type=click.FloatRange(0, min_open=True), default=None,
              help="Peak lr of the fine-tuning (cosine to 0; default a tenth of the run's peak lr).")
@click.option("--rewind", type=click.Choice(["auto", "off", "start", "ramp"]), default=None,
              help="Override train.rewind: with --finetune-epochs, cut STR's units from the weights the run started "
              "from (start) or had when the target schedule started rising (ramp), and train that model instead; "
              "off fine-tunes STR's own weights. Default auto: ramp for structured runs with a target, else off.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: only on a terminal).")
def train_cmd(model: str, mode: str | None, data: str | None, epochs: int | None, batch_size: int | None,
              lr: float | None, seed: int | None, init: str | None, config_path: str | None,
              target_sparsity: float | None, target_metric: str | None, strategy: str | None, cpu_offload: bool | None, nproc_per_node: int | None, nnodes: str | None, node_rank: int | None,
              rdzv_endpoint: str | None, rdzv_id: str | None, rdzv_backend: str, max_restarts: int | None,
              output: str | None, resume: bool, force: bool, export: bool, finetune_epochs: int | None,
              finetune_lr: float | None, rewind: str | None, progress: bool | None) -> None:
    """Train MODEL with STR on DATA (one process, or many through torchrun), then report.

    Writes RUN_DIR with config.yaml, checkpoints/, metrics.jsonl, weights.pt, report.json, summary.json
    and budget.png (the layer-wise sparsity STR learned); with --export model.onnx/model.pt2, with
    --finetune-epochs also finetuned/ (the shrunk model fine-tuned, exported; with --rewind cut from earlier
    weights, see train.rewind).
    """
    from strfx.distributed import LaunchOptions
    from strfx.errors import StrfxError
    from strfx.train import train

    distributed = any(v is not None for v in (nproc_per_node, nnodes, rdzv_endpoint, max_restarts))
    opts = None
    if distributed:
        opts = LaunchOptions(nproc_per_node=nproc_per_node or 1, nnodes=nnodes or "1", node_rank=node_rank,
                             rdzv_endpoint=rdzv_endpoint, rdzv_backend=rdzv_backend, rdzv_id=rdzv_id,
                             max_restarts=max_restarts or 0)
        opts.argv()  # reject inconsistent torchrun options before any work
    elif node_rank is not None or rdzv_id is not None:
        raise StrfxError("--node-rank/--rdzv-id only make sense with --nnodes and --rdzv-endpoint")
    train(model, data, mode, config=config_path, run_dir=output, resume=resume, force=force, export=export,
          epochs=epochs, batch_size=batch_size, target_sparsity=target_sparsity, launch_options=opts,
          progress=progress, lr=lr, seed=seed, init=init, finetune_epochs=finetune_epochs or 0, finetune_lr=finetune_lr,
          strategy=strategy, cpu_offload=cpu_offload or None, rewind=rewind,
          target_metric=target_metric)
