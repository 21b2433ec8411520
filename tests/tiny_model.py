"""A tiny classifier with its own datasets(), for the training tests (seconds per run on CPU)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

CLASSES = 4


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, CLASSES),
    )


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 1, 8, 8),)


def _split(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(CLASSES, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = protos[y] + 0.8 * torch.randn(n, 1, 8, 8, generator=g)
    return TensorDataset(x, y)


def datasets() -> tuple[TensorDataset, TensorDataset]:
    return _split(512, 1), _split(128, 2)
