"""The input contract of a trained model: what a caller must feed it, recorded with every run.

A model trained by ``strfx train`` expects its inputs preprocessed exactly as training did (for
array data: ``uint8 pixels / 255``, then per-channel mean/std of the training split). Without this
record a shipped model is unusable, or silently wrong. :class:`InputContract` is written to
``RUN_DIR/input_contract.json`` and into ``summary.json``, and is meant to travel with exports
(e.g. as ONNX metadata: :meth:`InputContract.metadata`).
"""

from __future__ import annotations

import json
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

CONTRACT_FILE = "input_contract.json"


class InputContract(BaseModel):
    """What the model's input must be, and how raw images become it."""

    model_config = ConfigDict(extra="forbid")

    shape: list[int | None] = Field(description="Input shape; None marks the batch dimension (any size).")
    dtype: str = Field("float32", description="torch dtype of the input tensor.")
    layout: Literal["NCHW", "other"] = Field(description="NCHW for images; other for non-image inputs.")
    raw: str = Field(description="What the preprocessing starts from, e.g. 'uint8 pixels 0..255, N×C×H×W'.")
    scale: float | None = Field(None, description="Multiply raw values by this first (1/255 for uint8 images).")
    mean: list[float] | None = Field(None, description="Then subtract this per channel...")
    std: list[float] | None = Field(None, description="...and divide by this per channel.")
    resize: str | None = Field(None, description="Resizing/cropping before scaling (torchvision data), if any.")
    num_classes: int | None = Field(None, description="Width of the logits the model returns.")
    data: str = Field(description="The --data the statistics come from.")
    formula: str = Field(description="The whole preprocessing in one line.")

    def metadata(self) -> dict[str, str]:
        """String key/values for a model file's metadata (ONNX ``metadata_props``)."""
        return {"strfx.input_contract": self.model_dump_json(), "strfx.preprocessing": self.formula}

    def describe(self) -> str:
        """One line for the training summary."""
        dims = "×".join("N" if d is None else str(d) for d in self.shape)
        cls = f", {self.num_classes} classes" if self.num_classes else ""
        return f"{dims} {self.dtype} = {self.formula}{cls}"


def _floats(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values]


def input_contract(data: Any, example_inputs: Sequence[Any], num_classes: int | None) -> InputContract:
    """The contract of a model trained on ``data`` (a :class:`strfx.data.Data`) with these example inputs."""
    x = example_inputs[0]
    shape: list[int | None] = [None, *map(int, x.shape[1:])]
    dtype = str(x.dtype).removeprefix("torch.")
    pre: dict[str, Any] = dict(getattr(data, "preprocessing", None) or {})
    image = x.dim() == 4
    mean, std, scale = pre.get("mean"), pre.get("std"), pre.get("scale")
    if mean is not None and std is not None:
        channels = "per channel " if len(mean) > 1 else ""
        m = ", ".join(f"{v:.4g}" for v in mean)
        s = ", ".join(f"{v:.4g}" for v in std)
        formula = (f"{pre.get('resize') + ', then ' if pre.get('resize') else ''}"
                   f"(pixel / 255 - [{m}]) / [{s}] {channels}".rstrip())
    else:
        formula = pre.get("formula", "whatever the model file's datasets() returns (not known to strfx)")
    return InputContract(
        shape=shape, dtype=dtype, layout="NCHW" if image else "other",
        raw=pre.get("raw", "the items of the model file's datasets()"),
        scale=scale, mean=_floats(mean) if mean is not None else None, std=_floats(std) if std is not None else None,
        resize=pre.get("resize"), num_classes=num_classes, data=getattr(data, "source", "?"), formula=formula)


def load_contract(path: Any) -> InputContract:
    """Read an ``input_contract.json``."""
    from pathlib import Path

    return InputContract.model_validate(json.loads(Path(path).read_text()))
