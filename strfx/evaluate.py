"""``strfx eval SOURCE --data DATA``: top-1 and loss of what you ship, with the preprocessing it was trained with.

SOURCE is a run directory (``strfx train``/``transform``: the masked model), a ``strfx shrink`` output,
an ``.onnx`` file (run in onnxruntime) or a ``.pt2`` program (``torch.export.load``). The input
contract (:mod:`strfx.contract`) comes from the ONNX metadata, the ``input_contract.json`` next to
the file or in the directory (or ``--contract``); DATA's validation split is then normalised with
the contract's numbers rather than recomputed from DATA, so the accuracy is that of the model as
deployed. A model exported for a fixed batch size is fed padded batches of that size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel, Field

from strfx.contract import CONTRACT_FILE, InputContract, load_contract
from strfx.errors import StrfxError


class EvalResult(BaseModel):
    """What ``strfx eval`` measured."""

    source: str
    kind: str = Field(description="run directory, shrink output, onnx or pt2")
    data: str
    images: int
    top1: float
    loss: float = Field(description="Mean cross-entropy (no label smoothing).")
    preprocessing: str = Field(description="The contract's formula, or a note that DATA's own was used.")
    contract_from: str | None = None

    def line(self) -> str:
        return (f"{self.source} ({self.kind}) on {self.data}: top-1 {self.top1:.2%} · loss {self.loss:.4f} · "
                f"{self.images:,} validation images · preprocessing {self.preprocessing}")


def _contract_near(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    if (folder / CONTRACT_FILE).is_file():
        return folder / CONTRACT_FILE
    shrink_json = folder / "shrink.json"
    if shrink_json.is_file():  # a shrink output made before contracts were copied: its run directory's
        run_dir = Path(json.loads(shrink_json.read_text()).get("run_dir", ""))
        if (run_dir / CONTRACT_FILE).is_file():
            return run_dir / CONTRACT_FILE
    return None


def _onnx_runner(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], int | None, InputContract | None]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise StrfxError("evaluating an .onnx file needs onnxruntime: pip install onnxruntime") from None
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - not an ONNX model, or a damaged one
        from strfx.safeload import reason

        raise StrfxError(f"onnxruntime cannot load {path} ({reason(err)}); give an .onnx file strfx export wrote") from None
    inp = sess.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    meta = sess.get_modelmeta().custom_metadata_map or {}
    contract = InputContract.model_validate_json(meta["strfx.input_contract"]) if "strfx.input_contract" in meta else None

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(sess.run(None, {inp.name: x.numpy()})[0]))

    return run, fixed, contract


def _module_runner(module: torch.nn.Module, example: tuple[Any, ...] | None) -> tuple[Callable[[torch.Tensor], torch.Tensor], int | None]:
    try:
        module.eval()
    except NotImplementedError:  # a torch.export module: captured in eval mode already, and refuses .eval()
        pass

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return module(x)

    fixed = None
    if example:  # a torch.export program accepts only its example batch size unless dim 0 was made dynamic
        b = int(example[0].shape[0])
        probe = torch.zeros((b + 1, *example[0].shape[1:]), dtype=example[0].dtype)
        try:
            run(probe)
        except Exception:  # noqa: BLE001 - a shape guard: static batch
            fixed = b
    return run, fixed


def load_source(source: str | Path) -> tuple[str, Callable[[torch.Tensor], torch.Tensor], int | None,
                                            InputContract | None, str | None]:
    """(kind, run(x) -> logits, fixed batch size or None, contract, where the contract came from)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise StrfxError(f"{path} does not exist; give a run directory, a strfx shrink output, an .onnx or a .pt2 file")
    contract: InputContract | None = None
    if path.is_dir() and (path / "config.yaml").is_file():
        from strfx.rundir import load_run

        gm, loaded, _ = load_run(path)
        run, fixed = _module_runner(gm, None)
        kind = "run directory"
    elif path.is_dir() and (path / "model.pt2").is_file():
        from strfx.deploy import load_shrunk

        program = load_shrunk(path)
        run, fixed = _module_runner(program.module(), program.example_inputs[0] if program.example_inputs else None)
        kind = "shrink output"
    elif path.suffix == ".onnx":
        run, fixed, contract = _onnx_runner(path)
        kind = "onnx"
        if contract is not None:
            return kind, run, fixed, contract, f"{path} metadata"
    elif path.suffix == ".pt2":
        try:
            program = torch.export.load(str(path))
        except Exception as err:  # noqa: BLE001
            from strfx.safeload import reason

            raise StrfxError(f"cannot load {path} ({reason(err)}); give a .pt2 written by torch.export.save") from None
        run, fixed = _module_runner(program.module(), program.example_inputs[0] if program.example_inputs else None)
        kind = "pt2"
    else:
        raise StrfxError(f"{path} is neither a run directory, a strfx shrink output, an .onnx nor a .pt2 file")
    near = _contract_near(path)
    if near is not None:
        contract = load_contract(near)
    return kind, run, fixed, contract, str(near) if near else None


def evaluate(source: str | Path, data: str | None, contract_path: str | Path | None = None,
             batch_size: int = 256) -> EvalResult:
    """Top-1 and loss of SOURCE on DATA's validation split (see the module docstring)."""
    from strfx.data import ArrayDataset, load_data

    kind, run, fixed, contract, where = load_source(source)
    if contract_path is not None:
        contract, where = load_contract(contract_path), str(contract_path)
    shape = contract.shape if contract else None
    image = bool(shape) and len(shape) == 4
    d = load_data(data, image_size=tuple(shape[-2:]) if image else (224, 224),  # type: ignore[index,arg-type]
                  channels=shape[1] if image else 3)  # type: ignore[index]
    val = d.val
    if contract is None:
        preprocessing = f"{d.source}'s own (no input contract found; pass --contract)"
    elif isinstance(val, ArrayDataset) and contract.mean is not None and contract.std is not None:
        val.mean = torch.tensor(contract.mean, dtype=torch.float32).view(1, -1, 1, 1)
        val.std = torch.tensor(contract.std, dtype=torch.float32).view(1, -1, 1, 1)
        preprocessing = contract.formula
    else:
        pre = d.preprocessing or {}
        if contract.mean is not None and (pre.get("mean") != contract.mean or pre.get("std") != contract.std):
            raise StrfxError(f"{d.source} normalises with mean {pre.get('mean')} / std {pre.get('std')} but the model "
                             f"was trained with {contract.mean} / {contract.std} ({where}); evaluate on data of the "
                             f"same kind as training")
        preprocessing = contract.formula
    bs = fixed or batch_size
    correct, loss_sum, seen = 0, 0.0, 0
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    for start in range(0, len(val), bs):
        idx = list(range(start, min(start + bs, len(val))))
        if isinstance(val, ArrayDataset):
            x, y = val[idx]
        else:
            items = [val[i] for i in idx]
            x = torch.stack([torch.as_tensor(it[0]) for it in items])
            y = torch.as_tensor([int(it[1]) for it in items])
        n = len(y)
        if fixed and n < fixed:  # pad the last batch of a fixed-batch model; padded rows are dropped
            x = torch.cat([x, x.new_zeros((fixed - n, *x.shape[1:]))])
        try:
            logits = run(x.float())[:n].float()
        except Exception as err:  # noqa: BLE001 - the model refuses these inputs
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise StrfxError(f"{source} cannot run on {d.source} inputs of shape {tuple(x.shape)} ({type(err).__name__}:"
                             f" {first[:200]}); evaluate on data shaped like the model's input") from None
        loss_sum += float(loss_fn(logits, y))
        correct += int((logits.argmax(1) == y).sum())
        seen += n
    return EvalResult(source=str(source), kind=kind, data=d.source, images=seen, top1=correct / max(seen, 1),
                      loss=loss_sum / max(seen, 1), preprocessing=preprocessing, contract_from=where)
