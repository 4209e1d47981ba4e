"""The family contract shared by every generative model (see DESIGN.md), as ``typing.Protocol``s.

A family is a pure-torch ``nn.Module``; the Lightning glue, the commands and the callbacks ask
what it can do with ``isinstance(model, Likelihood)`` and friends (the protocols are
``runtime_checkable``: an ``isinstance`` check looks for the methods' names, not their
signatures), so adding a family means writing its model file and YAML, never a branch on its name.

- every family: :class:`Generative` (``loss`` and ``sample``; adversarial families train by
  :class:`Adversarial`'s ``d_loss``/``g_loss`` instead of ``loss``);
- optional: :class:`Likelihood` (``nll_bpd``), :class:`Reconstructing` (``reconstruct``),
  :class:`Autoencoding` (``encode`` to a Tensor, ``decode``: what latent diffusion builds on),
  :class:`Preparable` (``prepare(datamodule)``, fit-time set-up such as latent statistics).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from genexp.errors import ConfigError


class LossOutput(NamedTuple):
    """What ``loss(x, y)`` returns: the scalar to minimise and detached scalars to log.

    ``logs`` keys are plain names (``recon``, ``kl``); the Lightning glue prefixes the stage
    (``train/recon``) so every family shares one dashboard layout.
    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor]


@runtime_checkable
class Generative(Protocol):
    """Every family: a training loss on a batch of images in [0, 1], and samples in [0, 1]."""

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> LossOutput: ...

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, C, H, W) images in [0, 1]; a family may take more keywords (``temperature``, ``y``)."""
        ...


@runtime_checkable
class Conditional(Protocol):
    """Families that take class labels (:mod:`genexp.models.conditioning`): ``num_classes`` N (0:
    trained unconditionally), ``loss(x, y)`` uses ``y``, ``sample(n, generator, y=...)`` draws the
    classes asked for (uniform when ``y`` is None). ``cond_drop_prob`` > 0 (label dropout) means the
    model learned the null class and ``sample`` takes ``guidance=w``."""

    num_classes: int
    cond_drop_prob: float


@runtime_checkable
class Likelihood(Protocol):
    """Families with a bits/dim number on 8-bit data: exact (flows, autoregressive), a bound
    (VAE, diffusion) or an ODE estimate. Optional attributes the glue reads: ``bpd_images``
    (at most this many images per epoch) and ``bpd_stages`` (``("val", "test")`` by default)."""

    def nll_bpd(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [0, 1] -> (B,) bits/dim."""
        ...


@runtime_checkable
class EstimatedLikelihood(Likelihood, Protocol):
    """Families whose bits/dim may be a Monte-Carlo estimate (the ODE likelihood's Hutchinson
    trace): ``nll_bpd_with_error`` gives the per-image standard error beside the value, so the
    glue and ``genexp evaluate`` report the estimator's uncertainty (None: exact or a bound)."""

    def nll_bpd_with_error(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, H, W) images in [0, 1] -> ((B,) bits/dim, (B,) standard errors or None)."""
        ...


@runtime_checkable
class Reconstructing(Protocol):
    """Families that map an image back to itself (through a code or a first stage)."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W), both in [0, 1]."""
        ...


@runtime_checkable
class Autoencoding(Reconstructing, Protocol):
    """Families with a vector code: what a latent diffusion model trains on, and what the latent
    scatter plot shows. ``encode`` returns one Tensor (a VAE's posterior mean)."""

    latent_dim: int

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, latent_dim)."""
        ...

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> (B, C, H, W) in [0, 1]."""
        ...


@runtime_checkable
class Adversarial(Protocol):
    """Two networks trained alternately (the GAN): each loss is a :class:`LossOutput` on the real
    batch. The glue also reads ``generator``/``discriminator`` (the two ``nn.Module``s),
    ``d_steps_per_g_step``, ``update_ema()`` and ``evaluate(x, generator)``."""

    def d_loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> LossOutput: ...

    def g_loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> LossOutput: ...

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor: ...


@runtime_checkable
class Preparable(Protocol):
    """Families with fit-time set-up from the training data (latent diffusion measures its
    latents' statistics). Called once before training, on every rank; ``datamodule`` is the
    run's :class:`genexp.lit.datamodule.DataModule` (``fixed_batch(split, n)`` gives the same
    images on every rank)."""

    def prepare(self, datamodule: Any) -> None: ...


def check_net_fits(net: torch.nn.Module, channels: int, image_size: int) -> None:
    """Fail at build time, naming the keys, when a denoiser or velocity net cannot take this data."""
    net_channels = getattr(net, "in_channels", channels)
    net_size = getattr(net, "image_size", image_size)
    if net_channels != channels or net_size != image_size:
        raise ConfigError(
            "net",
            f"{net_channels}x{net_size}x{net_size}",
            f"the net is built for {net_channels}-channel {net_size}px images but the data is "
            f"{channels}x{image_size}x{image_size}; set model.net.in_channels and "
            "model.net.image_size to the dataset's",
        )


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision activations (under bf16/fp16 autocast) -> float32 for losses; others unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def ema_update(decay: float):
    """``multi_avg_fn`` for ``AveragedModel``: EMA with a warm-up, beta_t = min(decay, (1+t)/(10+t)).

    The warm-up keeps the average from dragging the random initial weights along for ~1/(1-decay)
    steps; integer buffers (BatchNorm's batch counter) are copied.
    """

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        t = int(num_averaged)
        beta = min(decay, (1 + t) / (10 + t))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c.to(a.dtype), 1.0 - beta)
            else:
                a.copy_(c)

    return update
