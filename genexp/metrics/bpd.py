"""Bits per dimension: the likelihood unit every family reports on the same 8-bit data."""

from __future__ import annotations

import inspect
import math

import torch


def nats_to_bpd(nll_nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """-log p(x) in nats per image -> bits per dimension: nll / (D ln 2), D = C*H*W."""
    return nll_nats / (num_dims * math.log(2.0))


@torch.no_grad()
def mean_bpd(model, images: torch.Tensor, batch_size: int, device: torch.device, seed: int) -> float:
    """Mean bits/dim of uint8 images (N, C, H, W) under the family's ``nll_bpd`` (exact or a bound)."""
    takes_generator = "generator" in inspect.signature(model.nll_bpd).parameters
    generator = torch.Generator(device=device).manual_seed(seed)
    total, count = 0.0, 0
    # families that draw their noise from the global generator (VAE's z, DDPM's t) get it seeded too
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for part in images.split(batch_size):
            x = part.to(device).float().div_(255.0)
            bpd = model.nll_bpd(x, generator=generator) if takes_generator else model.nll_bpd(x)
            total += float(bpd.double().sum())  # float64 sums: thousands of images
            count += len(part)
    return total / max(count, 1)
