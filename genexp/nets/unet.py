"""The time-conditioned UNet of DDPM (Ho et al. 2020, ``diffusion_tf/models/unet.py``): ε_θ(x_t, t).

A 3x3 stem, then one *level* per entry of ``channel_mults``: ``num_res_blocks`` residual blocks of
width ``base_channels * mult`` (each followed by self-attention where the level's resolution is in
``attention_resolutions``) and a stride-2 conv down to the next level; a middle of
res-attention-res at the lowest resolution; then the levels in reverse with ``num_res_blocks + 1``
blocks each and a nearest-x2 + conv up between them. Every output of the down path (the stem,
each block, each downsample) is pushed on a stack, and every up-path block concatenates one
popped skip onto its input, so the stack is empty at the end. The time ``t`` enters every residual
block through a per-channel bias computed from its sinusoidal embedding.

DDPM CIFAR-10 (``image_size=32, base_channels=128, channel_mults=(1, 2, 2, 2),
num_res_blocks=2, attention_resolutions=(16,)``); the down path pushes 1 + 4*2 + 3 = 12 skips,
the up path pops 4*3 = 12::

    size   down path (every output pushed)      up path (every block pops one skip)
    32x32  stem 128, res 128 x2, down           res 128 x3          -> GroupNorm, SiLU, conv -> out
    16x16  (res 256 + attn) x2, down            (res 256 + attn) x3, up
     8x8   res 256 x2, down                     res 256 x3, up
     4x4   res 256 x2  ->  middle: res, attn, res  ->  res 256 x3, up

MNIST (``image_size=28, channel_mults=(1, 2, 2)``) halves twice, 28 -> 14 -> 7, so attention may
sit at 28, 14 or 7 (the tiny preset attends at 7 only)::

    28x28  stem, res x n, down                  res x (n+1)         -> out
    14x14  res x n, down                        res x (n+1), up
     7x7   res x n  ->  middle: res, attn, res  ->  res x (n+1), up

With the DDPM CIFAR-10 settings this net has the official model's 35,746,307 parameters. As in
DDPM, the last conv of each residual block, the attention output projection and the final conv
start at zero, so each block starts as the identity and the net's first output is 0; all other
layers keep PyTorch's default init (as improved DDPM does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genexp.errors import ConfigError, check_float, check_int
from genexp.nets.embeddings import timestep_embedding


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to 0 and return it (DDPM's ``init_scale=0``)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """(B, c_in, H, W), (B, temb_dim) -> (B, c_out, H, W): two GroupNorm-SiLU-conv3x3 with t added between."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(num_groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        # DDPM's "nin" shortcut: a 1x1 conv only where the width changes
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]  # (B, c_out, 1, 1) bias per sample
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class Attention(nn.Module):
    """(B, C, H, W) -> (B, C, H, W): multi-head self-attention over the H*W positions, residual."""

    def __init__(self, channels: int, num_heads: int, num_groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        # (B, heads, H*W, C/heads) each; reshape, not view: a channels_last input is not contiguous
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C/heads)) v
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class ResAttnBlock(nn.Module):
    """A :class:`ResBlock`, followed by :class:`Attention` where the level asks for it."""

    def __init__(
        self, c_in: int, c_out: int, temb_dim: int, dropout: float, num_groups: int, heads: int, attn: bool
    ):
        super().__init__()
        self.res = ResBlock(c_in, c_out, temb_dim, dropout, num_groups)
        self.attn = Attention(c_out, heads, num_groups) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, temb))


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2) by a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The blocks at one resolution and the resampling to the next (``None`` at the end of a path)."""

    def __init__(self, blocks: list[ResAttnBlock], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


def _positive_ints(key: str, values, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ConfigError(key, values, "must be a list of integers")
    if not values and not allow_empty:
        raise ConfigError(key, values, "must list at least one integer")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(key, values, "must be a list of integers >= 1")
    return tuple(values)


class UNet(nn.Module):
    """(B, in_channels, S, S) noisy image, (B,) time step -> (B, out_channels, S, S), e.g. ε_θ(x_t, t).

    Args:
        image_size: side S of the square input; a multiple of ``2 ** (len(channel_mults) - 1)``.
        channel_mults: one entry per resolution level: the level's width is ``base_channels * mult``.
        attention_resolutions: the side lengths (pixels, e.g. 16 for the 16x16 level) at which
            self-attention follows each residual block; the middle always has one.
        num_groups: GroupNorm groups; must divide every level's width.
        out_channels: defaults to ``in_channels`` (predicting ε or x_0); twice that learns a variance too.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        base_channels: int = 128,
        channel_mults: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        num_groups: int = 32,
        out_channels: int | None = None,
    ):
        super().__init__()
        check_int("in_channels", in_channels, minimum=1)
        check_int("image_size", image_size, minimum=1)
        check_int("base_channels", base_channels, minimum=1)
        mults = _positive_ints("channel_mults", channel_mults, allow_empty=False)
        check_int("num_res_blocks", num_res_blocks, minimum=1)
        attn_res = _positive_ints("attention_resolutions", attention_resolutions, allow_empty=True)
        dropout = check_float("dropout", dropout, minimum=0.0)
        if dropout >= 1.0:
            raise ConfigError("dropout", dropout, "must be in [0, 1)")
        check_int("num_heads", num_heads, minimum=1)
        check_int("num_groups", num_groups, minimum=1)
        if out_channels is not None:
            check_int("out_channels", out_channels, minimum=1)

        factor = 2 ** (len(mults) - 1)
        if image_size % factor:
            raise ConfigError(
                "image_size",
                image_size,
                f"{len(mults)} levels halve the image {len(mults) - 1} times, so it must be a multiple of "
                f"{factor} (e.g. {', '.join(str(factor * k) for k in (1, 2, 4, 7, 8))}); or change channel_mults",
            )
        resolutions = [image_size // 2**i for i in range(len(mults))]
        widths = [base_channels * m for m in mults]
        if any(w % num_groups for w in [base_channels, *widths]):
            raise ConfigError(
                "num_groups",
                num_groups,
                f"must divide base_channels={base_channels} and every level's width "
                f"(base_channels * channel_mults = {widths})",
            )
        for r in attn_res:
            if r not in resolutions:
                raise ConfigError(
                    "attention_resolutions",
                    list(attn_res),
                    f"{r} is not a resolution of this net; it visits {', '.join(map(str, resolutions))}",
                )
        # the middle always attends, at the lowest level's width
        for r, w in zip(resolutions, widths):
            if (r in attn_res or r == resolutions[-1]) and w % num_heads:
                raise ConfigError(
                    "num_heads", num_heads, f"must divide the width {w} of the {r}x{r} attention"
                )

        self.in_channels, self.image_size = in_channels, image_size
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.base_channels = base_channels
        temb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )

        def block(c_in: int, c_out: int, attn: bool) -> ResAttnBlock:
            return ResAttnBlock(c_in, c_out, temb_dim, dropout, num_groups, num_heads, attn)

        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        skips, c = [base_channels], base_channels  # widths pushed on the stack, in order
        down = []
        for i, (r, w) in enumerate(zip(resolutions, widths)):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(block(c, w, r in attn_res))
                c = w
                skips.append(c)
            last = i == len(mults) - 1
            if not last:
                skips.append(c)
            down.append(Level(blocks, None if last else Downsample(c)))
        self.down = nn.ModuleList(down)

        self.mid1 = ResBlock(c, c, temb_dim, dropout, num_groups)
        self.mid_attn = Attention(c, num_heads, num_groups)
        self.mid2 = ResBlock(c, c, temb_dim, dropout, num_groups)

        up = []
        for i in reversed(range(len(mults))):
            r, w = resolutions[i], widths[i]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(c + skips.pop(), w, r in attn_res))
                c = w
            up.append(Level(blocks, Upsample(c) if i > 0 else None))
        self.up = nn.ModuleList(up)
        assert not skips  # every push has its pop

        self.out_norm = nn.GroupNorm(num_groups, c)
        self.out_conv = zero_init(nn.Conv2d(c, self.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype))  # (B, 4 * base)
        hs = [self.stem(x)]
        for level in self.down:
            for block in level.blocks:
                hs.append(block(hs[-1], temb))
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))
        h = self.mid2(self.mid_attn(self.mid1(hs[-1], temb)), temb)
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
            if level.resample is not None:
                h = level.resample(h)
        return self.out_conv(F.silu(self.out_norm(h)))
