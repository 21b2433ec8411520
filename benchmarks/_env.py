"""What every benchmark table records about where it ran: machine, versions, commit, date, load."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import strfx

ROOT = Path(__file__).resolve().parents[1]


def environment(**extra: Any) -> dict[str, Any]:
    """Machine and software facts for a results file; ``extra`` adds fields (e.g. onnxruntime's version)."""
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(),
            "cpu": cpu, "torch": torch.__version__, "strfx": strfx.__version__, "commit": commit,
            "threads": torch.get_num_threads(), "python": platform.python_version(), "loadavg": os.getloadavg(),
            **extra}
