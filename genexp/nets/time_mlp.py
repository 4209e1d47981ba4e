"""A time-conditioned residual MLP: the denoiser ε_θ(z_t, t) for flat latent vectors.

Latent diffusion (Rombach et al. 2022) over a first stage whose latents are vectors rather than
feature maps, where a UNet has no spatial axes to work on. The layout follows the UNet's
residual block with the convolutions replaced by linear layers and GroupNorm by LayerNorm::

    x (B, dim) -> Linear -> [block] x n_blocks -> LayerNorm, SiLU, Linear -> (B, dim)
    block: h = Linear(SiLU(LayerNorm(x)));  h = h * (1 + scale(t)) + shift(t);
           x + Linear(Dropout(SiLU(h)))

The time step enters every block as a per-feature scale and shift (FiLM, as improved DDPM's
"scale-shift norm"). Each block's last linear and the output linear start at zero, so each block
starts as the identity and the first output is 0, as in the UNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genexp.errors import ConfigError, check_float, check_int
from genexp.nets.embeddings import timestep_embedding
from genexp.nets.unet import zero_init


class TimeResBlock(nn.Module):
    """(B, hidden), (B, hidden) time features -> (B, hidden): one residual block."""

    def __init__(self, hidden_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.fc1 = nn.Linear(hidden_dim, hidden_dim)
        self.scale_shift = nn.Linear(hidden_dim, 2 * hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = zero_init(nn.Linear(hidden_dim, hidden_dim))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.fc1(F.silu(self.norm(x)))
        scale, shift = self.scale_shift(F.silu(temb)).chunk(2, dim=1)  # (B, hidden) each
        h = h * (1 + scale) + shift
        return x + self.fc2(self.dropout(F.silu(h)))


class TimeMLP(nn.Module):
    """(B, dim) noisy vector, (B,) time step -> (B, dim).

    Args:
        dim: size of the latent vector (the first stage's ``latent_dim``).
        time_dim: size of the sinusoidal time embedding, projected to ``hidden_dim`` by a 2-layer MLP.
    """

    def __init__(
        self, dim: int, hidden_dim: int = 512, n_blocks: int = 4, dropout: float = 0.0, time_dim: int = 128
    ):
        super().__init__()
        self.dim = check_int("dim", dim, minimum=1)
        check_int("hidden_dim", hidden_dim, minimum=1)
        check_int("n_blocks", n_blocks, minimum=1)
        dropout = check_float("dropout", dropout, minimum=0.0)
        if dropout >= 1.0:
            raise ConfigError("dropout", dropout, "must be in [0, 1)")
        self.time_dim = check_int("time_dim", time_dim, minimum=2)
        self.time_mlp = nn.Sequential(
            nn.Linear(time_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.inp = nn.Linear(dim, hidden_dim)
        self.blocks = nn.ModuleList(TimeResBlock(hidden_dim, dropout) for _ in range(n_blocks))
        self.out_norm = nn.LayerNorm(hidden_dim)
        self.out = zero_init(nn.Linear(hidden_dim, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.time_dim).to(x.dtype))  # (B, hidden)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(F.silu(self.out_norm(h)))
