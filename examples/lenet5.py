"""LeNet-5, Caffe variant (conv 20 → conv 50 → fc 500 → fc 10) for 28×28 MNIST digits.

The model of the STR and Sparse-VD papers' LeNet-5 results: 430.5k parameters.
"""

import torch
from torch import nn


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


def build_model() -> nn.Module:
    return LeNet5()


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 1, 28, 28),)
