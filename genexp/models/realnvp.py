"""RealNVP (Dinh, Sohl-Dickstein & Bengio 2017): affine couplings in a multi-scale architecture.

    y_{1:d} = x_{1:d},   y_{d+1:D} = x_{d+1:D} * exp(s(x_{1:d})) + t(x_{1:d}),   log |det| = sum s
                                                                            (talk, section 3.3)

Scales (``mask=checkerboard``, the paper's architecture, fig. 4 of the paper):

    every scale but the last:  n_blocks checkerboard couplings -> squeeze -> n_blocks channel
                               couplings -> factor out half the channels
    the last scale:            n_blocks + 1 checkerboard couplings

so n_scales - 1 squeezes (the paper: n_blocks = 3, i.e. 3 + 3 per scale and 4 at the end). With
``mask=channel`` every scale is squeeze -> n_blocks channel couplings (-> factor out), n_scales
squeezes. Masks alternate between couplings so every dimension is transformed. The paper's batch
norm is replaced by ActNorm after every coupling (``actnorm=true``), so the density of an image does
not depend on its batch. Likelihood, dequantisation and sampling: :mod:`genexp.flows.dequantized`.
"""

from __future__ import annotations

from genexp.errors import check_choice, check_int
from genexp.flows.actnorm import ActNorm
from genexp.flows.base import FlowSequence
from genexp.flows.coupling import MASKS, AffineCoupling
from genexp.flows.dequantized import DequantizedFlow, check_squeezable
from genexp.flows.multiscale import MultiScaleFlow
from genexp.flows.squeeze import Squeeze


class RealNVP(DequantizedFlow):
    """Args:
    image_size, channels: data shape (from the dataset config).
    n_scales: scales of the multi-scale architecture (image_size must survive the squeezes).
    n_blocks: coupling layers per stack (see the module docstring).
    mask: ``checkerboard`` (the paper) or ``channel`` (channel-wise couplings only).
    hidden_channels, n_res_blocks: width and depth of each coupling's ResNet.
    actnorm: an ActNorm after every coupling.
    alpha: margin of the logit pre-transform.
    max_scale: bound on each coupling's |log-scale|.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        n_scales: int = 3,
        n_blocks: int = 3,
        mask: str = "checkerboard",
        hidden_channels: int = 64,
        n_res_blocks: int = 2,
        actnorm: bool = True,
        alpha: float = 0.05,
        max_scale: float = 2.0,
    ):
        super().__init__(image_size, channels, alpha)
        n_scales = check_int("n_scales", n_scales, minimum=1)
        n_blocks = check_int("n_blocks", n_blocks, minimum=1)
        check_choice("mask", mask, MASKS)
        check_int("hidden_channels", hidden_channels, minimum=1)
        check_int("n_res_blocks", n_res_blocks, minimum=0)
        check_choice("actnorm", actnorm, (True, False))
        check_squeezable(image_size, n_scales - (mask == "checkerboard"), n_scales, "realnvp")

        def stack(c: int, n: int, kind: str) -> list:
            layers = []
            for i in range(n):
                layers.append(AffineCoupling(c, hidden_channels, n_res_blocks, kind, i % 2, max_scale))
                if actnorm:
                    layers.append(ActNorm(c))
            return layers

        scales, c = [], channels
        for i in range(n_scales):
            last = i == n_scales - 1
            layers = []
            if mask == "checkerboard":
                layers += stack(c, n_blocks + last, "checkerboard")
                if not last:
                    layers += [Squeeze(), *stack(4 * c, n_blocks, "channel")]
                    c = 2 * c  # 4c after the squeeze, half of it factored out
            else:
                layers += [Squeeze(), *stack(4 * c, n_blocks, "channel")]
                c = 2 * c
            scales.append(FlowSequence(layers))
        self.flow = MultiScaleFlow((channels, image_size, image_size), scales)
