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


def ema_update(decay: float):
    """``multi_avg_fn`` for ``AveragedModel``: EMA with a warm-up, beta_t = min(decay, (1+t)/(10+t)).

    The warm-up keeps the average from dragging the random initial weights along for ~1/(1-decay)
    steps; integer buffers (BatchNorm's batch counter) are copied.
    """

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        t = int(num_averaged)
        beta = min(decay, (1 + t) / (10 + t))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c.to(a.dtype), 1.0 - beta)
            else:
                a.copy_(c)

    return update
