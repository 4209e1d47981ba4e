"""Latent diffusion: DDPM in the latent space of a trained, frozen AE/VAE (Rombach et al. 2022;
the talk's Stable Diffusion slide, section 3.4).

The first stage compresses an image to a latent vector (genexp's AE and VAE have vector latents,
so the denoiser is a time-conditioned residual MLP rather than a UNet). Latents are standardised,
z' = (z − shift) · scale with shift and scale measured on training data (Stable Diffusion's
``scale_factor``), so the unit-variance noise schedule fits them; samples are decoded by the first
stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from genexp.diffusion.gaussian_diffusion import GaussianDiffusion
from genexp.diffusion.noise_schedule import NoiseSchedule
from genexp.errors import ConfigError, check_int
from genexp.models.base import Autoencoding, LossOutput

log = logging.getLogger(__name__)


class LDM(nn.Module):
    """Args:
    first_stage: a trained AE/VAE (``encode``, ``decode``, ``latent_dim``); frozen here. In the
        config, ``model.first_stage`` is the run dir or .ckpt of that run (loaded by the runner).
    net: ``dim -> denoiser`` (a ``_partial_`` from the config, e.g. :class:`TimeMLP`), built for the
        first stage's latent size.
    schedule, sampler, objective, loss_weighting, min_snr_gamma: see :class:`GaussianDiffusion`.
    calibration_images: how many fixed training images measure the latents' statistics before
        training (:meth:`prepare`); a resumed run keeps the statistics it measured.
    """

    def __init__(
        self,
        first_stage: nn.Module,
        net: Callable[..., nn.Module],
        schedule: NoiseSchedule,
        sampler: Callable,
        objective: str = "eps",
        loss_weighting: str = "simple",
        min_snr_gamma: float = 5.0,
        calibration_images: int = 2048,
    ):
        super().__init__()
        if not isinstance(first_stage, Autoencoding):
            raise ConfigError(
                "first_stage", type(first_stage).__name__, "must be an AE or VAE (encode, decode, latent_dim)"
            )
        self.calibration_images = check_int("calibration_images", calibration_images, minimum=2)
        self.first_stage = first_stage.eval().requires_grad_(False)
        self.latent_dim = int(first_stage.latent_dim)
        self.diffusion = GaussianDiffusion(
            net(dim=self.latent_dim), schedule, sampler, objective, loss_weighting, min_snr_gamma
        )
        # z' = (z - shift) * scale; scale 0 means "not measured yet" (see calibrate)
        self.register_buffer("latent_shift", torch.zeros(()))
        self.register_buffer("latent_scale", torch.zeros(()))

    def train(self, mode: bool = True) -> LDM:
        super().train(mode)
        self.first_stage.eval()  # frozen: never in training mode (no dropout, no statistics updates)
        return self

    @property
    def calibrated(self) -> bool:
        return bool(self.latent_scale > 0)

    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, latent_dim) first-stage codes (a VAE's posterior mean)."""
        return self.first_stage.encode(x).float()

    @torch.no_grad()
    def prepare(self, datamodule) -> None:
        """Before fit: standardise by the latents of ``calibration_images`` fixed training images
        (the same images on every rank); a resumed run keeps the statistics it measured."""
        if not self.calibrated:
            x, _ = datamodule.fixed_batch("train", self.calibration_images)
            self.calibrate(x.to(self.latent_shift.device))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Measure the latents' mean and standard deviation on training images x (all scalars)."""
        z = self.encode_latents(x)
        std = z.std()
        if not torch.isfinite(std) or std <= 0:
            raise ConfigError("first_stage", "latents", f"its latents have std {float(std)}; is it trained?")
        self.latent_shift.copy_(z.mean())
        self.latent_scale.copy_(1.0 / std)
        log.info(
            "latent diffusion: latents of %d training images have mean %.4g, std %.4g; scaled by %.4g",
            len(x),
            float(z.mean()),
            float(std),
            float(self.latent_scale),
        )

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> LossOutput:
        if not self.calibrated:  # prepare() measured a larger training batch before fit
            self.calibrate(x)
        z = (self.encode_latents(x) - self.latent_shift) * self.latent_scale
        loss, logs = self.diffusion.training_loss(z.to(x.dtype))
        return LossOutput(loss, logs)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, C, H, W) images in [0, 1]: diffuse in latent space, then decode with the first stage."""
        z = self.diffusion.sample((n, self.latent_dim), generator)
        z = z.float() / self.latent_scale.clamp_min(1e-12) + self.latent_shift
        return self.first_stage.decode(z).float().clamp(0.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The first stage's reconstruction (the ceiling on what the latent diffusion can reach)."""
        return self.first_stage.decode(self.encode_latents(x)).float().clamp(0.0, 1.0)
