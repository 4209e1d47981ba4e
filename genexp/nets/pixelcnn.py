"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders").

Causality: the output at pixel i = (r, c) of the raster order may depend on the pixels (r', c')
with r' < r, or r' = r and c' < c, and never on pixel i or later. A single stack of masked k x k
convolutions (the first PixelCNN) keeps that but has a blind spot: pixels above and to the right,
further than the kernel reaches in one layer, never enter the receptive field. Two stacks remove it:

- the **vertical stack** v sees whole rows above: a (k//2 + 1) x k kernel padded on top only. In the
  first layer (type A) its bottom kernel row, the current image row, is masked, so v(r, .) holds
  rows < r only; later layers (type B) may read the current row of v, which is itself from above.
- the **horizontal stack** h sees the current row to the left: a 1 x (k//2 + 1) kernel padded on the
  left only, whose last column (the current pixel) is masked in the first layer (type A); v feeds
  h at the same position through a 1x1 convolution, bringing in every row above, to the right too.

Channel groups (the PixelCNN paper's channel masks, for a per-sub-pixel output on RGB): with
``groups = C`` the features are split into C groups, and at the current pixel group g may read
image channels < g (type A) or feature groups <= g (type B); connections to other pixels are
unrestricted. So the logits of sub-pixel (i, g) see the sub-pixels of channels < g of pixel i and
everything before pixel i (R -> G -> B). ``groups = 1``: the current pixel is invisible.

Each gated block is y = tanh(W_f * x + b_f(y)) * sigmoid(W_g * x + b_g(y)) on both stacks, with the
v pre-activation added into h, a residual connection on h, and an optional class bias b(y).
Tensors are (B, channels, H, W). Every convolution is padded on top, so the rows below r do not
change the outputs of row r, and the receptive field is bounded (``GatedPixelCNN.reach``): sampling
runs the network on a window around the pixel only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genexp.errors import ConfigError, check_choice, check_int

MASK_TYPES = ("A", "B")


def channel_groups(n: int, groups: int) -> torch.Tensor:
    """(n,) group of each of ``n`` channels split into ``groups`` contiguous groups."""
    return torch.arange(n) * groups // n


def channel_mask(out_groups: torch.Tensor, in_groups: torch.Tensor, mask_type: str) -> torch.Tensor:
    """(out, in) float: 1 where output group g may read input group j at the current pixel:
    j < g (type A), j <= g (type B)."""
    check_choice("mask_type", mask_type, MASK_TYPES)
    if mask_type == "A":
        return (in_groups[None, :] < out_groups[:, None]).float()
    return (in_groups[None, :] <= out_groups[:, None]).float()


class MaskedConv2d(nn.Conv2d):
    """A convolution with explicit (left, right, top, bottom) zero padding and a fixed weight mask.

    The mask multiplies the weight in every forward pass, so the masked weights get no gradient and
    stay out of the function whatever they are set to (an optimizer's weight decay, a test's
    random re-initialisation).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        padding: tuple[int, int, int, int],
        mask: torch.Tensor | None = None,
    ):
        super().__init__(in_channels, out_channels, kernel_size, padding=0)
        self.pad = padding
        if mask is not None:
            mask = mask.expand_as(self.weight).clone()
        self.register_buffer("mask", mask, persistent=False)  # rebuilt from the arguments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.mask is None else self.weight * self.mask
        return F.conv2d(F.pad(x, self.pad), weight, self.bias)


def vertical_conv(c_in: int, c_out: int, k: int, mask_type: str) -> MaskedConv2d:
    """(k//2 + 1) x k kernel over the rows above (and the current row for type B), padded on top."""
    h = k // 2 + 1
    mask = None
    if mask_type == "A":  # the first layer: not the current image row
        mask = torch.ones(1, 1, h, k)
        mask[..., -1, :] = 0
    return MaskedConv2d(c_in, c_out, (h, k), (k // 2, k // 2, k // 2, 0), mask)


def horizontal_conv(
    c_in: int, c_out: int, k: int, mask_type: str, in_groups: torch.Tensor, out_groups: torch.Tensor
) -> MaskedConv2d:
    """1 x (k//2 + 1) kernel over the current row up to the current pixel, padded on the left; the
    current pixel's column carries the channel mask of ``mask_type``."""
    w = k // 2 + 1
    mask = torch.ones(c_out, c_in, 1, w)
    mask[:, :, 0, -1] = channel_mask(out_groups, in_groups, mask_type)
    return MaskedConv2d(c_in, c_out, (1, w), (k // 2, 0, 0, 0), mask)


def pointwise_conv(c_in: int, c_out: int, in_groups: torch.Tensor, out_groups: torch.Tensor) -> MaskedConv2d:
    """1x1 convolution at the current pixel: type B channel mask (group g reads groups <= g)."""
    mask = channel_mask(out_groups, in_groups, "B")[:, :, None, None]
    return MaskedConv2d(c_in, c_out, (1, 1), (0, 0, 0, 0), None if bool(mask.all()) else mask)


def gate(pre: torch.Tensor) -> torch.Tensor:
    """(B, 2n, H, W) -> (B, n, H, W): tanh(first half) * sigmoid(second half)."""
    f, g = pre.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedBlock(nn.Module):
    """One type-B gated layer of both stacks: (v, h, class) -> (v', h')."""

    def __init__(self, channels: int, kernel_size: int, groups: int, num_classes: int = 0):
        super().__init__()
        n = channels
        g = channel_groups(n, groups)
        g2 = torch.cat([g, g])  # the gate's two halves follow the same grouping
        self.v_conv = vertical_conv(n, 2 * n, kernel_size, "B")
        # v holds rows above only, so it may feed every group of h at the same position
        self.v_to_h = nn.Conv2d(2 * n, 2 * n, 1)
        self.h_conv = horizontal_conv(n, 2 * n, kernel_size, "B", g, g2)
        self.h_out = pointwise_conv(n, n, g, g)
        self.class_bias = nn.Embedding(num_classes, 2 * n) if num_classes else None
        if self.class_bias is not None:
            nn.init.normal_(self.class_bias.weight, std=0.02)

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v_pre = self.v_conv(v)  # (B, 2n, H, W)
        h_pre = self.h_conv(h) + self.v_to_h(v_pre)
        if self.class_bias is not None:
            bias = self.class_bias(y)[:, :, None, None]  # (B, 2n, 1, 1): the same at every pixel
            v_pre, h_pre = v_pre + bias, h_pre + bias
        return gate(v_pre), h + self.h_out(gate(h_pre))


class GatedPixelCNN(nn.Module):
    """(B, in_channels, H, W) image in [-1, 1] -> (B, out_channels, H, W) causal outputs.

    Args:
        in_channels, out_channels: image channels; output parameters per pixel.
        hidden_channels: width of both stacks.
        n_layers: gated blocks (type B) after the type-A input convolutions.
        kernel_size: odd k >= 3 (see the module docstring).
        groups: channel groups (1, or the image channels for per-sub-pixel outputs).
        out_groups: (out_channels,) group of each output (default: all 0).
        num_classes: 0, or the number of classes of a learned bias in every block.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 64,
        n_layers: int = 8,
        kernel_size: int = 3,
        groups: int = 1,
        out_groups: torch.Tensor | None = None,
        num_classes: int = 0,
    ):
        super().__init__()
        n = check_int("hidden_channels", hidden_channels, minimum=1)
        check_int("n_layers", n_layers, minimum=0)
        k = check_int("kernel_size", kernel_size, minimum=3)
        if k % 2 == 0:
            raise ConfigError("kernel_size", k, "must be odd (the kernels are centred on the pixel)")
        groups = check_int("groups", groups, minimum=1)
        if n < groups:
            raise ConfigError("hidden_channels", n, f"must be >= {groups} (one feature group per channel)")
        self.num_classes = check_int("num_classes", num_classes, minimum=0)
        in_groups = channel_groups(in_channels, groups)
        g = channel_groups(n, groups)
        if out_groups is None:
            out_groups = torch.zeros(out_channels, dtype=torch.long)
        # outputs at (r, c) depend on inputs within `reach` rows above and columns either side: each
        # layer (the input one included) widens the cone by k//2, so a crop of the image to
        # rows [r - reach, r] and columns [c - reach, c + reach] gives the same output at (r, c)
        self.reach = (n_layers + 1) * (k // 2)
        self.v_in = vertical_conv(in_channels, n, k, "A")
        self.h_in = horizontal_conv(in_channels, n, k, "A", in_groups, g)
        self.blocks = nn.ModuleList(GatedBlock(n, k, groups, num_classes) for _ in range(n_layers))
        self.out = nn.Sequential(
            nn.ReLU(), pointwise_conv(n, n, g, g), nn.ReLU(), pointwise_conv(n, out_channels, g, out_groups)
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        v, h = self.v_in(x), self.h_in(x)  # (B, n, H, W) each
        for block in self.blocks:
            v, h = block(v, h, y)
        return self.out(h)
