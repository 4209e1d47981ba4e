"""Glow (Kingma & Dhariwal 2018): steps of ActNorm, invertible 1x1 convolution and affine coupling.

    one step of flow:  ActNorm -> InvConv1x1 (a learned channel permutation) -> affine coupling
    every scale:       squeeze -> n_steps steps -> factor out half the channels (not after the last)

so n_scales squeezes (the paper: CIFAR-10 with n_scales = 3, n_steps = 32, 512 hidden channels).
The coupling is channel-wise with a fixed split; the 1x1 convolution before it decides which
mixtures of channels condition and which are transformed. The factored-out halves follow the same
standard-normal base as the rest (the paper's learned split prior is not used). Likelihood,
dequantisation and sampling: :mod:`genexp.flows.dequantized`.
"""

from __future__ import annotations

from genexp.errors import check_choice, check_int
from genexp.flows.actnorm import ActNorm
from genexp.flows.base import FlowSequence
from genexp.flows.coupling import AffineCoupling
from genexp.flows.dequantized import DequantizedFlow, check_squeezable
from genexp.flows.invconv import InvConv1x1
from genexp.flows.multiscale import MultiScaleFlow
from genexp.flows.squeeze import Squeeze


class Glow(DequantizedFlow):
    """Args:
    image_size, channels: data shape (from the dataset config).
    n_scales: scales (L in the paper); image_size must be a multiple of 2**n_scales.
    n_steps: steps of flow per scale (K in the paper).
    hidden_channels, n_res_blocks: width and depth of each coupling's ResNet.
    lu: LU-parameterised 1x1 convolutions (O(C) log-det) instead of dense ones.
    alpha: margin of the logit pre-transform.
    max_scale: bound on each coupling's |log-scale|.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        n_scales: int = 2,
        n_steps: int = 8,
        hidden_channels: int = 128,
        n_res_blocks: int = 1,
        lu: bool = True,
        alpha: float = 0.05,
        max_scale: float = 2.0,
    ):
        super().__init__(image_size, channels, alpha)
        n_scales = check_int("n_scales", n_scales, minimum=1)
        n_steps = check_int("n_steps", n_steps, minimum=1)
        check_int("hidden_channels", hidden_channels, minimum=1)
        check_int("n_res_blocks", n_res_blocks, minimum=0)
        check_choice("lu", lu, (True, False))
        check_squeezable(image_size, n_scales, n_scales, "glow")

        scales, c = [], channels
        for i in range(n_scales):
            c = 4 * c  # after the squeeze
            layers = [Squeeze()]
            for _ in range(n_steps):
                layers += [
                    ActNorm(c),
                    InvConv1x1(c, lu=lu),
                    AffineCoupling(c, hidden_channels, n_res_blocks, "channel", 0, max_scale),
                ]
            scales.append(FlowSequence(layers))
            if i < n_scales - 1:
                c = c // 2  # factored out
        self.flow = MultiScaleFlow((channels, image_size, image_size), scales)
