"""The layer-wise sparsity budget plot (like Figures 2-3 of the STR paper): what STR chose per layer."""

from __future__ import annotations

from pathlib import Path

from strfx.report import Report
from strfx.rundir import atomic_write


def plot_budget(rep: Report, path: str | Path, title: str | None = None) -> Path:
    """Bar per STR layer (sparsity %), with the layer's size on a log axis; written atomically as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (and no display on servers)
    import matplotlib.pyplot as plt

    layers = rep.layers
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2), 4.2))
    xs = range(len(layers))
    ax.bar(xs, [100 * lr.sparsity for lr in layers], color="tab:blue",
           label="sparsity (%)" if rep.mode != "structured" else "channels removed (%)")
    ax.set_ylim(0, 100)
    ax.set_ylabel("sparsity (%)" if rep.mode != "structured" else "channels removed (%)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([lr.name for lr in layers], rotation=60, ha="right", fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(list(xs), [lr.elements for lr in layers], "o-", color="tab:orange",
             label="weights" if rep.mode != "structured" else "channels")
    ax2.set_yscale("log")
    ax2.set_ylabel("weights per layer" if rep.mode != "structured" else "channels per layer")
    ax.set_title(title or f"{rep.model}: layer-wise sparsity ({rep.sparsity:.1%} overall)")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return Path(path)
