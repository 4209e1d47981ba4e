"""The family contract shared by every generative model (see DESIGN.md)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class LossOutput(NamedTuple):
    """What ``loss(x, y)`` returns: the scalar to minimise and detached scalars to log.

    ``logs`` keys are plain names (``recon``, ``kl``); the Lightning glue prefixes the stage
    (``train/recon``) so every family shares one dashboard layout.
    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor]


def nats_to_bpd(nll_nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Convert a negative log-likelihood in nats per image into bits per dimension."""
    return nll_nats / (num_dims * math.log(2.0))
