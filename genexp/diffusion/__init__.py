"""Diffusion math in pure torch: noise schedules, objectives, samplers and the variational bound.

DDPM (Ho et al. 2020), improved DDPM (Nichol & Dhariwal 2021), DDIM (Song et al. 2021). A schedule
is a function ``timesteps -> betas`` wrapped by :class:`NoiseSchedule`; an objective is an entry of
:data:`OBJECTIVES`; a sampler steps x_t -> x_prev given eps-hat and leaves the loop to the caller.
"""

from genexp.diffusion.likelihood import (
    VARIANCES,
    PMeanVariance,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
    p_mean_variance,
    prior_bpd,
    vb_term_bpd,
)
from genexp.diffusion.noise_schedule import Gaussian, NoiseSchedule
from genexp.diffusion.objectives import LOSS_WEIGHTINGS, OBJECTIVES, Objective, check_objective, loss_weight
from genexp.diffusion.samplers import DDIMSampler, DDPMSampler, Sampler, noise_like, sample_loop

__all__ = [
    "LOSS_WEIGHTINGS",
    "OBJECTIVES",
    "VARIANCES",
    "DDIMSampler",
    "DDPMSampler",
    "Gaussian",
    "NoiseSchedule",
    "Objective",
    "PMeanVariance",
    "Sampler",
    "approx_standard_normal_cdf",
    "check_objective",
    "discretized_gaussian_log_likelihood",
    "loss_weight",
    "noise_like",
    "normal_kl",
    "p_mean_variance",
    "prior_bpd",
    "sample_loop",
    "vb_term_bpd",
]
