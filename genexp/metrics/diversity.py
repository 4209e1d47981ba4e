"""Sample-set statistics from pairwise pixel distances: diversity and the energy distance.

Both compare a batch of samples Y with a batch of real images X using the Euclidean distance of
flattened images (divided by sqrt(D), the RMS pixel difference, so numbers read the same at every
resolution); both are unbiased U-statistics (self-pairs left out), so batch means average well.

- diversity = E||Y - Y'|| / E||X - X'||: 1 when samples are as spread out as the data; far below 1
  signals mode collapse (many samples alike).
- energy distance (Szekely & Rizzo 2013) = (2 E||X - Y|| - E||X - X'|| - E||Y - Y'||) / E||X - X'||:
  >= 0 in expectation, 0 only when the two distributions are equal; it rises for blurry, noisy and
  collapsed samples alike, so it tracks progress where the GAN losses do not (talk, section 3.2).
  A pixel-space statistic: a coarse but cheap proxy until a feature-space FID/KID exists.
"""

from __future__ import annotations

import math

import torch


def pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMS pixel distances, (N, ...) x (M, ...) -> (N, M), in float32 or wider."""
    a = a.flatten(1)
    b = b.flatten(1)
    dtype = torch.promote_types(a.dtype, torch.float32)
    return torch.cdist(a.to(dtype), b.to(dtype)) / math.sqrt(a.shape[1])


def mean_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """E||X - X'|| over distinct pairs of a batch of N >= 2 images: a scalar."""
    n = x.shape[0]
    if n < 2:
        raise ValueError("mean_pairwise_distance needs at least 2 images")
    return pairwise_distances(x, x).sum() / (n * (n - 1))  # the zero diagonal drops out


def diversity_ratio(samples: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """E||Y - Y'|| / E||X - X'||: samples' spread relative to the data's (1: as diverse)."""
    return mean_pairwise_distance(samples) / mean_pairwise_distance(real).clamp_min(1e-12)


def energy_distance(samples: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(2 E||X - Y|| - E||X - X'|| - E||Y - Y'||) / E||X - X'||, relative to the data's spread."""
    xx = mean_pairwise_distance(real)
    yy = mean_pairwise_distance(samples)
    xy = pairwise_distances(real, samples).mean()
    return (2 * xy - xx - yy) / xx.clamp_min(1e-12)
