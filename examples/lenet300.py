"""LeNet-300-100: the fully connected MNIST baseline of Han et al. (2015), 266.2k parameters."""

import torch
from torch import nn


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 1, 28, 28),)
