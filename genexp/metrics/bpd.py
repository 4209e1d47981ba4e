"""Bits per dimension: the likelihood unit every family reports on the same 8-bit data."""

from __future__ import annotations

import math

import torch


def nats_to_bpd(nll_nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """-log p(x) in nats per image -> bits per dimension: nll / (D ln 2), D = C*H*W."""
    return nll_nats / (num_dims * math.log(2.0))
