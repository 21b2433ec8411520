"""Reading files users hand strfx: tensors only, and error messages that never suggest loading unsafely.

torch's and numpy's own messages for a file they refuse end with advice such as "re-running
``torch.load`` with ``weights_only`` set to ``False`` will likely succeed" or "load it unsafely using
``allow_pickle=``". For a corrupt or foreign file that advice is wrong, and following it runs
whatever code the file carries. strfx words these errors itself (:func:`reason`).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from strfx.errors import StrfxError

_UNSAFE = re.compile(r"weights_only|allow_pickle|unsafe|arbitrary code|pickle", re.IGNORECASE)


def reason(err: BaseException) -> str:
    """A short, safe description of why a file could not be read (first sentence, no unsafe advice)."""
    text = str(err).strip()
    first = text.splitlines()[0].strip() if text else ""
    first = re.split(r"(?<=[.!?])\s", first, maxsplit=1)[0].rstrip(".")
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            return f"it holds a Python object ({found.group(1)}), and strfx loads only tensors and plain containers"
        return "not a torch file, or a damaged one"
    if not first or _UNSAFE.search(first):
        return f"{type(err).__name__}; the file is corrupt, truncated or not a torch file"
    return first


def load_tensors(path: str | Path, what: str, fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; any failure is one :class:`StrfxError` line."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StrfxError(f"{what} {path} is missing; {fix}") from None
    except Exception as err:  # noqa: BLE001 - truncated, corrupt, foreign or not a torch file
        raise StrfxError(f"{what} {path} is corrupt or unreadable ({reason(err)}); {fix}") from None
