"""ActNorm: a per-channel affine map with data-dependent initialisation (Kingma & Dhariwal 2018, 3.1).

    y = (x + b) * exp(logs),      log |det| = H * W * sum_c logs_c

The first forward pass in training mode sets b and logs so that the outputs of that batch have zero
mean and unit variance per channel; after that they are ordinary parameters. It replaces batch norm,
whose statistics would make the density depend on the rest of the batch.

Under DDP every rank sees a different first batch. So that all ranks start from the same
parameters, the per-channel sums, sums of squares and counts are all-reduced over the default
process group before the statistics are taken: the initialisation uses the union of the ranks'
first batches (the same result as one process with the global batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ActNorm(nn.Module):
    """Args:
    channels: C of the (B, C, H, W) input.
    eps: added to the standard deviation at initialisation.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps
        # a buffer so a checkpoint (or a resumed run) is not re-initialised from new data
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._init_checked = False  # python-side cache: read the buffer once, not every step

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set bias and logs from the batch ``x`` (B, C, H, W), all-reduced over DDP ranks."""
        x = x.detach().transpose(0, 1).flatten(1).double()  # (C, B*H*W): float64 sums
        stats = torch.stack([x.sum(1), x.pow(2).sum(1), x.new_full((x.shape[0],), x.shape[1])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        total, total_sq, count = stats
        mean = total / count
        var = (total_sq / count - mean.pow(2)).clamp(min=0.0)
        self.bias.copy_(-mean.view_as(self.bias))
        self.logs.copy_(-torch.log(var.sqrt() + self.eps).view_as(self.logs))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not self._init_checked:
            if not bool(self.initialized):
                self.initialize(x)
            self._init_checked = True
        y = (x + self.bias) * torch.exp(self.logs)
        log_det = (x.shape[2] * x.shape[3]) * self.logs.sum()
        return y, log_det.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.bias
