"""Affine coupling with a checkerboard or channel-wise mask (Dinh et al. 2017, 3.3-3.4; talk 3.3).

With a binary mask b the unmasked half is transformed conditioned on the masked half:

    y = b * x + (1 - b) * (x * exp(s(b * x)) + t(b * x))
    x = b * y + (1 - b) * (y - t(b * y)) * exp(-s(b * y))
    log |det dy/dx| = sum (1 - b) * s               (the Jacobian is triangular)

``checkerboard``: b alternates per pixel, b[h, w] = (h + w + parity) mod 2, same for every channel.
``channel``: b selects half of the channels (the first half for parity 0, the second for parity 1).

The log-scale is soft-clamped, s = max_scale * tanh(s_raw / max_scale), so |s| <= max_scale: one
coupling can scale by at most exp(max_scale), which bounds both directions and keeps sampling
(the inverse, with exp(-s)) finite (the soft clamp of Ardizzone et al. 2019).
"""

from __future__ import annotations

import torch
from torch import nn

from genexp.errors import ConfigError, check_choice, check_float, check_int
from genexp.flows.conditioner import ResNet
from genexp.models.base import upcast

MASKS = ("checkerboard", "channel")


def checkerboard(height: int, width: int, parity: int, like: torch.Tensor) -> torch.Tensor:
    """(1, 1, H, W) mask b, 1 where h + w + parity is even (kept), 0 where it is odd (transformed)."""
    h = torch.arange(height, device=like.device)[:, None]
    w = torch.arange(width, device=like.device)[None, :]
    return (1 - (h + w + parity) % 2).to(like.dtype)[None, None]


class AffineCoupling(nn.Module):
    """Args:
    channels: C of the (B, C, H, W) input.
    hidden_channels, n_res_blocks: width and depth of the ResNet that gives s and t.
    mask: ``checkerboard`` or ``channel`` (needs C >= 2).
    parity: 0 or 1, which half is transformed; alternate it so every dimension gets transformed.
    max_scale: bound on |s| (soft clamp).
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        n_res_blocks: int = 1,
        mask: str = "checkerboard",
        parity: int = 0,
        max_scale: float = 2.0,
    ):
        super().__init__()
        self.mask = check_choice("mask", mask, MASKS)
        self.parity = check_choice("parity", parity, (0, 1))
        self.max_scale = check_float("max_scale", max_scale, positive=True)
        channels = check_int("channels", channels, minimum=1)
        if mask == "checkerboard":
            # the net sees the masked image and the mask itself (which pixels are observed)
            c_in, c_out = channels + 1, 2 * channels
        else:
            if channels < 2:
                raise ConfigError("mask", mask, f"channel-wise coupling needs >= 2 channels, got {channels}")
            self.split = channels // 2 if parity == 0 else channels - channels // 2
            c_in, c_out = self.split, 2 * (channels - self.split)
        self.net = ResNet(c_in, c_out, hidden_channels, n_res_blocks)

    def _scale_shift(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_raw, t = upcast(self.net(cond)).chunk(2, dim=1)
        return self.max_scale * torch.tanh(s_raw / self.max_scale), t

    def _channel_halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditioning part, transformed part); parity 1 swaps which end conditions."""
        if self.parity == 0:
            return x[:, : self.split], x[:, self.split :]
        return x[:, -self.split :], x[:, : -self.split]

    def _join(self, cond: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        return torch.cat([cond, trans] if self.parity == 0 else [trans, cond], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask == "checkerboard":
            b = checkerboard(x.shape[2], x.shape[3], self.parity, x)
            s, t = self._scale_shift(torch.cat([x * b, b.expand(x.shape[0], -1, -1, -1)], 1))
            s, t = s * (1 - b), t * (1 - b)
            return x * torch.exp(s) + t, s.flatten(1).sum(1)
        cond, trans = self._channel_halves(x)
        s, t = self._scale_shift(cond)
        return self._join(cond, trans * torch.exp(s) + t), s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.mask == "checkerboard":
            b = checkerboard(y.shape[2], y.shape[3], self.parity, y)
            s, t = self._scale_shift(torch.cat([y * b, b.expand(y.shape[0], -1, -1, -1)], 1))
            s, t = s * (1 - b), t * (1 - b)
            return (y - t) * torch.exp(-s)
        cond, trans = self._channel_halves(y)
        s, t = self._scale_shift(cond)
        return self._join(cond, (trans - t) * torch.exp(-s))
