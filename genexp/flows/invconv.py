"""Invertible 1x1 convolution: a learned channel permutation (Kingma & Dhariwal 2018, 3.2).

    y[:, :, h, w] = W x[:, :, h, w],      log |det| = H * W * log |det W|

``lu=True`` parameterises W = P L (U + diag(sign(s) * exp(log|s|))) with a fixed permutation P, a
unit lower-triangular L and a strictly upper-triangular U, so log |det W| = sum log|s| costs O(C)
instead of O(C^3) and W stays invertible as long as the exp(log|s|) are finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InvConv1x1(nn.Module):
    """Args:
    channels: C of the (B, C, H, W) input.
    lu: LU-decomposed parameterisation (cheaper log-det) instead of a dense W.
    generator: optional generator for the random rotation W is initialised to.
    """

    def __init__(self, channels: int, lu: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        self.lu = lu
        # a random rotation: log |det| = 0 at initialisation, and every channel mixes with every other
        w, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        if not lu:
            self.weight = nn.Parameter(w)
            return
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def _weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W (C, C) and log |det W| (a scalar)."""
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper, self.log_s.sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, log_abs_det = self._weight()
        y = F.conv2d(x, w.to(x.dtype)[:, :, None, None])
        return y, (x.shape[2] * x.shape[3] * log_abs_det).expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        w, _ = self._weight()
        w_inv = torch.linalg.inv(w.double()).to(y.dtype)  # small C x C: float64 for accuracy
        return F.conv2d(y, w_inv[:, :, None, None])
