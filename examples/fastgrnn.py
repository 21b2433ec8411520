"""A FastGRNN-style RNN (Kusupati et al., NeurIPS 2018) on sequential MNIST: each 28×28 image is read as
28 steps of 28 pixels.

The cell is written with plain ``nn.Linear`` layers for its input-to-hidden (``W``) and hidden-to-hidden
(``U``) matrices, so low-rank STR (``strfx.lowrank``) learns the rank of both, and factoring turns each
into two thin Linears — the low-rank FastGRNN of the paper, with the ranks learned instead of chosen:

    z_t = σ(W x_t + U h_{t-1} + b_z)
    h̃_t = tanh(W x_t + U h_{t-1} + b_h)
    h_t = (ζ (1 − z_t) + ν) ⊙ h̃_t + z_t ⊙ h_{t-1},      ζ = σ(ζ̂), ν = σ(ν̂)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

HIDDEN = 64
MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist.npz"


class FastGRNNCell(nn.Module):
    """One FastGRNN step: the gate and the candidate share ``W x + U h`` (two matmuls per step)."""

    def __init__(self, input_size: int, hidden_size: int, zeta_init: float = 1.0, nu_init: float = -4.0) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.W = nn.Linear(input_size, hidden_size, bias=False)
        self.U = nn.Linear(hidden_size, hidden_size, bias=False)
        self.bias_z = nn.Parameter(torch.ones(hidden_size))
        self.bias_h = nn.Parameter(torch.zeros(hidden_size))
        self.zeta = nn.Parameter(torch.full((1,), zeta_init))
        self.nu = nn.Parameter(torch.full((1,), nu_init))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        pre = self.W(x) + self.U(h)
        z = torch.sigmoid(pre + self.bias_z)
        h_tilde = torch.tanh(pre + self.bias_h)
        return (torch.sigmoid(self.zeta) * (1 - z) + torch.sigmoid(self.nu)) * h_tilde + z * h


class SequentialMNIST(nn.Module):
    """Reads a B×1×28×28 image row by row (28 steps × 28 pixels) and classifies the last hidden state."""

    def __init__(self, hidden_size: int = HIDDEN, num_classes: int = 10, rows: int = 28, cols: int = 28) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.cell = FastGRNNCell(cols, hidden_size)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(x.shape[0], self.rows, self.cols)
        h = seq.new_zeros(x.shape[0], self.cell.hidden_size)
        for t in range(self.rows):
            h = self.cell(seq[:, t], h)
        return self.fc(h)


def build_model() -> nn.Module:
    return SequentialMNIST()


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 1, 28, 28),)


def datasets() -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """Full MNIST from the shared dev/CI file when it is there, else the subset shipped in the package."""
    from strfx.data import demo_path, load_npz

    path = MNIST if MNIST.is_file() else demo_path()
    data = load_npz(path, str(path))
    return data.train, data.val
