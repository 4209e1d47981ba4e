"""The probability-flow ODE of a DDPM's discrete schedule, for the ODE likelihood (Song et al. 2021).

The time variable is the log signal-to-noise ratio lambda = log(abar / (1 - abar)) (Kingma et al.
2021; DPM-Solver, Lu et al. 2022, integrates in it too). Under q(x_lambda | x_0) =
N(sqrt(abar) x_0, sigma^2 I) with abar = sigmoid(lambda), sigma^2 = sigmoid(-lambda), the VP SDE's
probability-flow ODE (Song et al. 2021, eq. 13: dx/ds = -beta(s)/2 (x + grad log p), with
grad log p = -eps / sigma and beta(s) = -d log abar / ds) reads, since d log abar / d lambda = sigma^2,

    dx/dlambda = (sigma^2 x - sigma eps(x, lambda)) / 2.

Written in lambda the field holds no beta(s): it depends on the schedule only through the DDPM's
knots lambda_0 > ... > lambda_{T-1} (0-based steps, as :class:`NoiseSchedule`), which say at
which real step the network is asked: s(lambda) interpolates the step index linearly between the
knots, so at a knot the net answers as it was trained and in between at a real-valued t (the
UNet's sinusoidal embedding takes real steps). (An interpolation of abar over the steps instead
puts the schedule's knots into beta(s) and the field: a fixed-step solver then loses its order.)

In the convention of :mod:`genexp.diffusion.ode_likelihood` (noise at u = 0, data at u = 1),
lambda(u) = lambda_{T-1} + u (lambda_0 - lambda_{T-1}): uniform steps in log-SNR, and
dx/du = (lambda_0 - lambda_{T-1}) dx/dlambda. The noisy end (step T - 1) gets the prior N(0, I);
the data end is step 0, the smallest noise the net was trained at.

Endpoint error: the ODE gives the density of x at step 0, i.e. the data shrunk by sqrt(abar_0) and
convolved with N(0, 1 - abar_0) (1 - abar_0 = beta_0 = 1e-4 for DDPM's linear schedule at
T = 1000), and it scores its image at step T - 1 under N(0, I) instead of q(x_{T-1}) (the bound's
L_T mismatch: abar_{T-1} = 4e-5 there). Both are O(beta_0) and O(abar_{T-1}) nats per dimension;
tests/test_ode_likelihood.py measures them on Gaussian data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from genexp.diffusion.noise_schedule import NoiseSchedule
from genexp.diffusion.objectives import OBJECTIVES, check_objective
from genexp.diffusion.ode_likelihood import (
    ODELogLikelihood,
    bits_per_dim,
    dequantize,
    ode_log_likelihood,
    standard_normal_log_prob,
)
from genexp.metrics.bpd import nats_to_bpd
from genexp.models.base import upcast


class ProbabilityFlow:
    """dx/du of the DDPM's probability-flow ODE for a network ``net(x_t, s)`` predicting ``objective``.

    ``predict_eps_from_x0`` and ``predict_eps_from_v`` are :class:`NoiseSchedule`'s identities at a
    log-SNR lambda, so the objectives' ``to_eps`` convert the net's output here too.
    """

    def __init__(self, net: nn.Module | Callable, schedule: NoiseSchedule, objective: str = "eps"):
        self.net = net
        self.schedule = schedule
        self.objective = check_objective(objective)

    @property
    def last_step(self) -> int:
        return self.schedule.timesteps - 1

    def knots(self) -> torch.Tensor:
        """lambda_i = log abar_i - log(1 - abar_i), (T,) float64, decreasing in i."""
        return torch.log(self.schedule.alphas_cumprod) - self.schedule.log_one_minus_alphas_cumprod

    def lambda_of(self, u: torch.Tensor) -> torch.Tensor:
        """u in [0, 1] (noise -> data) -> lambda, linear from lambda_{T-1} to lambda_0, float64."""
        lam = self.knots()
        u = u.to(device=lam.device, dtype=lam.dtype)
        return lam[-1] + u * (lam[0] - lam[-1])

    def step_of(self, lam: torch.Tensor) -> torch.Tensor:
        """The real step s at log-SNR lambda: linear in lambda between the knots, (N,) float64."""
        knots = self.knots().flip(0)  # increasing: lambda_{T-1} .. lambda_0
        lam = lam.to(knots).clamp(float(knots[0]), float(knots[-1]))
        j = torch.searchsorted(knots, lam).clamp(1, self.last_step)  # knots[j - 1] <= lam <= knots[j]
        w = (lam - knots[j - 1]) / (knots[j] - knots[j - 1])
        return self.last_step - (j - 1) - w  # flipped index j - 1 is step T - j

    def lambda_of_step(self, s: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`step_of`: lambda at a real step s in [0, T - 1], (N,) float64."""
        lam = self.knots()
        s = s.to(lam)
        i = torch.floor(s).long().clamp(0, max(self.last_step - 1, 0))
        return lam[i] + (s - i) * (lam[i + 1] - lam[i])

    @staticmethod
    def _coefficients(lam: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar) and sigma = sqrt(1 - abar) at lambda, as (N, 1, ..., 1) in x's dtype."""
        shape = (lam.shape[0], *([1] * (x.dim() - 1)))
        out = (torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt())
        return tuple(c.to(device=x.device, dtype=x.dtype).reshape(shape) for c in out)

    def predict_eps_from_x0(self, x_t: torch.Tensor, lam: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar) (Ho et al. 2020, eq. 4 solved for eps)."""
        a, sigma = self._coefficients(lam, x_t)
        return (x_t - a * x0) / sigma

    def predict_eps_from_v(self, x_t: torch.Tensor, lam: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - abar) x_t + sqrt(abar) v (Salimans & Ho 2022, appendix D)."""
        a, sigma = self._coefficients(lam, x_t)
        return sigma * x_t + a * v

    def eps(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """eps-hat(x) at log-SNR lambda (N,), the net asked at the real step s(lambda)."""
        s = self.step_of(lam).to(x.device)  # float64 steps: the time embedding casts them itself
        out = upcast(self.net(x, s))
        return OBJECTIVES[self.objective].to_eps(self, out, x.to(out.dtype), lam)

    def velocity(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """dx/du = (lambda_0 - lambda_{T-1}) (sigma^2 x - sigma eps) / 2 at lambda(u)."""
        lam = self.lambda_of(u)
        knots = self.knots()
        _, sigma = self._coefficients(lam, x)
        eps = self.eps(x, lam).to(x.dtype)
        return 0.5 * float(knots[0] - knots[-1]) * (sigma**2 * x - sigma * eps)


def ode_bpd(
    flow: ProbabilityFlow,
    x: torch.Tensor,
    steps: int = 32,
    probes: int = 2,
    divergence: str = "hutchinson",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, ODELogLikelihood]:
    """Bits/dim of 8-bit images x in [0, 1] through the probability-flow ODE: (bpd, its standard
    error, the raw result), bpd and standard error (B,). The images are dequantised onto [-1, 1)
    (:func:`dequantize`), the DDPM's data range, and the prior is N(0, I) at step T - 1."""
    y = dequantize(x, generator=generator)
    out = ode_log_likelihood(
        flow.velocity,
        y,
        standard_normal_log_prob,
        steps=steps,
        divergence=divergence,
        probes=probes,
        generator=generator,
    )
    num_dims = x[0].numel()
    # bpd is affine in log p: its standard error is log p's over D ln 2
    return bits_per_dim(out.log_prob, num_dims), nats_to_bpd(out.std_err, num_dims), out
