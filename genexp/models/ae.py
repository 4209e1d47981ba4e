"""Deterministic autoencoder (talk, section 3.1): encoder -> low-dimensional latent -> decoder.

An AE has no distribution to sample from: the talk's two problems are that the latent region the
data occupies is unknown, and that the space between codes is not trained. ``sample`` therefore
decodes latents drawn from a Gaussian fitted to the training codes (a running estimate of their
mean and covariance, updated like BatchNorm statistics), and ``loss`` logs how far that fit is
from N(0, I), the distribution a VAE would enforce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genexp.errors import check_choice, check_float, check_int
from genexp.models.base import LossOutput, upcast
from genexp.nets.conv import ConvDecoder, ConvEncoder

RECONSTRUCTIONS = ("mse", "bce")


def gaussian_kl_full(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, cov) || N(0, I)) = 0.5 (tr cov + |mean|^2 - d - log det cov)."""
    d = mean.shape[-1]
    return 0.5 * (torch.diagonal(cov).sum() + mean.pow(2).sum() - d - torch.logdet(cov))


class AE(nn.Module):
    """Convolutional autoencoder.

    Args:
        image_size, channels: data shape (from the dataset config).
        latent_dim: size of the code.
        base_channels: width of the first conv layer (doubles per stage).
        reconstruction: ``mse`` or ``bce`` (binary cross-entropy on intensities).
        prior_momentum: update rate of the running Gaussian fit to the training codes.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        latent_dim: int = 16,
        base_channels: int = 32,
        reconstruction: str = "mse",
        prior_momentum: float = 0.05,
    ):
        super().__init__()
        self.latent_dim = check_int("latent_dim", latent_dim, minimum=1)
        self.channels = check_int("channels", channels, minimum=1)
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.reconstruction = check_choice("reconstruction", reconstruction, RECONSTRUCTIONS)
        self.prior_momentum = check_float("prior_momentum", prior_momentum, positive=True, maximum=1.0)
        self.encoder = ConvEncoder(channels, image_size, latent_dim, base_channels)
        self.decoder = ConvDecoder(latent_dim, image_size, channels, base_channels)
        # the fitted Gaussian over training codes; buffers so they are checkpointed and move with .to()
        self.register_buffer("prior_mean", torch.zeros(latent_dim))
        self.register_buffer("prior_cov", torch.eye(latent_dim))
        self.register_buffer("prior_fitted", torch.zeros((), dtype=torch.bool))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, latent_dim)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> (B, C, H, W) images in [0, 1]."""
        out = self.decoder(z)
        return torch.sigmoid(out) if self.reconstruction == "bce" else out.clamp(0.0, 1.0)

    @torch.no_grad()
    def _update_prior(self, z: torch.Tensor) -> None:
        if z.shape[0] < 2:
            return
        with torch.autocast(z.device.type, enabled=False):  # statistics in the buffers' precision
            z = z.to(self.prior_mean.dtype)
            mean = z.mean(0)
            cov = torch.cov(z.T).reshape(self.latent_dim, self.latent_dim)
        if not bool(self.prior_fitted):
            self.prior_mean.copy_(mean)
            self.prior_cov.copy_(cov)
            self.prior_fitted.fill_(True)
        else:
            self.prior_mean.lerp_(mean, self.prior_momentum)
            self.prior_cov.lerp_(cov, self.prior_momentum)

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> LossOutput:
        z = self.encode(x)
        out = upcast(self.decoder(z))  # the loss in float32 under mixed precision
        if self.reconstruction == "bce":
            loss = F.binary_cross_entropy_with_logits(out, x)
            x_hat = torch.sigmoid(out)
        else:
            loss = F.mse_loss(out, x)
            x_hat = out
        if self.training:
            self._update_prior(z.detach())
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            cov = self.prior_cov + 1e-6 * torch.eye(self.latent_dim, device=z.device)
            logs = {
                "recon": loss.detach(),
                "mse": (x_hat.clamp(0, 1) - x).pow(2).mean(),
                "latent_std": z.std(0).mean() if z.shape[0] > 1 else torch.zeros((), device=z.device),
                "prior_kl_to_std_normal": gaussian_kl_full(self.prior_mean, cov),
            }
        return LossOutput(loss, logs)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode z ~ N(prior_mean, prior_cov), the Gaussian fitted to training codes: (n, C, H, W)."""
        eps = torch.randn(
            n,
            self.latent_dim,
            generator=generator,
            device=self.prior_mean.device,
            dtype=self.prior_mean.dtype,
        )
        eye = torch.eye(self.latent_dim, device=eps.device)
        scale = torch.linalg.cholesky(self.prior_cov + 1e-5 * eye)
        return self.decode(self.prior_mean + eps @ scale.T)
