"""Probability paths of flow matching: x_t = α_t x1 + σ_t x0 from noise x0 (t = 0) to data x1 (t = 1).

A path is the conditional interpolant of Lipman et al. 2023 (section 4): given a pair (x0, x1),
x_t = α_t x1 + σ_t x0 and its conditional velocity u_t = α'_t x1 + σ'_t x0 (the regression target
of the conditional flow matching loss, their eq. 9 and 14). Time runs from noise to data.

- :class:`LinearPath`: rectified flow's straight line (Liu et al. 2022), and Lipman et al.'s
  optimal-transport conditional path with σ_min (eq. 20-23): α_t = t, σ_t = 1 − (1 − σ_min) t.
- :class:`CosinePath`: α_t = sin(πt/2), σ_t = cos(πt/2): α² + σ² = 1, a variance-preserving path
  like the cosine diffusion schedule.

Also the distribution of the training times (:data:`TIME_SAMPLERS`): uniform, or logit-normal as in
Stable Diffusion 3 (Esser et al. 2024, section 3.1: t = sigmoid(n), n ~ N(0, 1)), which spends the
steps in the middle of the path where the velocity is hardest to predict.
"""

from __future__ import annotations

import math

import torch

from genexp.errors import ConfigError, check_float


def _view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) times -> (B, 1, ..., 1) to broadcast over x's (B, ...) in x's dtype."""
    return t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class ProbabilityPath:
    """x_t = α_t x1 + σ_t x0; subclasses give α, σ and their time derivatives for (B,) times."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t of the pair (x0, x1) at (B,) times t: (B, ...)."""
        return _view(self.alpha(t), x1) * x1 + _view(self.sigma(t), x0) * x0

    def target_velocity(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """u_t(x_t | x0, x1) = d x_t / dt = α'_t x1 + σ'_t x0 (Lipman et al. 2023, eq. 14)."""
        return _view(self.d_alpha(t), x1) * x1 + _view(self.d_sigma(t), x0) * x0


class LinearPath(ProbabilityPath):
    """α_t = t, σ_t = 1 − (1 − σ_min) t: a straight line from x0 to x1 (σ_min = 0: rectified
    flow, Liu et al. 2022) ending in N(x1, σ_min² I) (Lipman et al. 2023, eq. 20-23)."""

    def __init__(self, sigma_min: float = 0.0):
        self.sigma_min = check_float("sigma_min", sigma_min, minimum=0.0, maximum=1.0)
        if self.sigma_min == 1.0:
            raise ConfigError(
                "sigma_min", sigma_min, "must be < 1 (1 leaves x_t = t x1 + x0 never reaching the data)"
            )

    def alpha(self, t):
        return t

    def sigma(self, t):
        return 1 - (1 - self.sigma_min) * t

    def d_alpha(self, t):
        return torch.ones_like(t)

    def d_sigma(self, t):
        return torch.full_like(t, -(1 - self.sigma_min))


class CosinePath(ProbabilityPath):
    """α_t = sin(πt/2), σ_t = cos(πt/2): variance preserving (α² + σ² = 1), like a cosine
    diffusion schedule run as an ODE from noise to data."""

    def alpha(self, t):
        return torch.sin(t * (math.pi / 2))

    def sigma(self, t):
        return torch.cos(t * (math.pi / 2))

    def d_alpha(self, t):
        return (math.pi / 2) * torch.cos(t * (math.pi / 2))

    def d_sigma(self, t):
        return -(math.pi / 2) * torch.sin(t * (math.pi / 2))


PATHS = {"linear": LinearPath, "cosine": CosinePath}  # model.path


def uniform_time(n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) times t ~ U(0, 1) in ``like``'s dtype and on its device."""
    device = generator.device if generator is not None else like.device
    return torch.rand(n, generator=generator, device=device, dtype=like.dtype).to(like.device)


def logit_normal_time(n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) times t = sigmoid(u), u ~ N(0, 1): SD3's logit-normal sampling (Esser et al. 2024, eq. 19
    with m = 0, s = 1), median 1/2, density zero at both ends."""
    device = generator.device if generator is not None else like.device
    u = torch.randn(n, generator=generator, device=device, dtype=like.dtype).to(like.device)
    return torch.sigmoid(u)


TIME_SAMPLERS = {"uniform": uniform_time, "logit_normal": logit_normal_time}
