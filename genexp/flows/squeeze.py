"""Squeeze: trade space for channels, (B, C, H, W) -> (B, 4C, H/2, W/2) (Dinh et al. 2017, fig. 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Squeeze(nn.Module):
    """Each 2x2 block of pixels becomes 4 channels: a permutation, so log |det| = 0.

    Channel ``4c + 2i + j`` holds the pixel at offset (i, j) of channel c (``pixel_unshuffle``).
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(y, 2)

    def output_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = shape
        return (4 * c, h // 2, w // 2)
