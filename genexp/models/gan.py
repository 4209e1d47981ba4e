"""Generative adversarial network (Goodfellow et al. 2014) with DCGAN networks (talk, section 3.2).

A generator G maps noise z ~ N(0, I) to images, a discriminator D tells real images from G's; they
are trained alternately on the objectives of ``gan_losses`` (non-saturating by default):

    D step:  minimise d_loss(D(x), D(G(z)))  [+ lambda GP (wgan_gp)]  [+ gamma/2 R1]    G fixed
    G step:  minimise g_loss(D(G(z)))                                                    D fixed

The family contract for a GAN is ``d_loss(x_real, y)`` and ``g_loss(x_real, y)`` (each a
``LossOutput``; G's uses the real batch only for its size, device and the diversity log) and
``sample(n, generator)`` in [0, 1] (``genexp.models.base.Adversarial``). The Lightning glue
(``genexp.lit.gan_module``) owns the optimizers, their per-network arguments, gradient clipping
(the config's ``module:`` node) and the alternation; the model keeps ``d_steps_per_g_step``
(n_critic), part of the objective.

Images are in [0, 1] outside the model and in [-1, 1] (G's tanh range) inside it.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from genexp.errors import ConfigError, check_choice, check_float, check_int
from genexp.metrics.diversity import diversity_ratio, energy_distance
from genexp.models.base import LossOutput, ema_update, upcast
from genexp.models.gan_losses import LOSSES, gradient_penalty, r1_penalty
from genexp.nets.dcgan import D_NORMS, DCGANDiscriminator, DCGANGenerator


def check_truncation(truncation) -> float:
    """A finite t > 0 (null, not inf, turns truncation off)."""
    t = check_float("truncation", truncation, positive=True)
    if not math.isfinite(t):
        raise ConfigError("truncation", truncation, "must be finite (null turns truncation off)")
    return t


def truncated_normal(
    shape: tuple[int, ...], truncation: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """N(0, 1) entries conditioned on |z| <= t, one uniform draw each by the inverse CDF.

    Redrawing the entries beyond t takes about 1/P(|z| <= t) rounds, which never ends for a tiny t
    (1e-9); the inverse CDF costs one draw for any t. By symmetry the draw u in [0, 1) picks a
    sign (u < 1/2) and p = Phi(-t) + (1/2 - Phi(-t)) w in the lower half (w the rest of 2u), so
    |z| = -Phi^{-1}(p) is computed from the precise lower tail; float64 where the device has it.
    """
    check_truncation(truncation)
    dtype = torch.float32 if device.type == "mps" else torch.float64
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    low = torch.special.ndtr(torch.tensor(-float(truncation), dtype=dtype, device=device))
    v = 2 * u
    sign = torch.where(v < 1, -1.0, 1.0).to(dtype)
    p = low + (0.5 - low) * (v - v.floor())
    z = sign * (-torch.special.ndtri(p)).clamp(0, float(truncation))
    return z.float()


class GAN(nn.Module):
    """DCGAN generator and discriminator with a choice of objective and stabilisers.

    Args:
        image_size, channels: data shape (from the dataset config).
        z_dim: size of the noise z ~ N(0, I).
        g_base_channels, d_base_channels: width of G's last and D's first stage (doubles per stage).
        loss: ``ns`` (non-saturating, the default), ``minimax``, ``hinge`` or ``wgan_gp``.
        d_norm: normalisation in D: ``layer`` (default), ``batch`` (DCGAN's) or ``none``.
        spectral_norm: spectral normalisation of D's weights.
        gp_weight: lambda of the WGAN-GP gradient penalty (``loss=wgan_gp`` only; the paper's 10).
        r1_gamma: weight gamma of the R1 penalty on real images, added as gamma/2 * R1 (0: off).
        d_steps_per_g_step: D steps per G step (n_critic; WGAN-GP uses 5).
        ema_decay: decay of an exponential moving average of G's weights, used by ``sample``
            (0: off; e.g. 0.999).
        truncation: default truncation of z for ``sample``: z is drawn conditioned on every
            |z_i| <= truncation (None: off).
        grad_clip, g_optimizer, d_optimizer: unused; accepted so that checkpoints written
            before the training recipe moved to the config's ``module:`` node
            (``module.clip_grad_norm``, ``module.optimizers``) rebuild.
    """

    # validation logs computed over pairs of images within one batch (they need data.batch_size >= 2)
    pairwise_logs: ClassVar[tuple[str, ...]] = ("diversity", "energy")

    def __init__(
        self,
        image_size: int,
        channels: int,
        z_dim: int = 100,
        g_base_channels: int = 64,
        d_base_channels: int = 64,
        loss: str = "ns",
        d_norm: str = "layer",
        spectral_norm: bool = False,
        gp_weight: float = 10.0,
        r1_gamma: float = 0.0,
        d_steps_per_g_step: int = 1,
        ema_decay: float = 0.0,
        truncation: float | None = None,
        grad_clip: float | None = None,
        g_optimizer: dict | None = None,
        d_optimizer: dict | None = None,
    ):
        super().__init__()
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.channels = check_int("channels", channels, minimum=1)
        self.z_dim = check_int("z_dim", z_dim, minimum=1)
        check_int("g_base_channels", g_base_channels, minimum=1)
        check_int("d_base_channels", d_base_channels, minimum=1)
        self.loss_name = check_choice("loss", loss, list(LOSSES))
        self.objective = LOSSES[loss]
        check_choice("d_norm", d_norm, D_NORMS)
        self.gp_weight = check_float("gp_weight", gp_weight, minimum=0.0)
        self.r1_gamma = check_float("r1_gamma", r1_gamma, minimum=0.0)
        if d_norm == "batch" and (self.objective.gradient_penalty or self.r1_gamma > 0):
            raise ConfigError(
                "d_norm",
                d_norm,
                "batch norm couples the images of a batch, so the per-image gradient penalty "
                f"(loss={loss}, r1_gamma={r1_gamma}) is ill-defined; use d_norm=layer or none",
            )
        self.d_steps_per_g_step = check_int("d_steps_per_g_step", d_steps_per_g_step, minimum=1)
        self.ema_decay = check_float("ema_decay", ema_decay, minimum=0.0, maximum=1.0)
        if self.ema_decay >= 1.0:
            raise ConfigError("ema_decay", ema_decay, "must be < 1 (0 turns the average off)")
        self.truncation = None if truncation is None else check_truncation(truncation)

        self.generator = DCGANGenerator(z_dim, image_size, channels, g_base_channels)
        self.discriminator = DCGANDiscriminator(
            image_size, channels, d_base_channels, norm=d_norm, spectral_norm=bool(spectral_norm)
        )
        self.generator_ema: AveragedModel | None = None
        if self.ema_decay > 0:
            # buffers too: the average's BatchNorm statistics must match its weights
            self.generator_ema = AveragedModel(
                self.generator, multi_avg_fn=ema_update(self.ema_decay), use_buffers=True
            )
            self.generator_ema.requires_grad_(False)  # not trained; also keeps DDP from waiting on it

    # ---------------------------------------------------------------- noise, G and D on [0, 1] data
    def noise(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
        truncation: float | None = None,
    ) -> torch.Tensor:
        """z ~ N(0, I), (n, z_dim); with ``truncation`` t, z ~ N(0, I) conditioned on |z_i| <= t
        (BigGAN's trick, Brock et al. 2019), drawn by :func:`truncated_normal`."""
        device = device if device is not None else next(self.generator.parameters()).device
        if truncation is not None:
            return truncated_normal((n, self.z_dim), truncation, generator, device)
        return torch.randn(n, self.z_dim, generator=generator, device=device)

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """D's logits (critic values) for images x in [0, 1]: (B, C, H, W) -> (B,)."""
        return upcast(self.discriminator(x * 2 - 1))

    # ---------------------------------------------------------------- the family contract
    def d_loss(
        self, x: torch.Tensor, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> LossOutput:
        """D's loss on a real batch (B, C, H, W) in [0, 1] and as many fresh samples; G is fixed."""
        x = x * 2 - 1  # (B, C, H, W) in [-1, 1]
        with torch.no_grad():
            fake = self.generator(self.noise(x.shape[0], generator, x.device))
        real_logits = upcast(self.discriminator(x))  # (B,)
        fake_logits = upcast(self.discriminator(fake))
        loss = self.objective.d(real_logits, fake_logits)
        logs = {}
        if self.objective.gradient_penalty:
            gp = gradient_penalty(self.discriminator, x, fake, generator)
            loss = loss + self.gp_weight * gp
            logs["gp"] = gp.detach()
        if self.r1_gamma > 0:
            r1 = r1_penalty(self.discriminator, x)
            loss = loss + 0.5 * self.r1_gamma * r1
            logs["r1"] = r1.detach()
        with torch.no_grad():
            logs["d_real"] = self.objective.score(real_logits).mean()
            logs["d_fake"] = self.objective.score(fake_logits).mean()
        return LossOutput(loss, logs)

    def g_loss(
        self, x: torch.Tensor, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> LossOutput:
        """G's loss on fresh samples, as many as the real batch x; D's gradients flow but are unused."""
        fake = self.generator(self.noise(x.shape[0], generator, x.device))  # (B, C, H, W) in [-1, 1]
        loss = self.objective.g(upcast(self.discriminator(fake)))
        logs = {}
        if x.shape[0] > 1:
            with torch.no_grad():  # the mode-collapse signal: samples' spread relative to the data's
                logs["diversity"] = diversity_ratio(fake.float(), x * 2 - 1)
        return LossOutput(loss, logs)

    @torch.no_grad()
    def update_ema(self) -> None:
        """Fold G's current weights into the moving average (after each G step)."""
        if self.generator_ema is not None:
            self.generator_ema.update_parameters(self.generator)

    @property
    def sampler(self) -> nn.Module:
        """The generator that samples: the moving average of G's weights when there is one."""
        return self.generator_ema.module if self.generator_ema is not None else self.generator

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, truncation: float | None = None
    ) -> torch.Tensor:
        """(n, C, H, W) images in [0, 1] from z ~ N(0, I) (truncated at ``truncation`` or the
        model's default)."""
        truncation = self.truncation if truncation is None else truncation
        z = self.noise(n, generator, truncation=truncation)
        return ((upcast(self.sampler(z)) + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Held-out signals for a real batch x in [0, 1]: D's mean output on x and on as many
        samples, and the samples' diversity and energy distance to x (``genexp.metrics.diversity``)."""
        samples = self.sample(x.shape[0], generator)
        logs = {
            "d_real": self.objective.score(self.discriminate(x)).mean(),
            "d_fake": self.objective.score(self.discriminate(samples)).mean(),
        }
        if x.shape[0] > 1:
            logs["diversity"] = diversity_ratio(samples, x)
            logs["energy"] = energy_distance(samples, x)
        return logs
