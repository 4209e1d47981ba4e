"""Variational autoencoder (Kingma & Welling 2014) with a diagonal Gaussian posterior.

    ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I))          (talk, section 3.1)
    z = mu + sigma * eps, eps ~ N(0, I)                               (reparameterisation)

Trained on -(E[log p(x|z)] - beta * KL), with an optional linear KL warm-up of beta from 0.
``nll_bpd`` is an upper bound on the bits/dim of the 8-bit data: -log p(x) <= -ELBO (or the
tighter importance-weighted bound of Burda et al. 2016 with ``nll_samples > 1``), divided by
D ln 2 where D = C*H*W.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from genexp.errors import check_choice, check_float, check_int
from genexp.metrics.bpd import nats_to_bpd
from genexp.models.base import LossOutput, upcast
from genexp.models.likelihoods import LIKELIHOODS
from genexp.nets.conv import ConvDecoder, ConvEncoder


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) summed over the last dim: (B, D) -> (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def _log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


class VAE(nn.Module):
    """Convolutional VAE.

    Args:
        image_size, channels: data shape (from the dataset config).
        latent_dim: size of z.
        base_channels: width of the first conv layer (doubles per stage).
        beta: weight of the KL term (beta-VAE; 1 is the ELBO).
        kl_warmup_steps: linearly raise beta from 0 over this many training steps (0: off).
        likelihood: ``bernoulli`` (BCE, the default) or ``discretized_logistic`` (8-bit).
        nll_samples: importance samples for the ``nll_bpd`` bound (1: the ELBO).
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        latent_dim: int = 16,
        base_channels: int = 32,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        likelihood: str = "bernoulli",
        nll_samples: int = 1,
    ):
        super().__init__()
        self.latent_dim = check_int("latent_dim", latent_dim, minimum=1)
        self.channels = check_int("channels", channels, minimum=1)
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.beta = check_float("beta", beta, minimum=0.0)
        self.kl_warmup_steps = check_int("kl_warmup_steps", kl_warmup_steps, minimum=0)
        self.nll_samples = check_int("nll_samples", nll_samples, minimum=1)
        self.likelihood = LIKELIHOODS[check_choice("likelihood", likelihood, list(LIKELIHOODS))]()
        self.encoder = ConvEncoder(channels, image_size, 2 * latent_dim, base_channels)
        self.decoder = ConvDecoder(
            latent_dim, image_size, channels * self.likelihood.params_per_channel, base_channels
        )
        # training steps seen, for the KL warm-up; a buffer so it is checkpointed and resumed
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    @property
    def num_dims(self) -> int:
        return self.channels * self.image_size * self.image_size

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> q(z|x)'s mean and log-variance, (B, latent_dim) each."""
        mu, logvar = upcast(self.encoder(x)).chunk(2, dim=-1)
        return mu, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the posterior mean (B, latent_dim): the code (the contract's ``encode``)."""
        return self.posterior(x)[0]

    def current_beta(self) -> float:
        if self.kl_warmup_steps == 0:
            return self.beta
        return self.beta * min(1.0, (int(self.num_steps) + 1) / self.kl_warmup_steps)

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> LossOutput:
        mu, logvar = self.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        out = upcast(self.decoder(z))
        log_px = self.likelihood.log_prob(out, x).flatten(1).sum(1)  # (B,) nats
        kl = gaussian_kl(mu, logvar)  # (B,)
        beta = self.current_beta()
        if self.training:
            self.num_steps += 1
        loss = (-log_px + beta * kl).mean()
        with torch.no_grad():
            log_pmf = self.likelihood.log_pmf(out, x).flatten(1).sum(1)
            logs = {
                "recon": -log_px.mean(),
                "kl": kl.mean(),
                "elbo": (log_px - kl).mean(),
                "bpd": nats_to_bpd(-(log_pmf - kl), self.num_dims).mean(),
                "mse": (self.likelihood.mean(out) - x).pow(2).mean(),
            }
            if self.training and self.kl_warmup_steps:
                logs["beta"] = torch.tensor(beta)
        return LossOutput(loss, logs)

    @torch.no_grad()
    def nll_bpd(self, x: torch.Tensor) -> torch.Tensor:
        """Upper bound on bits/dim of the 8-bit images x, per image: (B, C, H, W) -> (B,)."""
        mu, logvar = self.posterior(x)
        if self.nll_samples == 1:
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            log_pmf = self.likelihood.log_pmf(upcast(self.decoder(z)), x).flatten(1).sum(1)
            return nats_to_bpd(-(log_pmf - gaussian_kl(mu, logvar)), self.num_dims)
        log_w = []
        for _ in range(self.nll_samples):  # log w = log p(x|z) + log p(z) - log q(z|x)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            log_pmf = self.likelihood.log_pmf(upcast(self.decoder(z)), x).flatten(1).sum(1)
            log_w.append(
                log_pmf
                + _log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
                - _log_normal(z, mu, logvar)
            )
        log_px = torch.logsumexp(torch.stack(log_w), dim=0) - math.log(self.nll_samples)
        return nats_to_bpd(-log_px, self.num_dims)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> the decoder's mean image (B, C, H, W) in [0, 1]."""
        return self.likelihood.mean(upcast(self.decoder(z.to(self.decoder.head.weight.dtype))))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean: (B, C, H, W) -> (B, C, H, W) in [0, 1]."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode z ~ N(0, I): (n, C, H, W) mean images in [0, 1]."""
        ref = self.num_steps
        z = torch.randn(n, self.latent_dim, generator=generator, device=ref.device)
        return self.decode(z)
