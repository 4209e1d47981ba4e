"""Gated PixelCNN (van den Oord et al. 2016), with PixelCNN++'s logistic mixture as an option.

    log P(k) = sum_i log P(k_i | k_<i)        pixels in raster order, exact (no bound)

The network (:mod:`genexp.nets.pixelcnn`) sees the whole image at once and masked convolutions
keep output i blind to pixels >= i, so training is one pass per batch; sampling is one pass per
pixel (per sub-pixel for the categorical head on RGB), the slow extreme of the speed column.

Channels (RGB): with ``head=categorical`` the sub-pixels are ordered R -> G -> B inside each pixel by
the PixelCNN paper's channel masks (the logits of G see R of the same pixel, those of B see R and
G), and sampling runs one network pass per sub-pixel. With ``head=logistic_mixture`` the network
sees only earlier pixels and the channels of a pixel are coupled by PixelCNN++'s linear mean
dependence inside the head (one pass per pixel). On 1-channel data the two orders coincide.

Class conditioning (``num_classes > 0``): a learned class embedding is added as a bias in every
gated block (the paper's conditional PixelCNN, h = one-hot y). ``loss(x, y)`` is -log P(x | y);
without labels (``nll_bpd``, the val/test bpd) the likelihood is that of the marginal model with a
uniform class prior, log P(x) = logsumexp_y log P(x | y) - log K (K network passes), which is
what samples drawn with y ~ U{0..K-1} follow.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from genexp.errors import ConfigError, check_int
from genexp.models.autoregressive import (
    Autoregressive,
    check_temperature,
    make_head,
    sample_levels,
    to_images,
    to_levels,
)
from genexp.nets.pixelcnn import GatedPixelCNN
from genexp.progress import track


class PixelCNN(Autoregressive):
    """Args:
    image_size, channels: data shape (from the dataset config).
    head: ``categorical`` (256-way softmax per sub-pixel) or ``logistic_mixture`` (PixelCNN++).
    n_components: mixture components of ``logistic_mixture`` (unused by ``categorical``).
    hidden_channels: width of the vertical and horizontal stacks.
    n_layers: gated residual blocks (type B) after the type-A input layer.
    kernel_size: odd k >= 3; the vertical stack's kernel is (k//2 + 1) x k, the horizontal one's 1 x (k//2 + 1).
    num_classes: 0 (unconditional) or the number of classes of a learned class bias.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        head: str = "categorical",
        n_components: int = 5,
        hidden_channels: int = 64,
        n_layers: int = 8,
        kernel_size: int = 3,
        num_classes: int = 0,
    ):
        super().__init__(image_size, channels)
        self.head = make_head(head, channels, n_components)
        self.num_classes = check_int("num_classes", num_classes, minimum=0)
        self.net = GatedPixelCNN(
            in_channels=channels,
            out_channels=self.head.num_params,
            hidden_channels=hidden_channels,
            n_layers=n_layers,
            kernel_size=kernel_size,
            groups=1 if self.head.joint_channels else channels,
            out_groups=self.head.param_groups(),
            num_classes=num_classes,
        )
        # uniform outputs at initialisation: an untrained categorical model is at exactly 8 bits/dim
        last = self.net.out[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def check_labels(self, y: torch.Tensor) -> torch.Tensor:
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ConfigError(
                "num_classes",
                self.num_classes,
                f"labels must be in [0, {self.num_classes}); got {int(y.min())}..{int(y.max())} "
                "(-1: the dataset has no labels; use model.num_classes=0)",
            )
        return y

    def params(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """(B, C, H, W) images in [0, 1] -> (B, P, H, W) head parameters, causal in raster order."""
        return self.net(2 * x - 1, y)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) exact log P(k) in nats; with classes: log P(k | y), or the marginal when y is None."""
        if self.num_classes and y is None:
            per_class = [
                self.log_prob(x, torch.full_like(x[:, 0, 0, 0], c, dtype=torch.long))
                for c in range(self.num_classes)
            ]
            return torch.logsumexp(torch.stack(per_class, 1), dim=1) - math.log(self.num_classes)
        y = self.check_labels(y) if self.num_classes else None
        b = x.shape[0]
        k = to_levels(x)  # (B, C, H, W)
        params = self.params(to_images(k).to(x.dtype), y)
        params = params.permute(0, 2, 3, 1).flatten(0, 2)  # (B*H*W, P)
        return self.head.log_prob(params, k.permute(0, 2, 3, 1).flatten(0, 2)).view(b, -1).sum(1)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(n, C, H, W) 8-bit images in [0, 1], one network pass per pixel (per sub-pixel for the
        categorical head on RGB). ``temperature`` T: see :mod:`genexp.models.autoregressive`
        (T = 0 takes the most likely level). ``y``: (n,) classes of a conditional model (default:
        drawn uniformly with ``generator``)."""
        t = check_temperature(temperature)
        weight = self.net.v_in.weight
        c_, h_, w_ = self.shape
        if self.num_classes:
            if y is None:
                y = torch.randint(self.num_classes, (n,), generator=generator, device=weight.device)
            y = self.check_labels(y.to(weight.device))
        else:
            y = None
        x = torch.zeros(n, c_, h_, w_, device=weight.device, dtype=weight.dtype)
        steps = [None] if self.head.joint_channels else range(c_)
        reach = self.net.reach
        for r in track(range(h_), "PixelCNN rows"):
            r0 = max(0, r - reach)
            for c in range(w_):
                c0 = max(0, c - reach)
                for ch in steps:
                    # only the window that pixel (r, c) can see: the same outputs there, fewer FLOPs
                    window = x[:, :, r0 : r + 1, c0 : c + reach + 1]
                    params = self.params(window, y)[:, :, -1, c - c0]  # (n, P)
                    if ch is None:
                        x[:, :, r, c] = to_images(self.head.sample(params, generator, t)).to(x.dtype)
                    else:
                        levels = sample_levels(self.head.logits(params)[:, ch], generator, t)
                        x[:, ch, r, c] = to_images(levels).to(x.dtype)
        return x
