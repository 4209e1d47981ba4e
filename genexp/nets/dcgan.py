"""DCGAN generator and discriminator (Radford et al. 2016) sized from the image size.

The discriminator halves the resolution with stride-2 4x4 convolutions until it reaches 4x4 or an
odd size, doubling the width each stage (capped at 8x ``base_channels``); the generator mirrors it
with stride-2 transposed convolutions from a projected ``z``. So 64 -> 32 -> 16 -> 8 -> 4 (the
paper's net), 32 -> 16 -> 8 -> 4 (the usual CIFAR-10 one) and 28 -> 14 -> 7 (MNIST, no padding or
resizing). As in the paper: batch norm and ReLU in G, a tanh output in [-1, 1], LeakyReLU(0.2) in D,
no normalisation on D's first layer, and N(0, 0.02) initial weights.

D's normalisation is a choice (``norm``): ``batch`` is the paper's, but it couples the samples of
a batch, which makes a per-sample gradient penalty (WGAN-GP, R1) ill-defined; ``layer`` (one
GroupNorm group per layer, as WGAN-GP recommends) and ``none`` do not. ``spectral_norm`` divides
every D weight by its largest singular value (Miyato et al. 2018), bounding D's Lipschitz constant.
"""

from __future__ import annotations

import torch
from torch import nn

from genexp.errors import ConfigError, check_choice, check_int

D_NORMS = ("batch", "layer", "none")
MAX_WIDTH_MULTIPLIER = 8


def dcgan_plan(image_size: int, base_channels: int) -> tuple[list[int], int]:
    """Widths of D's stride-2 stages (G's in reverse) and the smallest spatial size.

    >>> dcgan_plan(28, 64)
    ([64, 128], 7)
    >>> dcgan_plan(64, 64)
    ([64, 128, 256, 512], 4)
    """
    check_int("image_size", image_size, minimum=1)
    check_int("base_channels", base_channels, minimum=1)
    if image_size < 8 or image_size % 4:
        raise ConfigError(
            "image_size", image_size, "the conv nets need a multiple of 4 that is >= 8 (e.g. 28, 32, 64)"
        )
    widths, size = [], image_size
    while size % 2 == 0 and size > 4:
        size //= 2
        widths.append(base_channels * min(2 ** len(widths), MAX_WIDTH_MULTIPLIER))
    return widths, size


def dcgan_init(module: nn.Module) -> None:
    """The paper's initialisation: conv weights N(0, 0.02); norm scales N(1, 0.02), shifts 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """(B, z_dim) noise -> (B, channels, S, S) image in [-1, 1]."""

    def __init__(self, z_dim: int, image_size: int, channels: int, base_channels: int = 64):
        super().__init__()
        widths, size = dcgan_plan(image_size, base_channels)
        widths = widths[::-1]
        self.z_dim = check_int("z_dim", z_dim, minimum=1)
        # z as a (z_dim, 1, 1) map -> (widths[0], size, size): the paper's "project and reshape"
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim, widths[0], size, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(True),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, stride=2, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])  # (B, z_dim, 1, 1) -> (B, C, S, S)


class DCGANDiscriminator(nn.Module):
    """(B, channels, S, S) image in [-1, 1] -> (B,) logits (critic values for WGAN)."""

    def __init__(
        self,
        image_size: int,
        channels: int,
        base_channels: int = 64,
        norm: str = "layer",
        spectral_norm: bool = False,
    ):
        super().__init__()
        widths, size = dcgan_plan(image_size, base_channels)
        check_choice("d_norm", norm, D_NORMS)
        layers: list[nn.Module] = []
        c_in = channels
        for i, c_out in enumerate(widths):
            layers.append(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=i == 0 or norm == "none"))
            if i > 0 and norm == "batch":
                layers.append(nn.BatchNorm2d(c_out))
            elif i > 0 and norm == "layer":
                layers.append(nn.GroupNorm(1, c_out))
            layers.append(nn.LeakyReLU(0.2))  # not in place: the gradient penalties differentiate twice
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, size))  # (B, W, s, s) -> (B, 1, 1, 1)
        self.net = nn.Sequential(*layers)
        dcgan_init(self)
        if spectral_norm:
            for m in self.net:
                if isinstance(m, nn.Conv2d):
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()  # (B,)
