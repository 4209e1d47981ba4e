"""Sinusoidal embedding of a (diffusion) time step: the Transformer's positional encoding of
Vaswani et al. 2017, as used for ``t`` by DDPM (Ho et al. 2020) and improved DDPM.

Frequency ``i`` of ``half = dim // 2`` is ``max_period ** (-i / half)``, so the periods run
geometrically from 2π to nearly ``2π · max_period``; the output is ``[sin(t f_i) | cos(t f_i)]``
(sines first, as in DDPM's code). DDPM's TF code divides by ``half - 1`` instead of ``half``, a
slightly different frequency grid that the following linear layer absorbs; ``half`` is defined
for every ``dim >= 2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genexp.errors import check_float, check_int


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) integer or real time steps -> (B, dim) float32 embedding; an odd ``dim`` ends in a 0 column.

    Computed in float32 whatever the autocast state: ``t`` up to 1,000 times a frequency of 1
    needs more mantissa than bf16's 8 bits to give distinct sines.
    """
    check_int("dim", dim, minimum=2)
    check_float("max_period", max_period, positive=True)
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb
