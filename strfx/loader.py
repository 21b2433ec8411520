"""Turn MODEL into a model and example inputs.

MODEL is a Python file, ``torchvision:NAME``, ``timm:NAME`` (random init, nothing downloaded) or
``hf:PATH`` (a local HuggingFace directory with a ``config.json``; its weights when present, else a
random init from the config; never the network). A model file defines ``build_model()`` and may
define ``example_inputs()`` (default: one 1×3×224×224 tensor) and ``datasets()`` (train and
validation datasets, for ``strfx train``). Every way this can fail becomes one
:class:`~strfx.errors.ModelLoadError` line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
from torch import nn

from strfx.errors import ModelLoadError, StrfxError
from strfx.safeload import load_tensors

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
HF_PREFIX = "hf:"


@dataclass
class LoadedModel:
    """A built model with its inputs and where it came from."""

    model: nn.Module
    example_inputs: tuple[Any, ...]
    name: str
    spec: str  # normalised MODEL: absolute file path or torchvision:NAME
    module: ModuleType | None = field(default=None, repr=False)

    def hook(self, name: str) -> Callable[..., Any] | None:
        """An optional function the model file defines (``datasets``...)."""
        fn = getattr(self.module, name, None) if self.module is not None else None
        return fn if callable(fn) else None


def _default_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)


def _where(err: BaseException, path: Path) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == path]
    return f" (line {frames[-1].lineno})" if frames else ""


def _import_file(path: Path) -> ModuleType:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"strfx_user_model_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses/pickling inside the file need it
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        sys.modules.pop(mod_name, None)
        raise ModelLoadError(f"syntax error in {path} line {err.lineno}: {err.msg}; fix the file") from None
    except Exception as err:  # noqa: BLE001 - the user's module code may raise anything
        sys.modules.pop(mod_name, None)
        raise ModelLoadError(
            f"importing {path} raised {type(err).__name__}{_where(err, path)}: {err}; fix the file"
        ) from err
    return module


def _call(fn: Callable[[], Any], what: str, path: Path) -> Any:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - the user's function may raise anything
        raise ModelLoadError(f"{what} in {path} raised {type(err).__name__}{_where(err, path)}: {err}") from err


def _as_inputs(value: Any, path: Path) -> tuple[Any, ...]:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise ModelLoadError(
        f"example_inputs() in {path} returned {type(value).__name__}; return a tensor or a tuple of tensors"
    )


def load_from_file(path: str | Path) -> LoadedModel:
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if path.is_dir() or path.suffix != ".py":
        raise ModelLoadError(f"MODEL must be a .py file defining build_model(), torchvision:NAME, timm:NAME or "
                             f"hf:PATH, got {path}")
    module = _import_file(path)
    build = getattr(module, "build_model", None)
    if not callable(build):
        raise ModelLoadError(f"{path} does not define build_model(); add a function that returns the nn.Module")
    model = _call(build, "build_model()", path)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"build_model() in {path} returned {type(model).__name__}, not a torch.nn.Module")
    make_inputs = getattr(module, "example_inputs", None)
    inputs = _as_inputs(_call(make_inputs, "example_inputs()", path), path) if callable(make_inputs) else _default_inputs()
    _check_runs(model, inputs, path, defined=callable(make_inputs))
    return LoadedModel(model, inputs, path.stem, str(path), module)


def _shapes(inputs: tuple[Any, ...]) -> str:
    return ", ".join("×".join(map(str, t.shape)) + ("" if t.dtype == torch.float32 else f" {t.dtype}") for t in inputs)


def _check_runs(model: nn.Module, inputs: tuple[Any, ...], path: Path, defined: bool) -> None:
    """Run the model once on its example inputs, so a wrong shape is one line here and not a trace failure later.

    In eval mode and without gradients, so neither BatchNorm statistics nor anything else changes.
    """
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(*inputs)
    except Exception as err:  # noqa: BLE001 - any error of the user's forward on these inputs
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        what = "a tensor of shape" if len(inputs) == 1 else "tensors of shapes"
        source = (f"example_inputs() in {path} returned {what} {_shapes(inputs)}" if defined else
                  f"{path} defines no example_inputs(), and the default input {_shapes(inputs)}")
        fix = "return inputs the model accepts" if defined else "define example_inputs() returning inputs it accepts"
        raise ModelLoadError(f"{source} that build_model()'s model cannot run ({type(err).__name__}: {first}); "
                             f"{fix}") from None
    finally:
        model.train(was)


def load_from_torchvision(name: str) -> LoadedModel:
    from strfx._torchvision import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        close = [n for n in available if name.lower() in n or n in name.lower()][:5]
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise ModelLoadError(f"unknown torchvision model {name!r}{hint}")
    try:
        model = torchvision.models.get_model(name, weights=None)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"torchvision could not build {name!r}: {type(err).__name__}: {err}") from err
    inputs = _default_inputs()
    if name.startswith("inception") or name == "googlenet":
        inputs = (torch.randn(1, 3, 299, 299, generator=torch.Generator().manual_seed(0)),)
    return LoadedModel(model, inputs, name, TORCHVISION_PREFIX + name)


def load_from_timm(name: str) -> LoadedModel:
    """A timm model with random weights and its default input size."""
    try:
        import timm
    except ImportError:
        raise ModelLoadError("timm:NAME needs timm; install it with `pip install timm`") from None
    if not timm.list_models(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ModelLoadError(f"unknown timm model {name!r}{hint}")
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"timm could not build {name!r}: {type(err).__name__}: {err}") from err
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    inputs = (torch.randn(1, *size, generator=torch.Generator().manual_seed(0)),)
    return LoadedModel(model, inputs, name, TIMM_PREFIX + name)


def hf_example_inputs(config: Any, batch: int = 1, seq: int = 16) -> tuple[Any, ...]:
    """Inputs a HuggingFace model of ``config`` takes: token ids, pixels or audio features."""
    gen = torch.Generator().manual_seed(0)
    if getattr(config, "num_mel_bins", None):  # speech (Whisper): log-mel features
        frames = 2 * getattr(config, "max_source_positions", 1500)
        return (torch.randn(batch, config.num_mel_bins, frames, generator=gen),)
    if getattr(config, "image_size", None) and getattr(config, "num_channels", None):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return (torch.randn(batch, config.num_channels, size, size, generator=gen),)
    vocab = getattr(config, "vocab_size", None) or 100
    return (torch.randint(0, vocab, (batch, seq), generator=gen),)


def load_from_hf(path_text: str) -> LoadedModel:
    """A local HuggingFace model directory (``config.json``); loaded without the network."""
    path = Path(path_text).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"hf:{path_text} needs a local directory with a config.json (nothing is downloaded)")
    try:
        import transformers
    except ImportError:
        raise ModelLoadError("hf:PATH needs transformers; install it with `pip install transformers`") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        cls = cls or transformers.AutoModel
        weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        if weights:
            model = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=any(path.glob("*.safetensors")))
        else:
            model = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"transformers could not load {path}: {type(err).__name__}: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    model.config.use_cache = False  # a plain forward; generation turns the cache back on itself
    return LoadedModel(model, hf_example_inputs(config), path.name, HF_PREFIX + str(path))


def load_model(spec: str) -> LoadedModel:
    """Build the model MODEL names; raises :class:`ModelLoadError` with one clear line."""
    if spec.startswith(TORCHVISION_PREFIX):
        return load_from_torchvision(spec[len(TORCHVISION_PREFIX):])
    if spec.startswith(TIMM_PREFIX):
        return load_from_timm(spec[len(TIMM_PREFIX):])
    if spec.startswith(HF_PREFIX):
        return load_from_hf(spec[len(HF_PREFIX):])
    return load_from_file(spec)


def load_init(loaded: LoadedModel, path: str | Path) -> None:
    """``--init`` (train, transform, inspect): load a state dict of MODEL's own model (before STR goes in),
    strictly, tensors only (``weights_only=True``).

    A dict holding the state dict under ``state_dict`` or ``model`` (common checkpoint layouts) is
    accepted too. Any missing, unexpected or differently shaped key is one line naming them.
    """
    fix = "give a state dict of build_model()'s model, saved with torch.save(model.state_dict(), PATH)"
    state = load_tensors(path, "--init", fix)
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = state.get("state_dict", state.get("model"))
        state = inner if isinstance(inner, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StrfxError(f"--init {path} is not a state dict (a dict of tensors); {fix}")
    own = loaded.model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    problems = ([f"missing {few(missing)}"] if missing else []) + ([f"unexpected {few(unexpected)}"] if unexpected
                                                                    else []) + ([f"shape {few(shapes)}"] if shapes else [])
    if problems:
        raise StrfxError(f"--init {path} does not fit {loaded.name}: {'; '.join(problems)}; {fix}")
    loaded.model.load_state_dict(state, strict=True)
