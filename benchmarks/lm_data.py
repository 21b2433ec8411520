"""Data for benchmarks/lm.py: byte windows of CPython's standard library, with held-out files.

Pure helpers, apart from the benchmark so that tests/test_bench_lm.py checks them without importing strfx.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import torch

VAL_EVERY = 20


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted; installed third-party packages are left out."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    out = [p for p in base.rglob("*.py")
           if p.is_file() and not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(base).parts)]
    return sorted(out, key=lambda p: p.relative_to(base).as_posix())


def split_files(paths: list[Path], every: int = VAL_EVERY) -> tuple[list[Path], list[Path]]:
    """(train, val): every ``every``-th file of the sorted list (from the first) is held out."""
    return [p for i, p in enumerate(paths) if i % every], [p for i, p in enumerate(paths) if i % every == 0]


def read_bytes(paths: list[Path]) -> torch.Tensor:
    """One uint8 stream: the files' bytes, in order, each followed by a newline."""
    return torch.from_numpy(np.frombuffer(b"".join(p.read_bytes() + b"\n" for p in paths), dtype=np.uint8).copy())


def windows(stream: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``length + 1`` bytes (input + next-byte targets) as int64 rows."""
    if stream.numel() < length + 1:
        raise ValueError(f"stream of {stream.numel()} bytes is shorter than a window of {length + 1}")
    starts = torch.randint(0, stream.numel() - length, (count,), generator=generator)
    return stream[starts[:, None] + torch.arange(length + 1)].long()
