"""Bits per dimension: the likelihood unit every family reports on the same 8-bit data."""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch

from genexp.models.base import EstimatedLikelihood
from genexp.progress import track


def nats_to_bpd(nll_nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """-log p(x) in nats per image -> bits per dimension: nll / (D ln 2), D = C*H*W."""
    return nll_nats / (num_dims * math.log(2.0))


class MeanBPD(NamedTuple):
    """The mean bits/dim over N images and, for an estimate (the ODE likelihood), its standard
    error from the estimator: sqrt(sum_i se_i^2) / N (None: exact or a bound)."""

    value: float
    std_err: float | None


def mean_bpd(model, images: torch.Tensor, batch_size: int, device: torch.device, seed: int) -> float:
    """Mean bits/dim of uint8 images (N, C, H, W) under the family's ``nll_bpd`` (exact or a bound)."""
    return mean_bpd_with_error(model, images, batch_size, device, seed).value


@torch.no_grad()
def mean_bpd_with_error(
    model, images: torch.Tensor, batch_size: int, device: torch.device, seed: int
) -> MeanBPD:
    """:func:`mean_bpd` with the estimator's standard error where the family gives one
    (``nll_bpd_with_error``, :class:`genexp.models.base.EstimatedLikelihood`)."""
    estimated = isinstance(model, EstimatedLikelihood)
    takes_generator = estimated or "generator" in inspect.signature(model.nll_bpd).parameters
    generator = torch.Generator(device=device).manual_seed(seed)
    total, count, var = 0.0, 0, 0.0
    # families that draw their noise from the global generator (VAE's z, DDPM's t) get it seeded too
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for part in track(images.split(batch_size), f"bits/dim of {len(images)} images, batch"):
            x = part.to(device).float().div_(255.0)
            std_err = None
            if estimated:
                bpd, std_err = model.nll_bpd_with_error(x, generator=generator)
            else:
                bpd = model.nll_bpd(x, generator=generator) if takes_generator else model.nll_bpd(x)
            total += float(bpd.double().sum())  # float64 sums: thousands of images
            count += len(part)
            var = None if std_err is None or var is None else var + float(std_err.double().pow(2).sum())
    std = math.sqrt(var) / count if var is not None and count and math.isfinite(var) else None
    return MeanBPD(total / max(count, 1), std)
