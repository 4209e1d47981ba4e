"""The layer protocol and its composition.

A flow layer is an ``nn.Module`` with

    forward(x) -> (y, log_det)      log_det = log |det dy/dx| per example, shape (B,)
    inverse(y) -> x

and, if it changes the shape, ``output_shape((C, H, W)) -> (C', H', W')``. By the change of
variables (talk, section 3.3) a stack y = f_K(...f_1(x)) has log |det dy/dx| = sum_k log |det df_k|.
"""

from __future__ import annotations

import torch
from torch import nn


def output_shape(layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The (C, H, W) that ``layer`` maps ``shape`` to (unchanged unless the layer says otherwise)."""
    fn = getattr(layer, "output_shape", None)
    return tuple(fn(shape)) if fn is not None else tuple(shape)


class FlowSequence(nn.ModuleList):
    """Layers applied in order; log-dets add up, the inverse runs the layers backwards."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for layer in self:
            x, ld = layer(x)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self):
            y = layer.inverse(y)
        return y

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for layer in self:
            shape = output_shape(layer, shape)
        return shape
