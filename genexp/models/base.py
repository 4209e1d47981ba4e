"""The family contract shared by every generative model (see DESIGN.md)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossOutput(NamedTuple):
    """What ``loss(x, y)`` returns: the scalar to minimise and detached scalars to log.

    ``logs`` keys are plain names (``recon``, ``kl``); the Lightning glue prefixes the stage
    (``train/recon``) so every family shares one dashboard layout.
    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor]


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision activations (under bf16/fp16 autocast) -> float32 for losses; others unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
