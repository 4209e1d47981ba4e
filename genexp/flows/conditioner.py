"""The coupling layers' conditioner: a small ResNet without normalisation layers.

Batch-norm-free so that the density of an image does not depend on the rest of its batch. The
head is initialised to zero, so every coupling starts as the identity (s = t = 0), which keeps
early training stable (Kingma & Dhariwal 2018, 3.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    """x + conv3x3(relu(conv3x3(relu(x)))), width kept."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class ResNet(nn.Module):
    """(B, in_channels, H, W) -> (B, out_channels, H, W): stem, residual blocks, zero-initialised head.

    Args:
        n_res_blocks: residual blocks between stem and head (0: conv - relu - conv, Glow's shape).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, n_res_blocks: int):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden_channels) for _ in range(n_res_blocks)])
        self.head = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.blocks(self.stem(x))))
