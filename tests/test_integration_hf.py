"""strfx.integrations.hf: STR in a HuggingFace Trainer (issue 13, "train in the loops people use")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import strfx
from strfx.modules import norm_parameters, threshold_parameters
from strfx.testing import kill_channels

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed (pip install 'strfx[hf]')")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install 'strfx[hf]')")
from strfx.integrations.hf import STRTrainerCallback, str_optimizer  # noqa: E402


def _args(tmp_path: Path, **kw: object) -> transformers.TrainingArguments:
    kw = {"save_strategy": "no", **kw}
    return transformers.TrainingArguments(str(tmp_path / "hf"), report_to=[], use_cpu=True, disable_tqdm=True,
                                          per_device_train_batch_size=8, **kw)


def test_trainer_callback_lands_the_target_with_str_groups(tmp_path: Path) -> None:
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    model = strfx.sparsify(transformers.BertForSequenceClassification(cfg), "unstructured", example_inputs=(ids,),
                           config={"s_init": -5})
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 32, (320, 8), generator=g)
    data = [{"input_ids": i, "labels": int((i == 5).any())} for i in x]
    args = _args(tmp_path, learning_rate=3e-3, max_steps=40, logging_steps=10, weight_decay=0.01)
    opt = str_optimizer(model, args)
    groups = {grp["name"]: grp for grp in opt.param_groups}
    assert isinstance(opt, torch.optim.AdamW) and list(groups) == ["weights", "weights_no_decay", "thresholds"]
    assert {id(p) for p in groups["thresholds"]["params"]} == {id(p) for p in threshold_parameters(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("bias" in names[id(p)] or "LayerNorm" in names[id(p)] for p in groups["weights_no_decay"]["params"])
    assert groups["weights"]["weight_decay"] == 0.01 and groups["weights_no_decay"]["weight_decay"] == 0.0
    cb = STRTrainerCallback(target_sparsity=0.3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb], optimizers=(opt, None))
    trainer.train()
    assert cb.session.controller is not None and cb.session.controller.last_step == 40
    measured = cb.session.meter()
    assert abs(measured - 0.3) <= 0.05  # from ~2 % (s_init -5) to the target, under AdamW's decoupled decay
    logged = [h for h in trainer.state.log_history if "strfx/sparsity" in h]
    assert len(logged) >= 4 and logged[-1]["strfx/sparsity"] == pytest.approx(measured)
    assert groups["weights"]["weight_decay"] == 0.01  # the controller steers only the thresholds


def test_trainer_callback_shrinks_and_exports_at_the_end(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    cfg = transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic",
                                    num_labels=2)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    model = strfx.sparsify(transformers.ResNetForImageClassification(cfg), "structured", example_inputs=(x,))
    kill_channels(model, 0.5, example_inputs=(x,))
    g = torch.Generator().manual_seed(1)
    data = [{"pixel_values": torch.randn(1, 16, 16, generator=g), "labels": i % 2} for i in range(32)]
    args = _args(tmp_path, learning_rate=1e-3, max_steps=2)
    opt = str_optimizer(model, args)
    assert {id(p) for grp in opt.param_groups if grp["name"] == "norms" for p in grp["params"]} == \
        {id(p) for p in norm_parameters(model)}
    cb = STRTrainerCallback(export_dir=tmp_path / "out")
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb], optimizers=(opt, None)).train()
    ex = cb.export_summary
    assert ex is not None and ex["channels_removed"] > 0 and ex["params_after"] < ex["params_before"]
    probe = torch.randn(3, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        masked = model(probe).logits
        small = cb.shrunk(probe)
    small = small.logits if hasattr(small, "logits") else small[0] if isinstance(small, (tuple, list)) else small
    torch.testing.assert_close(small, masked, rtol=1e-4, atol=1e-5)
    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: probe.numpy()})[0]
    np.testing.assert_allclose(got, masked.numpy(), rtol=1e-4, atol=1e-5)


def test_trainer_checkpoint_carries_the_controller_state(tmp_path: Path) -> None:
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=2)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))

    def run(max_steps: int, resume: bool) -> tuple[transformers.Trainer, STRTrainerCallback]:
        torch.manual_seed(0)
        model = strfx.sparsify(transformers.BertForSequenceClassification(cfg), "unstructured", example_inputs=(ids,),
                               config={"s_init": -5})
        data = [{"input_ids": i, "labels": int((i == 5).any())}
                for i in torch.randint(0, 32, (64, 8), generator=torch.Generator().manual_seed(1))]
        args = _args(tmp_path, learning_rate=3e-3, max_steps=max_steps, save_strategy="steps", save_steps=6,
                     restore_callback_states_from_checkpoint=True)
        cb = STRTrainerCallback(target_sparsity=0.3)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb],
                                       optimizers=(str_optimizer(model, args), None))
        trainer.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-6") if resume else None)
        return trainer, cb

    _, first = run(6, resume=False)
    saved = first.session.controller.state_dict()
    trainer, _ = run(8, resume=True)
    (cb,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, STRTrainerCallback)]
    assert cb.restored is not None and cb.restored["controller"] == saved  # the state came from the checkpoint
    assert cb.session.controller.last_step == 8
