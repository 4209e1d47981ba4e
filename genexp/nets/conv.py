"""Convolutional encoder and decoder whose depth follows the image size.

The encoder halves the resolution with stride-2 convolutions until it reaches at most 8x8 (or an
odd size), doubling the width each time (capped at 8x ``base_channels``); the decoder mirrors it
with stride-2 transposed convolutions, so 28 -> 14 -> 7 -> 14 -> 28 and 64 -> 32 -> 16 -> 8 -> ... -> 64.
"""

from __future__ import annotations

import torch
from torch import nn

from genexp.errors import ConfigError, check_int

MAX_DOWNSAMPLES = 5


def conv_plan(image_size: int, base_channels: int) -> tuple[list[int], int]:
    """Return the widths of the stem and each stage, and the final spatial size.

    >>> conv_plan(28, 32)
    ([32, 64, 128], 7)
    """
    check_int("image_size", image_size, minimum=1)
    check_int("base_channels", base_channels, minimum=1)
    if image_size < 8 or image_size % 4:
        raise ConfigError(
            "image_size", image_size, "the conv nets need a multiple of 4 that is >= 8 (e.g. 28, 32, 64)"
        )
    widths, size = [base_channels], image_size
    while size % 2 == 0 and size > 8 and len(widths) <= MAX_DOWNSAMPLES:
        size //= 2
        widths.append(min(widths[-1] * 2, base_channels * 8))
    return widths, size


class ConvEncoder(nn.Module):
    """(B, C, S, S) image -> (B, out_features) vector."""

    def __init__(self, channels: int, image_size: int, out_features: int, base_channels: int = 32):
        super().__init__()
        widths, size = conv_plan(image_size, base_channels)
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1), nn.SiLU()]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1] * size * size, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # (B, W, s, s)
        return self.head(h.flatten(1))


class ConvDecoder(nn.Module):
    """(B, latent_dim) vector -> (B, out_channels, S, S) image parameters (no output activation)."""

    def __init__(self, latent_dim: int, image_size: int, out_channels: int, base_channels: int = 32):
        super().__init__()
        widths, size = conv_plan(image_size, base_channels)
        widths = widths[::-1]
        self.shape = (widths[0], size, size)
        self.head = nn.Linear(latent_dim, widths[0] * size * size)
        layers: list[nn.Module] = [nn.SiLU()]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(widths[-1], out_channels, 3, padding=1))
        self.features = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.head(z).view(z.shape[0], *self.shape)  # (B, W, s, s)
        return self.features(h)
