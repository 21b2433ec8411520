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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError

Mode = Literal["unstructured", "structured"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TraceConfig(_Strict):
    """How the model is traced with torch.fx."""

    leaf_modules: list[str] = Field(
        default_factory=lambda: ["StochasticDepth"],
        description="Modules kept as single call_module nodes instead of traced through. An entry "
        "matches a class name ('StochasticDepth'), a dotted class path ('torchvision.ops.StochasticDepth') "
        "or a glob over module names ('features.3.*'). Use it for code FX cannot trace (data-dependent "
        "control flow) and for modules whose behaviour depends on train/eval mode.",
    )
    concrete_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Arguments of forward() fixed at trace time (torch.fx concrete_args), e.g. flags.",
    )


class SparsifyConfig(_Strict):
    """Where and how STR is inserted."""

    mode: Mode = Field("unstructured", description="'unstructured': STR on conv/linear weights; "
                       "'structured': STR-BN on BatchNorm γ and STR gates on BN-free producers.")
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
        True, description="Structured: insert an STR gate after producers that have no BatchNorm to threshold."
    )
    bn_gamma_min: float = Field(
        1e-3,
        ge=0,
        description="Structured: BatchNorm channels with |γ| below this keep their β as a fixed offset "
        "instead of β̂ = β/γ (dividing by a tiny γ would blow β̂ up).",
    )
    trace: TraceConfig = Field(default_factory=TraceConfig, description="torch.fx tracing options.")


class StrfxConfig(_Strict):
    """A whole configuration file. The `train` section is defined by strfx.train."""

    model: str | None = Field(None, description="MODEL, as on the command line (a .py file or torchvision:NAME).")
    sparsify: SparsifyConfig = Field(default_factory=SparsifyConfig)
    train: dict[str, Any] | None = Field(None, description="Training recipe (see `strfx train --help`).")


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
    if config is None:
        config = SparsifyConfig()
    elif isinstance(config, dict):
        try:
            config = SparsifyConfig.model_validate(config)
        except ValidationError as err:
            raise ConfigError(_format_validation_error(err, "sparsify")) from None
    data = config.model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return SparsifyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, "sparsify")) from None


def dump_config(config: StrfxConfig) -> str:
    """The resolved configuration as YAML (what a run directory records)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
