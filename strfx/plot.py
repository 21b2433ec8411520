"""The layer-wise sparsity budget plot (like Figures 2-3 of the STR paper): what STR chose per layer."""

from __future__ import annotations

import io
from typing import Any

from pathlib import Path

from strfx.report import Report
from strfx.rundir import atomic_write


def plot_budget(rep: Report, path: str | Path, title: str | None = None) -> Path:
    """Bar per STR layer (sparsity %, size in its label); written atomically as PNG."""

    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (and no display on servers)
    import matplotlib.pyplot as plt

    layers = rep.layers
    unit = "weights" if rep.mode != "structured" else "channels"
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2), 4.2))
    xs = list(range(len(layers)))
    values = [100 * lr.sparsity for lr in layers]
    bars = ax.bar(xs, values, color="tab:blue")
    # Each bar's value on top; each layer's size in its label (a categorical axis: no line joins layers).
    ax.bar_label(bars, labels=[f"{v:.0f}%" for v in values], fontsize=7, padding=1)
    ax.set_ylim(0, 105)
    ax.set_ylabel(f"{unit} removed (%)" if rep.mode == "structured" else "weights zero (%)")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{lr.name} ({lr.elements:,})" for lr in layers], rotation=60, ha="right", fontsize=8)
    ax.set_xlabel(f"STR layer ({unit} in the layer)")
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(title or f"{rep.model}: layer-wise sparsity ({rep.sparsity:.1%} overall)")
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return Path(path)
