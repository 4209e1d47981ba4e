"""The forward SDEs of score-based generative modelling (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations"): dx = f(x, t) dt + g(t) dw on t in [0, 1].

- :class:`VESDE` (their eq. 9 in the limit, eq. 30): f = 0, g(t) = sqrt(d sigma^2(t) / dt) with the
  geometric sigma(t) = sigma_min (sigma_max / sigma_min)^t (NCSN's ladder made continuous).
- :class:`VPSDE` (eq. 11, 32): f = -beta(t) x / 2, g = sqrt(beta(t)), beta(t) = beta_min + t (beta_max -
  beta_min) (DDPM's chain made continuous: beta_i = beta(i / N) / N).
- :class:`SubVPSDE` (eq. 17): VP's drift, g = sqrt(beta(t) (1 - exp(-2 int_0^t beta))).

Their marginals given x(0) are Gaussian (appendix B, eq. 29 and 33; sub-VP after eq. 17), written
with m(t) the mean coefficient and v(t) the variance, B(t) = int_0^t beta(s) ds =
beta_min t + (beta_max - beta_min) t^2 / 2:

    VE:      m = 1,               v = sigma(t)^2 - sigma_min^2    (dv/dt = g^2, v(0) = 0)
    VP:      m = exp(-B / 2),     v = 1 - exp(-B)                 (dv/dt = -beta v + beta)
    sub-VP:  m = exp(-B / 2),     v = (1 - exp(-B))^2             (dv/dt = -beta v + g^2)

so sub-VP's variance is VP's squared: never above it. Song et al.'s code rounds VE's std to
sigma(t); here it is the exact sqrt(sigma(t)^2 - sigma_min^2) of eq. 29 (the two differ by
sigma_min^2 / 2 sigma(t) ~ 5e-5 at t = 1e-5 and 0 at t = 1).

The reverse-time SDE (eq. 6) is dx = [f - g^2 grad log p_t(x)] dt + g dw-bar, and the probability
flow ODE with the same marginals (eq. 13) dx/dt = f - g^2 grad log p_t(x) / 2. ``t`` is always a
(B,) tensor; coefficients come back in its dtype and on its device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from genexp.errors import ConfigError, check_float

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, ...), t (B,)) -> score


def per_row(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) coefficient as (B, 1, ..., 1) in x's dtype, to scale x's rows."""
    return c.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class Drift(NamedTuple):
    drift: torch.Tensor  # f(x, t), (B, ...)
    diffusion: torch.Tensor  # g(t), (B,)


class SDE:
    """A forward SDE with Gaussian marginals; subclasses give m(t), v(t), f and g.

    ``default_eps``: the smallest time a model trains and samples at (Song et al. 2021's 1e-5 for VE,
    1e-3 for VP and sub-VP: their score diverges as v(t) -> 0).
    """

    default_eps = 1e-3

    def mean_coef(self, t: torch.Tensor) -> torch.Tensor:
        """m(t), (B,): E[x(t) | x(0)] = m(t) x(0)."""
        raise NotImplementedError

    def variance(self, t: torch.Tensor) -> torch.Tensor:
        """v(t), (B,): Cov[x(t) | x(0)] = v(t) I."""
        raise NotImplementedError

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return self.variance(t).sqrt()

    def ode_time(self, u: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(t(u), dt/du) of a fixed-step ODE's time u in [0, 1], from t = 1 (u = 0) to t = eps: steps
        about uniform in log sigma_t, where the probability flow bends (near the data). Uniform in t
        here: the VE sigma(t) is geometric in t already."""
        return 1 - u * (1 - eps), torch.full_like(u, -(1 - eps))

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> Drift:
        """(f(x, t) (B, ...), g(t) (B,))."""
        raise NotImplementedError

    def marginal_prob(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (B, ...), std (B,)) of p_0t(x(t) | x(0) = x0)."""
        return per_row(self.mean_coef(t), x0) * x0, self.std(t)

    def prior_std(self, like: torch.Tensor) -> float:
        """The std of the prior p_T = N(0, prior_std^2 I) that sampling starts from."""
        return 1.0

    def prior_sample(
        self, shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x(1) ~ N(0, prior_std^2 I) of ``shape``, in like's dtype, on its device (drawn on the
        generator's device, as :func:`genexp.diffusion.samplers.noise_like`)."""
        device = generator.device if generator is not None else like.device
        z = torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)
        return self.prior_std(like) * z

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_std^2 I) in nats per item, (B, ...) -> (B,)."""
        s = self.prior_std(z)
        d = z[0].numel()
        return -0.5 * (z / s).pow(2).flatten(1).sum(1) - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def discretize(
        self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_i, G_i) of the forward step from t_next < t to t, x(t) = x(t_next) + f_i + G_i z
        (Song et al. 2021, appendix E, eq. 45): Euler-Maruyama's f dt and g sqrt(dt) by default;
        VE and VP override it with their exact steps (SMLD's and DDPM's chains). G_i is (B,)."""
        dt = t - t_next
        f, g = self.sde(x, t)
        return f * per_row(dt, x), g * dt.sqrt()

    def langevin_alpha(self, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """alpha_i of the corrector's step size (Song et al. 2021, Algorithm 5): 1 - beta_i of the
        step, m(t)^2 / m(t_next)^2 (VP, sub-VP); 1 for VE (Algorithm 4), where m = 1. (B,)."""
        return (self.mean_coef(t) / self.mean_coef(t_next)).pow(2)

    def ode_drift(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The probability-flow ODE's dx/dt = f - g^2 s / 2 (Song et al. 2021, eq. 13), (B, ...)."""
        f, g = self.sde(x, t)
        return f - 0.5 * per_row(g.pow(2), x) * score

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (eq. 6) or, with ``probability_flow``, the ODE (eq. 13) of score_fn."""
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """dx = [f - g^2 s] dt + g dw-bar backwards in time (Song et al. 2021, eq. 6; Anderson 1982), or
    the probability flow dx = [f - g^2 s / 2] dt (eq. 13, diffusion 0)."""

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.forward, self.score_fn, self.probability_flow = forward, score_fn, probability_flow

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> Drift:
        """(drift (B, ...), diffusion (B,)) of the reverse-time process at t."""
        f, g = self.forward.sde(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        drift = f - weight * per_row(g.pow(2), x) * self.score_fn(x, t)
        return Drift(drift, torch.zeros_like(g) if self.probability_flow else g)


class VESDE(SDE):
    """Variance exploding: sigma(t) = sigma_min (sigma_max / sigma_min)^t, f = 0,
    g = sigma(t) sqrt(2 log(sigma_max / sigma_min)) (Song et al. 2021, eq. 9 and 30).

    Args:
        sigma_min: sigma(0), the smallest noise (Song et al.'s 0.01).
        sigma_max: sigma(1), about the largest distance between two data points (50 for 32 px
            images in [-1, 1], their technique 1; the prior is N(0, sigma_max^2 - sigma_min^2)).
    """

    default_eps = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min = check_float("sigma_min", sigma_min, positive=True)
        self.sigma_max = check_float("sigma_max", sigma_max, positive=True)
        if not self.sigma_min < self.sigma_max:
            raise ConfigError(
                "sigma_max", sigma_max, f"must be > sigma_min ({sigma_min}): the noise grows with t"
            )
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def mean_coef(self, t):
        return torch.ones_like(t)

    def variance(self, t):
        # sigma_min^2 (exp(2 t log r) - 1), with expm1 for accuracy near t = 0
        return self.sigma_min**2 * torch.expm1(2 * t * self.log_ratio)

    def sde(self, x, t):
        return Drift(torch.zeros_like(x), self.sigma(t) * math.sqrt(2 * self.log_ratio))

    def prior_std(self, like):
        return math.sqrt(self.sigma_max**2 - self.sigma_min**2)

    def discretize(self, x, t, t_next):
        """SMLD's chain: x(t) = x(t_next) + sqrt(sigma(t)^2 - sigma(t_next)^2) z (eq. 45's VE case)."""
        return torch.zeros_like(x), (self.variance(t) - self.variance(t_next)).clamp(min=0).sqrt()

    def langevin_alpha(self, t, t_next):
        return torch.ones_like(t)

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g})"


class VPSDE(SDE):
    """Variance preserving: beta(t) = beta_min + t (beta_max - beta_min), f = -beta x / 2,
    g = sqrt(beta) (Song et al. 2021, eq. 11 and 32). beta_min = 0.1, beta_max = 20 is DDPM's linear
    schedule (beta_1 = 1e-4, beta_N = 0.02 at N = 1000) in continuous time.

    Args:
        beta_min: beta(0).
        beta_max: beta(1); exp(-B(1)) = exp(-(beta_min + beta_max) / 2) is what is left of the data
            at t = 1, so the prior N(0, I) fits.
    """

    default_eps = 1e-3

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = check_float("beta_min", beta_min, minimum=0.0)
        self.beta_max = check_float("beta_max", beta_max, positive=True)
        if not self.beta_min < self.beta_max:
            raise ConfigError("beta_max", beta_max, f"must be > beta_min ({beta_min}): beta(t) grows with t")

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral(self, t: torch.Tensor) -> torch.Tensor:
        """B(t) = int_0^t beta(s) ds, (B,)."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def mean_coef(self, t):
        return torch.exp(-0.5 * self.integral(t))

    def ode_time(self, u, eps):
        """Geometric in t, t = eps^u: sigma_t^2 ~ beta_min t near 0 (VP and sub-VP), so uniform in log
        sigma_t where the flow bends. A 32-step RK4 likelihood of a trained mnist5k VP run: 1.95
        bits/dim this way, 0.33 uniform in t (1.81 at 128 uniform steps): too few steps near the data."""
        t = eps**u
        return t, math.log(eps) * t

    def variance(self, t):
        return -torch.expm1(-self.integral(t))

    def sde(self, x, t):
        beta = self.beta(t)
        return Drift(-0.5 * per_row(beta, x) * x, beta.sqrt())

    def discretize(self, x, t, t_next):
        """DDPM's chain: x(t) = sqrt(1 - beta_i) x(t_next) + sqrt(beta_i) z with 1 - beta_i =
        m(t)^2 / m(t_next)^2, the exact VP transition (eq. 45's VP case, eq. 46 when reversed)."""
        beta_i = -torch.expm1(-(self.integral(t) - self.integral(t_next)))
        return per_row((1 - beta_i).sqrt() - 1, x) * x, beta_i.sqrt()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta_min={self.beta_min:g}, beta_max={self.beta_max:g})"


class SubVPSDE(VPSDE):
    """Sub-variance preserving: VP's drift, g = sqrt(beta(t) (1 - exp(-2 B(t)))) (Song et al. 2021,
    eq. 17): the variance (1 - exp(-B))^2 is VP's squared, below it at every t (their better
    likelihoods). Its reverse-diffusion step is Euler's (:meth:`SDE.discretize`), as in their code."""

    def variance(self, t):
        return torch.expm1(-self.integral(t)).pow(2)

    def sde(self, x, t):
        beta = self.beta(t)
        g = (beta * -torch.expm1(-2 * self.integral(t))).sqrt()
        return Drift(-0.5 * per_row(beta, x) * x, g)

    discretize = SDE.discretize
