"""Reconstruction error of the autoencoding families (AE, VAE, the LDM's first stage)."""

from __future__ import annotations

import torch

# PSNR of a perfect reconstruction is infinite; per-image MSE is floored here, capping it at 100 dB
MSE_FLOOR = 1e-10


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """MSE and PSNR of reconstructions of images in [0, 1], (N, C, H, W).

    mse = mean squared error over every pixel; psnr = mean over images of 10 log10(1 / mse_i) in dB
    (peak value 1), the per-image mean that image-restoration papers report.
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"reconstruction shape {tuple(x_hat.shape)} != image shape {tuple(x.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    err = (x.to(dtype) - x_hat.to(dtype)).pow(2).flatten(1).mean(1)  # (N,) per-image MSE
    psnr = -10.0 * torch.log10(err.clamp_min(MSE_FLOOR))
    return {"mse": float(err.mean()), "psnr": float(psnr.mean())}


@torch.no_grad()
def reconstruction(model, images: torch.Tensor, batch_size: int, device: torch.device) -> dict[str, float]:
    """:func:`reconstruction_metrics` of the family's ``reconstruct`` on uint8 images (N, C, H, W), in batches."""
    xs, x_hats = [], []
    for part in images.split(batch_size):
        x = part.to(device).float().div_(255.0)
        xs.append(x.cpu())
        x_hats.append(model.reconstruct(x).float().clamp(0, 1).cpu())
    return reconstruction_metrics(torch.cat(xs), torch.cat(x_hats))
