"""GAN objectives as pure functions of the discriminator's outputs, and the gradient penalties.

Notation: r = D(x) on real images, f = D(G(z)) on generated ones, both logits (critic values for
WGAN); sigma is the sigmoid, D's probability that an image is real, and log sigma(a) = -softplus(-a).

- ``minimax`` (Goodfellow et al. 2014; the talk's L(G, D), section 3.2): D maximises
  E log sigma(r) + E log(1 - sigma(f)), i.e. minimises E softplus(-r) + E softplus(f); G minimises
  E log(1 - sigma(f)) = -E softplus(f). Saturates: when D rejects the samples early on, G's gradient
  vanishes.
- ``ns``, non-saturating (the talk's L_gen): D as in minimax; G minimises -E log sigma(f) =
  E softplus(-f), the same fixed point with strong gradients early. The default.
- ``hinge`` (Lim & Ye 2017; Miyato et al. 2018): D minimises E relu(1 - r) + E relu(1 + f); G
  minimises -E f.
- ``wgan_gp`` (Gulrajani et al. 2017): a critic estimating the Wasserstein-1 distance, D minimises
  E f - E r plus lambda times the gradient penalty below; G minimises -E f.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


def bce_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """-E log sigma(r) - E log(1 - sigma(f)): D as a binary classifier (minimax and ns)."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def minimax_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """E log(1 - sigma(f)): G minimises D's log-probability of calling the samples fake."""
    return -F.softplus(fake).mean()


def ns_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """-E log sigma(f): the non-saturating generator loss."""
    return F.softplus(-fake).mean()


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E relu(1 - r) + E relu(1 + f)."""
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def wasserstein_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E f - E r: minus the critic's estimate of the Wasserstein-1 distance."""
    return fake.mean() - real.mean()


def critic_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """-E f (hinge and WGAN generators)."""
    return -fake.mean()


class GANLoss(NamedTuple):
    """One objective: D's and G's losses of the logits, how to read D's output, whether it adds
    the WGAN-GP penalty."""

    d: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    g: Callable[[torch.Tensor], torch.Tensor]
    score: Callable[[torch.Tensor], torch.Tensor]  # the logged D(x): a probability or a critic value
    gradient_penalty: bool = False


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


LOSSES: dict[str, GANLoss] = {
    "minimax": GANLoss(bce_d_loss, minimax_g_loss, torch.sigmoid),
    "ns": GANLoss(bce_d_loss, ns_g_loss, torch.sigmoid),
    "hinge": GANLoss(hinge_d_loss, critic_g_loss, _identity),
    "wgan_gp": GANLoss(wasserstein_d_loss, critic_g_loss, _identity, gradient_penalty=True),
}


def _input_grad(critic: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """d critic(x)_i / d x_i per sample, (B, ...) -> (B, D), differentiable (for the penalty's backward)."""
    x = x.detach().requires_grad_(True)
    out = critic(x).float()
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return grad.flatten(1).float()


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WGAN-GP: E (||grad D(x_hat)||_2 - 1)^2 at x_hat = eps x + (1 - eps) x_fake, eps ~ U[0, 1]
    per sample (Gulrajani et al. 2017, eq. 3; multiply by lambda = 10)."""
    shape = (real.shape[0],) + (1,) * (real.ndim - 1)
    eps = torch.rand(shape, generator=generator, device=real.device, dtype=real.dtype)
    x_hat = eps * real.detach() + (1 - eps) * fake.detach()
    return (_input_grad(critic, x_hat).norm(dim=1) - 1.0).pow(2).mean()


def r1_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor) -> torch.Tensor:
    """R1: E ||grad D(x)||_2^2 on real images (Mescheder et al. 2018; multiply by gamma / 2)."""
    return _input_grad(critic, real).pow(2).sum(dim=1).mean()
