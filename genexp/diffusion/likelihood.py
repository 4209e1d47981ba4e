"""The reverse process p(x_{t-1} | x_t) from eps-hat, and the terms of its variational bound.

L = L_T + sum_{t>1} L_{t-1} + L_0 (Ho et al. 2020, eq. 5): L_T = KL(q(x_T | x_0) || N(0, I)),
L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), L_0 = -log p(x_0 | x_1) with a Gaussian
discretised to the 256 levels of 8-bit data on [-1, 1] (their section 3.3). The terms are reported
in bits per dimension, as Nichol & Dhariwal 2021 (section 2, their ``diffusion_utils``) do.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from genexp.diffusion.noise_schedule import NoiseSchedule
from genexp.errors import check_choice

# The fixed reverse variances sigma_t^2 of Ho et al. 2020 (section 3.2), as the schedule buffer that
# holds log sigma_t^2: beta_t ("beta", the upper bound on the reverse entropy) or beta_tilde_t
# ("beta_tilde", the lower bound). Both are clipped at t = 0 to beta_tilde_1 as in improved DDPM.
VARIANCES: dict[str, str] = {
    "beta": "fixed_large_log_variance",
    "beta_tilde": "posterior_log_variance_clipped",
}

LEVELS = 255  # 8-bit data on [-1, 1]: x = 2 k / 255 - 1, bins of half-width 1 / 255


class PMeanVariance(NamedTuple):
    """p(x_{t-1} | x_t) = N(mean, var) and the x_0 it was computed from; var/log_var (B, 1, ..., 1)."""

    mean: torch.Tensor
    var: torch.Tensor
    log_var: torch.Tensor
    x0_pred: torch.Tensor


def p_mean_variance(
    schedule: NoiseSchedule,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    variance: str = "beta_tilde",
    clip_denoised: bool = True,
) -> PMeanVariance:
    """p(x_{t-1} | x_t) = N(mu_tilde(x_t, x0_hat), sigma_t^2) with x0_hat from eps-hat (Ho et al. 2020, eq. 11).

    Args:
        eps: eps-hat, the network's noise prediction at (x_t, t), shaped like x_t.
        t: (B,) 0-based timesteps.
        variance: a key of :data:`VARIANCES`.
        clip_denoised: clamp x0_hat to the data range [-1, 1] before forming the mean.
    """
    check_choice("variance", variance, tuple(VARIANCES))
    x0_pred = schedule.predict_x0_from_eps(x_t, t, eps)
    if clip_denoised:
        x0_pred = x0_pred.clamp(-1.0, 1.0)
    mean = schedule.q_posterior(x0_pred, x_t, t).mean
    log_var = schedule.extract(getattr(schedule, VARIANCES[variance]), t, x_t)
    return PMeanVariance(mean, log_var.exp(), log_var, x0_pred)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (broadcasts its arguments)."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~ 0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), the approximation used by Ho et al.
    2020 and Nichol & Dhariwal 2021 (kept so our bits/dim compare with theirs)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log P(x) elementwise for x on the 256-level grid of [-1, 1] under a Gaussian integrated over
    each level's bin (Ho et al. 2020, eq. 13; Nichol & Dhariwal 2021's ``diffusion_utils``).

    Bins have half-width 1 / 255; the two end bins extend to -inf and +inf, so the probabilities of
    the 256 levels sum to one. ``log_scales`` is log sigma (half the log-variance).
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / LEVELS))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / LEVELS))
    # clamps keep log finite where a bin's mass underflows (far tails); 1e-12 is the reference's floor
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # the first and last levels (x = -1, x = 1) own the open-ended bins
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def prior_bpd(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, (B,) (Ho et al. 2020, eq. 5).

    No parameter controls it; it is small when the schedule ends near pure noise.
    """
    t = torch.full((x0.shape[0],), schedule.timesteps - 1, dtype=torch.long, device=x0.device)
    q = schedule.q_mean_variance(x0, t)
    kl = normal_kl(q.mean, q.log_var, torch.zeros_like(x0), torch.zeros_like(x0))
    return mean_flat(kl) / math.log(2.0)


def vb_term_bpd(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    model_mean: torch.Tensor,
    model_log_variance: torch.Tensor,
) -> torch.Tensor:
    """One term of the bound in bits per dimension, (B,): L_0 = -log p(x_0 | x_1) where t == 0,
    else L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (Ho et al. 2020, eq. 5).

    Args:
        x0: the data on [-1, 1], 8-bit levels (the decoder term needs them on the grid).
        x_t: ``q_sample(x0, t, noise)``.
        t: (B,) 0-based timesteps.
        model_mean, model_log_variance: p(x_{t-1} | x_t), e.g. from :func:`p_mean_variance`.
    """
    q = schedule.q_posterior(x0, x_t, t)
    kl = mean_flat(normal_kl(q.mean, q.log_var, model_mean, model_log_variance)) / math.log(2.0)
    log_p = discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * model_log_variance)
    decoder_nll = -mean_flat(log_p.expand_as(x0)) / math.log(2.0)
    # both are finite everywhere (the clipped log-variance keeps the t = 0 KL finite), so where()
    # passes clean gradients
    return torch.where(t.to(kl.device) == 0, decoder_nll, kl)
