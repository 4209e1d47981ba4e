"""The one sampling loop of genexp, and the sampling speed measurement.

``genexp sample``, ``genexp evaluate`` and the ``val/fid`` callback all draw through
:func:`sample_uint8`, so a grid, an ``.npz`` and the images scored by FID are quantised alike.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from genexp.progress import task


class Samples(NamedTuple):
    images: torch.Tensor  # (N, C, H, W) uint8 on the CPU: k = round(255 x)
    nonfinite: int  # samples that held a NaN or an infinity (drawn as 0 there)


@torch.no_grad()
def sample_uint8(
    model: torch.nn.Module,
    n: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    **kwargs,
) -> Samples:
    """Draw ``n`` samples in batches as 8-bit images, the data's own quantisation.

    Args:
        model: a family in eval mode (``sample(n, generator, **kwargs)`` in [0, 1]).
        generator: one generator for all batches, so a seed fixes the whole set (for a given batch size).
        kwargs: extra arguments of the family's ``sample`` (``temperature``, ``truncation``).
    """
    out, nonfinite = [], 0
    # counted in images, so a short last batch weighs what it costs (reported where a command turned it on)
    with task("sampled images", n, ordinal=False) as wait:
        for start in range(0, n, batch_size):
            wait.span = min(batch_size, n - start)
            x = model.sample(wait.span, generator=generator, **kwargs).float()
            bad = ~torch.isfinite(x)
            nonfinite += int(bad.flatten(1).any(1).sum())
            x = x.masked_fill(bad, 0.0).clamp(0, 1)
            out.append(x.mul(255).round().to(torch.uint8).cpu())
            wait.advance(wait.span)
    return Samples(torch.cat(out), nonfinite)


@torch.no_grad()
def sampling_speed(
    model, batch_size: int, repeats: int, device: torch.device, kwargs: dict, seed: int
) -> dict:
    """Samples/s and ms/sample at ``batch_size``, after one warm-up batch (allocations, cuDNN autotune)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    model.sample(batch_size, generator=generator, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        model.sample(batch_size, generator=generator, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    n = batch_size * repeats
    return {
        "samples_per_sec": n / seconds,
        "ms_per_sample": 1000 * seconds / n,
        "speed_batch_size": batch_size,
        "speed_device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
