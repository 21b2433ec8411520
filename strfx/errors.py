"""Errors users can act on.

Every failure strfx can explain is a :class:`StrfxError` whose message is one line saying what
went wrong, where, and how to fix it. The CLI prints that line and exits non-zero; a traceback is
shown only with ``--debug``.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(err: BaseException, limit: int = 300, innermost: bool = False) -> str:
    """``Type: first line`` of an exception from a library, for a one-line report.

    ``innermost`` follows ``raise ... from`` causes to the last one: wrappers such as the ONNX
    exporter's ``ConversionError`` say only that a step failed, their cause says which op.
    Terminal colour codes some libraries put in messages are dropped.
    """
    if innermost:
        while err.__cause__ is not None:
            err = err.__cause__
    text = _ANSI.sub("", str(err)).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:limit]}" if text else type(err).__name__


class StrfxError(Exception):
    """A user-facing error: ``str(err)`` is the whole, one-line explanation."""


class ModelLoadError(StrfxError):
    """MODEL could not be turned into an ``nn.Module`` with example inputs."""


class TraceError(StrfxError):
    """torch.export could not capture the model."""


class ConfigError(StrfxError):
    """A configuration file or value is invalid."""


class NothingToSparsifyError(StrfxError):
    """The chosen mode finds no layer to put STR on."""


class VerificationError(StrfxError):
    """A transformed model does not compute what it should."""


class OutputExistsError(StrfxError):
    """An output path exists and ``--force`` was not given."""


class DataError(StrfxError):
    """Training data is missing, laid out wrongly, or does not fit the model."""


class CheckpointError(StrfxError):
    """A training checkpoint is corrupt, or belongs to a different run or configuration."""


class TrainError(StrfxError):
    """A training run could not start or finish (distributed launch, worker failure...)."""


class ExportError(StrfxError):
    """No exporter could turn the model into a file that loads and runs."""
