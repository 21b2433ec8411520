"""STR in a HuggingFace ``Trainer``: a tiny BERT built from a config (nothing downloaded) on a toy task.

    pip install 'strfx[hf]'
    python examples/hf_trainer_tiny.py --steps 300 --out runs/hf-tiny

The task: does token 5 occur in a sequence of 12 random tokens? What strfx adds to an ordinary
``Trainer`` run: the model comes from ``strfx.sparsify``, the optimizer from ``str_optimizer`` (the
``Trainer``'s own AdamW recipe with STR's thresholds in their own group; the ``Trainer`` still builds
its usual schedule on it), and ``STRTrainerCallback`` steers the run to ``--target-sparsity``, logs
``strfx/sparsity`` and shrinks + exports at the end.
"""

from __future__ import annotations

import argparse

import strfx  # first: it makes `import torchvision` (which transformers may do) safe on CPU-only machines

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from strfx.integrations.hf import STRTrainerCallback, str_optimizer  # noqa: E402

VOCAB, SEQ = 32, 12


def toy_split(n: int, seed: int) -> list[dict[str, torch.Tensor | int]]:
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": int((row == 5).any())} for row in ids]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--mode", choices=["unstructured", "structured"], default="unstructured")
    p.add_argument("--target-sparsity", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default="runs/hf-tiny")
    p.add_argument("--force", action="store_true", help="replace an existing export")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=SEQ, num_labels=2)
    example = (torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1)),)
    s_init = {"unstructured": -10.0, "structured": -5.0}[args.mode]  # strfx train's starting thresholds
    model = strfx.sparsify(BertForSequenceClassification(config), args.mode, example_inputs=example,
                           config={"s_init": s_init})

    targs = TrainingArguments(f"{args.out}/trainer", learning_rate=args.lr, max_steps=args.steps, warmup_steps=args.steps // 10,
                              per_device_train_batch_size=32, logging_steps=max(args.steps // 10, 1), eval_strategy="no",
                              save_strategy="no", report_to=[], use_cpu=True, weight_decay=0.01)
    cb = STRTrainerCallback(target_sparsity=args.target_sparsity, export_dir=args.out, force=args.force)
    trainer = Trainer(model=model, args=targs, train_dataset=toy_split(4096, 0), callbacks=[cb],
                      optimizers=(str_optimizer(model, targs), None))  # the Trainer adds its lr schedule
    trainer.train()

    val = toy_split(512, 1)
    model.eval()
    with torch.no_grad():
        logits = model(torch.stack([v["input_ids"] for v in val])).logits
    top1 = (logits.argmax(1) == torch.tensor([v["labels"] for v in val])).float().mean().item()
    ex = cb.export_summary
    what = "weights zero" if args.mode == "unstructured" else "FLOPs removed"
    print(f"val top-1 {top1:.2%} · {cb.session.meter():.2%} {what} (target {args.target_sparsity:.0%}) · "
          f"exported params {ex['params_after']:,} (of {ex['params_before']:,}"
          f"{'; unstructured zeros stay in dense tensors' if args.mode == 'unstructured' else ''}) · "
          f"wrote {ex['onnx']}, {ex['pt2']}")


if __name__ == "__main__":
    main()
