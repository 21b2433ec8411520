"""STR in a PyTorch Lightning loop: LeNet-5 on the shipped MNIST demo subset, structured, 50 % of FLOPs removed.

    pip install 'strfx[lightning]'
    python examples/lightning_lenet5.py --epochs 3 --out runs/lightning-lenet5
    strfx eval runs/lightning-lenet5/model.onnx --data demo     # the shipped file, with its recorded preprocessing

What strfx adds to an ordinary LightningModule: the model comes from ``strfx.sparsify``, the optimizer
from ``str_optimizer`` (STR's parameter groups), and ``STRCallback`` steers the run to
``--target-sparsity``, logs ``strfx/sparsity`` and shrinks + exports at the end. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import strfx  # first: it makes `import torchvision` (which Lightning does) safe on CPU-only machines (strfx._torchvision)

import lightning as L  # noqa: E402
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from strfx.contract import CONTRACT_FILE, input_contract
from strfx.data import load_data
from strfx.integrations.lightning import STRCallback, str_optimizer
from strfx.train import WarmupCosine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lenet5 import build_model, example_inputs  # noqa: E402


class LitClassifier(L.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float):
        super().__init__()
        self.model, self.lr = model, lr
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self.model(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.log("val_top1", (self.model(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> dict:
        opt = str_optimizer(self.model, lr=self.lr)  # SGD, momentum 0.875; thresholds/norms in their own groups
        total = int(self.trainer.estimated_stepping_batches)  # strfx train's schedule: 20 % warm-up, cosine to 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(total // 5, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.064)
    p.add_argument("--target-sparsity", type=float, default=0.5)
    p.add_argument("--max-steps", type=int, default=-1, help="stop early (smoke tests)")
    p.add_argument("--out", default="runs/lightning-lenet5")
    p.add_argument("--force", action="store_true", help="replace an existing export")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    data = load_data("demo")  # uint8 pixels / 255, normalised with the training split's mean/std
    x = example_inputs()
    model = strfx.sparsify(build_model(), "structured", example_inputs=x, config={"s_init": -5})  # as strfx train
    contract = input_contract(data, x, data.num_classes)  # travels in the ONNX file: strfx eval reads it
    train = DataLoader(data.train, sampler=BatchSampler(RandomSampler(data.train), args.batch_size, drop_last=True),
                       batch_size=None)
    val = DataLoader(data.val, sampler=BatchSampler(SequentialSampler(data.val), 500, drop_last=False), batch_size=None)

    cb = STRCallback(target_sparsity=args.target_sparsity, export_dir=args.out, metadata=contract.metadata(),
                     force=args.force)
    trainer = L.Trainer(max_epochs=args.epochs, max_steps=args.max_steps, callbacks=[cb], accelerator="cpu",
                        logger=False, enable_checkpointing=False, gradient_clip_val=5.0)
    trainer.fit(LitClassifier(model, args.lr), train, val)
    Path(args.out, CONTRACT_FILE).write_text(contract.model_dump_json(indent=2))
    ex = cb.export_summary
    print(f"val top-1 {float(trainer.callback_metrics['val_top1']):.2%} · {cb.session.meter():.2%} of FLOPs removed "
          f"(target {args.target_sparsity:.0%}) · shrunk: params {ex['params_before']:,} → {ex['params_after']:,}, "
          f"FLOPs {ex['flops_before'] / 1e6:.2f}M → {ex['flops_after'] / 1e6:.2f}M · wrote {ex['onnx']}, {ex['pt2']}")


if __name__ == "__main__":
    main()
