"""The multi-scale architecture: factor out half of the dimensions after each scale (Dinh et al. 2017, 3.6).

    h_0 = x;   (z_i, h_{i+1}) = split(f_i(h_i)) for i < L-1;   z_{L-1} = f_{L-1}(h_{L-1})
    z = (z_0, ..., z_{L-1}) ~ N(0, I)

The factored-out z_i skip the later scales, so deeper scales are cheaper and the latents form a
hierarchy from local (z_0) to global (z_{L-1}). The latents are returned flattened and concatenated,
(B, D) with D = C*H*W, so the whole multi-scale flow is itself a layer ``x -> (z, log_det)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from genexp.flows.base import FlowSequence


class MultiScaleFlow(nn.Module):
    """Args:
    input_shape: (C, H, W) of the inputs.
    scales: one :class:`FlowSequence` per scale; after every scale but the last, the second half
        of the channels is factored out (the channel count there must be even).
    """

    def __init__(self, input_shape: tuple[int, int, int], scales: list[FlowSequence]):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.scales = nn.ModuleList(scales)
        shapes, shape = [], self.input_shape
        for i, scale in enumerate(self.scales):
            c, h, w = scale.output_shape(shape)
            if i < len(self.scales) - 1:
                if c % 2:
                    raise ValueError(f"scale {i} ends with {c} channels; factor-out needs an even count")
                shapes.append((c // 2, h, w))
                shape = (c // 2, h, w)
            else:
                shapes.append((c, h, w))
        self.latent_shapes = shapes  # the z_i, in order
        self.num_dims = sum(math.prod(s) for s in shapes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> z (B, D) and log |det dz/dx| (B,)."""
        zs, log_det = [], x.new_zeros(x.shape[0])
        for i, scale in enumerate(self.scales):
            x, ld = scale(x)
            log_det = log_det + ld
            if i < len(self.scales) - 1:
                x, z = x.chunk(2, dim=1)  # keep the first half, factor out the second
                zs.append(z.flatten(1))
        zs.append(x.flatten(1))
        return torch.cat(zs, dim=1), log_det

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) -> (B, C, H, W)."""
        parts = z.split([math.prod(s) for s in self.latent_shapes], dim=1)
        parts = [p.reshape(z.shape[0], *s) for p, s in zip(parts, self.latent_shapes)]
        x = parts[-1]
        for i in reversed(range(len(self.scales))):
            if i < len(self.scales) - 1:
                x = torch.cat([x, parts[i]], dim=1)
            x = self.scales[i].inverse(x)
        return x
