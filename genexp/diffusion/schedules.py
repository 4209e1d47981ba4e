"""Noise schedules: functions ``timesteps -> betas``, float64 tensors of shape (T,).

Each is used as a Hydra partial (``_partial_: true``) and called by
:class:`~genexp.diffusion.noise_schedule.NoiseSchedule` with its ``timesteps``. Index ``i`` of the
result is the paper's step ``t = i + 1``.
"""

from __future__ import annotations

import math

import torch

from genexp.errors import ConfigError, check_float, check_int

# A beta of 1 makes alphas_cumprod exactly 0 and 1 / sqrt(alphas_cumprod) infinite; the schedules
# that reach it clip there, as improved DDPM does (Nichol & Dhariwal 2021, section 3.2).
MAX_BETA = 0.999


def _check_range(beta_start: float, beta_end: float) -> tuple[float, float]:
    beta_start = check_float("beta_start", beta_start, positive=True, maximum=MAX_BETA)
    beta_end = check_float("beta_end", beta_end, positive=True, maximum=MAX_BETA)
    if beta_end < beta_start:
        raise ConfigError("beta_end", beta_end, f"must be >= beta_start ({beta_start})")
    return beta_start, beta_end


def _scale(timesteps: int) -> float:
    """1000 / T: DDPM's betas were tuned for T = 1000; scaling keeps sum(beta), the total noise
    added, about the same for other T (improved DDPM's ``get_named_beta_schedule``)."""
    return 1000.0 / timesteps


def linear(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Betas linear from beta_start to beta_end, both scaled by 1000 / T (Ho et al. 2020, section 4).

    At T = 1000 this is exactly DDPM's schedule. For T <= 20 the scaled beta_end reaches MAX_BETA
    and the last betas are clipped there.
    """
    timesteps = check_int("timesteps", timesteps, minimum=1)
    beta_start, beta_end = _check_range(beta_start, beta_end)
    scale = _scale(timesteps)
    betas = torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64)
    return betas.clamp(max=MAX_BETA)


def quadratic(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Betas whose square roots are linear ("sqrt-linear squared"), ends scaled by 1000 / T.

    The schedule of the original DDPM code's ``quad`` option (Ho et al. 2020): it adds noise more
    slowly than ``linear`` early on.
    """
    timesteps = check_int("timesteps", timesteps, minimum=1)
    beta_start, beta_end = _check_range(beta_start, beta_end)
    scale = _scale(timesteps)
    roots = torch.linspace(
        math.sqrt(scale * beta_start), math.sqrt(scale * beta_end), timesteps, dtype=torch.float64
    )
    return (roots**2).clamp(max=MAX_BETA)


def _betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor, max_beta: float) -> torch.Tensor:
    """alphas_cumprod at t = 0..T, shape (T + 1,) -> beta_t = 1 - abar_t / abar_{t-1}, clipped."""
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(min=0.0, max=max_beta)


def cosine(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """abar_t = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) * pi / 2) (Nichol & Dhariwal 2021, eq. 17).

    The offset ``s`` keeps beta_1 from being vanishingly small; the betas are clipped at
    ``max_beta`` because abar_T = 0 would make beta_T = 1 (their section 3.2).
    """
    timesteps = check_int("timesteps", timesteps, minimum=1)
    s = check_float("s", s, minimum=0.0)
    max_beta = check_float("max_beta", max_beta, positive=True, maximum=MAX_BETA)
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps  # (T + 1,) in [0, 1]
    f = torch.cos((t + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return _betas_from_alphas_cumprod(f / f[0], max_beta)


def sigmoid(
    timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> torch.Tensor:
    """abar_t from a sigmoid, rescaled to run from 1 to 0 (Chen 2023, "On the importance of noise
    scheduling for diffusion models", Algorithm 1).

    abar(t) = (v_end - sigmoid((t (end - start) + start) / tau)) / (v_end - v_start), with
    v = sigmoid(. / tau) of the two ends; a larger ``tau`` flattens the curve towards linear.
    """
    timesteps = check_int("timesteps", timesteps, minimum=1)
    start = check_float("start", start)
    end = check_float("end", end)
    if end <= start:
        raise ConfigError("end", end, f"must be > start ({start})")
    tau = check_float("tau", tau, positive=True)
    max_beta = check_float("max_beta", max_beta, positive=True, maximum=MAX_BETA)
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps  # (T + 1,) in [0, 1]
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    alphas_cumprod = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    return _betas_from_alphas_cumprod(alphas_cumprod / alphas_cumprod[0], max_beta)
