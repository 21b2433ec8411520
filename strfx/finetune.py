"""``strfx train ... --finetune-epochs N``: fine-tune the shrunk model, then export it.

Shrinking removes the dead channels exactly (the shrunk model computes what the masked one did), but
the surviving weights were trained next to thresholds and gates. A few epochs of plain training of
the small dense model — no STR, nothing can be pruned any more — usually buy back some accuracy, as
in the usual prune → fine-tune recipe. Same data, same preprocessing (the input contract is
unchanged), SGD with the run's momentum/weight decay/label smoothing/gradient clipping, a cosine
schedule from ``lr`` (default a tenth of the run's peak) to 0 without warm-up. After an unstructured run the
pruned weights (the zeros of the dense shrunk model) stay zero. With ``train.rewind`` the model is cut from
earlier weights (strfx.rewind) and trained like the run: its peak lr and warm-up fraction.

The result goes to ``RUN_DIR/finetuned/`` (``model.onnx`` with the input contract in its metadata,
``model.pt2``, ``input_contract.json``, ``finetune.json``), assembled under a temporary name and
renamed into place, so ``strfx eval RUN_DIR/finetuned/model.onnx --data DATA`` scores what was shipped.
It runs in one process (rank 0 of a distributed run) after the STR run has finished.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from strfx.errors import TrainError

FINETUNE_DIR = "finetuned"
FINETUNE_FILE = "finetune.json"


def _batches(dataset: Any, batched: bool, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    if batched:  # whole batches straight from the in-memory arrays
        sampler = RandomSampler(dataset, generator=gen) if shuffle else range(len(dataset))
        return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=shuffle), batch_size=None)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, generator=gen)


@torch.no_grad()
def evaluate_module(model: nn.Module, data: Any, device: torch.device, batch_size: int = 256) -> dict[str, float]:
    """Validation top-1 and loss of ``model`` on ``data`` (a :class:`strfx.data.Data`), in this process only."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in _batches(data.val, data.batched, batch_size, shuffle=False, seed=0):
        x, y = x.to(device), y.to(device)
        out = model(x).float()
        loss_sum += float(loss_fn(out, y))
        correct += int((out.argmax(1) == y).sum())
        seen += len(y)
    return {"val_loss": loss_sum / max(seen, 1), "val_top1": correct / max(seen, 1)}


def keep_zeros_(model: nn.Module) -> None:
    """Mask the gradient of every zero in a weight matrix/kernel: with no gradient, SGD's momentum and weight
    decay leave a zero at zero, so training a shrunk unstructured model does not undo its sparsity."""
    for p in model.parameters():
        if p.dim() >= 2 and p.requires_grad and bool((p == 0).any()):
            p.register_hook(lambda grad, alive=(p != 0).to(p.dtype): grad * alive)


def finetune(model: nn.Module, data: Any, *, epochs: int, batch_size: int, lr: float, momentum: float,
             weight_decay: float, label_smoothing: float, grad_clip_norm: float | None, device: torch.device,
             seed: int = 0, max_steps_per_epoch: int | None = None, keep_zeros: bool = False,
             warmup_fraction: float = 0.0, log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Plain SGD training of ``model`` (in place) for ``epochs``; one metrics row per epoch.

    ``keep_zeros`` (unstructured runs, whose shrunk model is dense with the pruned weights at zero): the zeros of
    every weight matrix/kernel stay exactly zero (their gradient is masked; with no gradient, SGD's momentum
    and weight decay leave a zero at zero), so fine-tuning does not undo the sparsity. ``warmup_fraction`` of the
    steps warm the lr up linearly (a rewound model restarts training at the run's peak lr).
    """
    from strfx.train import WarmupCosine

    torch.manual_seed(seed)
    model.to(device)
    if keep_zeros:
        keep_zeros_(model)
    loader = _batches(data.train, data.batched, batch_size, shuffle=True, seed=seed)
    steps = len(loader) if max_steps_per_epoch is None else min(len(loader), max_steps_per_epoch)
    if steps == 0:
        raise TrainError(f"fine-tuning: {data.source} has no full batch of {batch_size}; lower train.batch_size")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(int(warmup_fraction * steps * epochs), steps * epochs))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    rows = []
    for epoch in range(epochs):
        model.train()
        loss_sum, seen = 0.0, 0
        for i, (x, y) in enumerate(loader):
            if i >= steps:
                break
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x).float(), y)
            if not math.isfinite(float(loss.detach())):
                raise TrainError(f"fine-tuning diverged at epoch {epoch + 1}, step {i + 1}: the loss is {float(loss.detach()):g}; "
                                 f"lower --finetune-lr (now {lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), **evaluate_module(model, data, device)}
        rows.append(row)
        log(f"fine-tune epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f} · val top-1 {row['val_top1']:.2%}")
    model.eval()
    return rows


def finetune_and_export(shrunk: nn.Module, data: Any, example_inputs: tuple[torch.Tensor, ...], run_dir: Path,
                        contract: Any, *, epochs: int, lr: float, device: torch.device,
                        log: Callable[[str], None] = print, **train_kw: Any) -> dict[str, Any]:
    """Fine-tune ``shrunk`` and write ``run_dir/finetuned/`` (see the module docstring); returns its summary."""
    from strfx.contract import CONTRACT_FILE
    from strfx.export import export

    before = evaluate_module(shrunk.to(device), data, device)
    rows = finetune(shrunk, data, epochs=epochs, lr=lr, device=device, log=log, **train_kw)
    shrunk.to("cpu")
    final = run_dir / FINETUNE_DIR
    staged = run_dir / f".{FINETUNE_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    try:
        rep = export(shrunk, staged / "model.onnx", tuple(t.cpu() for t in example_inputs),
                     pt2_path=staged / "model.pt2", metadata=contract.metadata(), force=True, repeats=3)
        (staged / CONTRACT_FILE).write_text(contract.model_dump_json(indent=2))
        summary = {
            "epochs": epochs, "lr": lr, "val_top1_before": before["val_top1"], "val_top1": rows[-1]["val_top1"],
            "val_loss": rows[-1]["val_loss"], "history": rows, "params": rep.model.params, "flops": rep.model.flops,
            "onnx": str(final / "model.onnx"), "pt2": str(final / "model.pt2"), "exporter": rep.exporter,
            "onnx_max_error": rep.onnx_max_error, "pt2_max_error": rep.pt2_max_error, "tolerance": rep.tolerance,
            # weight matrices/kernels: an unstructured run's sparsity survives the retraining (keep_zeros)
            "weights_nonzero": sum(int((p != 0).sum()) for p in shrunk.parameters() if p.dim() >= 2),
        }
        (staged / FINETUNE_FILE).write_text(json.dumps(summary, indent=2))
        if final.exists():  # a resumed run's earlier fine-tune: replaced as a whole
            trash = run_dir / f".{FINETUNE_DIR}.old-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staged, final)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return summary
