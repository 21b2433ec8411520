"""Configuration: pydantic models, loadable from YAML.

One file configures every command; each section is optional::

    sparsify:
      s_init: -12
      exclude: ["fc"]
    train:          # read by `strfx train`
      epochs: 10

Unknown keys are errors (a typo must not be ignored), and every error names the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError
from .train_config import TrainConfig

Mode = Literal["unstructured", "structured", "lowrank"]
Orthogonality = Literal["none", "qr", "penalty"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CaptureConfig(_Strict):
    """How the model is captured with ``torch.export`` (the ATen graph strfx analyses and cuts)."""

    strict: bool = Field(False, description="torch.export's strict mode (TorchDynamo tracing). The default, "
                         "non-strict, runs the model's Python as is and records the ATen ops it calls.")
    dynamic_batch: bool = Field(True, description="Exported programs (.pt2, ONNX) take any batch size "
                                "(dim 0 of every tensor input is a torch.export Dim); analysis always "
                                "uses the example shapes.")


class LowRankConfig(_Strict):
    """Where and how low-rank STR is inserted."""

    s_init: float = Field(
        -15.0,
        description="Initial threshold parameter s; g(s_init)·scale is the first threshold on the singular "
        "values. Insertion is exact whatever it is (σ + threshold is stored).",
    )
    threshold_fn: Literal["sigmoid"] = Field("sigmoid", description="g, the function mapping s to a threshold.")
    relative_threshold: bool = Field(
        False,
        description="Threshold σ_max(W at insertion)·g(s) instead of g(s): g ≤ 1, so without it a layer "
        "whose singular values all exceed 1 can never lose a rank.",
    )
    orthogonality: Orthogonality = Field(
        "qr",
        description="'qr': the forward uses the QR Q factors of U and V (exactly orthonormal, so σ' are the "
        "singular values; the default: nothing to add to the training loop); 'none': U and V free; "
        "'penalty': orthogonality_penalty(model) must be added to the loss. Measured in docs/lowrank.md.",
    )
    penalty_weight: float = Field(1e-3, ge=0, description="Weight of ‖UᵀU − I‖² + ‖VᵀV − I‖² (orthogonality='penalty').")
    exclude: list[str] = Field(
        default_factory=list,
        description="Glob patterns over module names ('fc', 'layer4.*') or weight names ('lstm.weight_ih_l1') "
        "left dense.",
    )
    rnn: bool = Field(True, description="Also reparameterise the input-to-hidden matrices of nn.LSTM/nn.GRU/nn.RNN.")
    min_rank_gain: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Skip a layer unless factoring it saves parameters up to a rank of at least this fraction "
        "of its full rank. Layers where no rank ≥ 1 saves anything (depthwise convs) are always skipped.",
    )


class SparsifyConfig(_Strict):
    """Where and how STR is inserted."""

    mode: Mode = Field("unstructured", description="'unstructured': STR on conv/linear weights; "
                       "'structured': STR-BN on BatchNorm γ/β and one STR importance vector per channel group without BatchNorm; "
                       "'lowrank': STR on the singular values of each conv/linear/RNN input weight (learned rank); "
                       "'structured+lowrank' (read as structured with `ranks: true`): channels, then ranks.")
    s_init: float = Field(
        -15.0,
        description="Initial threshold parameter s; g(s_init) is the first threshold (sigmoid(-15) ≈ 3e-7). "
        "Insertion is exact whatever it is (raw tensors are stored so that thresholding gives back the "
        "original values); weight decay on s raises it during training.",
    )
    threshold_fn: Literal["sigmoid"] = Field("sigmoid", description="g, the function mapping s to a threshold.")
    per_channel_threshold: bool = Field(
        False, description="Unstructured: one threshold per output channel instead of one per layer."
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Glob patterns over module names ('fc', 'layer4.*') whose layers are left dense.",
    )
    keep_first_dense: bool = Field(False, description="Leave the first weight layer (in graph order) dense.")
    keep_last_dense: bool = Field(False, description="Leave the last weight layer (in graph order) dense.")
    gates: bool = Field(
        True, description="Structured: give channel groups without a BatchNorm an STR importance vector "
        "(applied to the parameters that write the group's channels)."
    )
    depth: bool = Field(
        True, description="Structured: a scalar STR gate on every residual branch that ends in a linear or "
        "conv layer (x + g'·f(x), as in transformers); a branch whose gate reaches zero is removed by shrink."
    )
    bn_gamma_min: float = Field(
        1e-3,
        ge=0,
        description="Structured: BatchNorm channels with |γ| below this keep their β as a fixed offset "
        "instead of β̂ = β/γ (dividing by a tiny γ would blow β̂ up).",
    )
    ranks: bool = Field(
        False, description="Structured: also learn each conv/linear layer's rank — STR on its singular values "
        "(settings in `lowrank`) under the channel carriers. Shrink cuts the dead channels first, then factors "
        "each cut layer at its learned rank where that saves weights."
    )
    lowrank: LowRankConfig = Field(default_factory=LowRankConfig, description="Low-rank mode (and structured mode "
                                   "with `ranks`): STR on each layer's singular values (strfx.lowrank).")
    capture: CaptureConfig = Field(default_factory=CaptureConfig, description="torch.export capture options.")

    @model_validator(mode="before")
    @classmethod
    def _combined_mode(cls, data: Any) -> Any:
        """``mode: structured+lowrank`` is structured mode with ``ranks`` (what the CLI's --mode offers)."""
        if isinstance(data, dict) and data.get("mode") == "structured+lowrank":
            data = {**data, "mode": "structured", "ranks": True}
        return data

    @property
    def label(self) -> str:
        """The mode as the CLI's --mode names it (``structured+lowrank`` for structured with ranks)."""
        return "structured+lowrank" if self.ranks else self.mode

    @model_validator(mode="after")
    def _ranks_in_structured_mode(self) -> "SparsifyConfig":
        if self.ranks and self.mode != "structured":
            raise ValueError(f"ranks composes learned ranks with structured mode's channels; mode is {self.mode!r} "
                             f"(lowrank mode learns ranks alone: drop ranks, or use mode structured)")
        return self


class StrfxConfig(_Strict):
    """A whole configuration file. The `train` section is :class:`strfx.train_config.TrainConfig`."""

    model: str | None = Field(None, description="MODEL, as on the command line (a .py file or torchvision:NAME).")
    sparsify: SparsifyConfig = Field(default_factory=SparsifyConfig)
    train: TrainConfig | None = Field(None, description="Training recipe (strfx.train_config); written by `strfx train`.")


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    extra = f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    got = f" (got {first['input']!r})" if first["type"] != "missing" and "input" in first else ""
    return f"invalid config {source}: {where}: {first['msg']}{got}{extra}"


def parse_config(data: dict[str, Any] | None, source: str = "<dict>") -> StrfxConfig:
    """Validate a mapping into a :class:`StrfxConfig`, raising a one-line :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return StrfxConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path) -> StrfxConfig:
    """Read a YAML configuration file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config {path}{where} is not valid YAML: {getattr(err, 'problem', err)}") from None
    return parse_config(data, str(path))


def coerce_sparsify_config(config: SparsifyConfig | dict[str, Any] | None, **overrides: Any) -> SparsifyConfig:
    """Accept a SparsifyConfig, a plain dict or None, and apply keyword overrides."""
    data = dict(config) if isinstance(config, dict) else (config or SparsifyConfig()).model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})  # before validating: the mode decides
    try:
        return SparsifyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, "sparsify")) from None


def dump_config(config: StrfxConfig) -> str:
    """The resolved configuration as YAML (what a run directory records)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
