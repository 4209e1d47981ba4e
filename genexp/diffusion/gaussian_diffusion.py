"""Gaussian diffusion over tensors of any shape: the training objective, sampling and the bound.

DDPM (Ho et al. 2020) trains a network on x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε to predict ε (the talk's
loss ‖ε − ε_θ(x_t, t)‖², section 3.4), or x0, or v (Salimans & Ho 2022); min-SNR weighting is
Hang et al. 2023. The same object diffuses images (``DDPM``) and a first stage's latent vectors
(``LDM``): shapes are ``(B, *shape)`` throughout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from genexp.diffusion.likelihood import p_mean_variance, prior_bpd, vb_term_bpd
from genexp.diffusion.noise_schedule import NoiseSchedule
from genexp.diffusion.objectives import LOSS_WEIGHTINGS, OBJECTIVES, check_objective, loss_weight
from genexp.diffusion.samplers import sample_loop
from genexp.errors import ConfigError, check_choice, check_float, check_int
from genexp.models.base import upcast
from genexp.progress import track


class GaussianDiffusion(nn.Module):
    """A denoiser ``net(x_t, t)`` trained under a noise schedule, with a sampler chosen by config.

    Args:
        net: ``(B, *shape), (B,) -> (B, *shape)``, the network's prediction for ``objective``.
        schedule: the noise schedule (β, ᾱ and the posterior as buffers).
        sampler: ``schedule -> sampler`` (a ``_partial_`` from ``sampler/``): DDPM or DDIM.
        objective: what the network predicts: ``eps`` (the talk's), ``x0`` or ``v``.
        loss_weighting: ``simple`` (DDPM's unweighted MSE) or ``min_snr`` (Hang et al. 2023).
        min_snr_gamma: γ of min-SNR weighting (the paper's 5).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        sampler: Callable,
        objective: str = "eps",
        loss_weighting: str = "simple",
        min_snr_gamma: float = 5.0,
    ):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.objective = check_objective(objective)
        self.loss_weighting = check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        self.min_snr_gamma = check_float("min_snr_gamma", min_snr_gamma, positive=True)
        try:
            self.sampler = sampler(schedule)  # holds the schedule, not copies: always on its device
        except ConfigError as err:
            raise ConfigError(f"sampler.{err.key}", err.value, err.message) from None

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂(x_t, t) whatever the network predicts (the samplers and the bound work in ε)."""
        out = upcast(self.net(x_t, t))
        return OBJECTIVES[self.objective].to_eps(self.schedule, out, x_t.to(out.dtype), t)

    def training_loss(self, x0: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One Monte Carlo term of the objective at t ~ U{0..T-1}, per batch: (loss, logs)."""
        b = x0.shape[0]
        t = torch.randint(0, self.timesteps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.q_sample(x0, t, noise)
        out = upcast(self.net(x_t, t))
        target = OBJECTIVES[self.objective].target(self.schedule, x0, noise, t).to(out.dtype)
        mse = (out - target).pow(2).flatten(1).mean(1)  # (B,)
        weight = loss_weight(
            self.loss_weighting, self.objective, self.schedule.snr_at(t), self.min_snr_gamma
        ).to(mse.dtype)
        loss = (weight * mse).mean()
        with torch.no_grad():
            # the MSE in the low- and high-noise halves: which end of the chain the net has learnt
            low = t < self.timesteps // 2
            logs = {"mse": mse.mean()}
            if low.any():
                logs["mse_low_noise"] = mse[low].mean()
            if (~low).any():
                logs["mse_high_noise"] = mse[~low].mean()
        return loss, logs

    @torch.no_grad()
    def sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
        sampler=None,
    ) -> torch.Tensor:
        """Run ``sampler`` (default: the configured one) from x_T ~ N(0, I) of ``shape``."""
        ref = self.schedule.betas
        device = device or ref.device
        dtype = next(self.net.parameters()).dtype
        gen_device = generator.device if generator is not None else device
        x_T = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
        return sample_loop(sampler or self.sampler, self.predict_eps, x_T, generator)

    @torch.no_grad()
    def bound_bpd(
        self, x0: torch.Tensor, num_timesteps: int | None = None, variance: str = "beta"
    ) -> torch.Tensor:
        """The variational bound −log p(x0) ≤ L_T + Σ_{t>1} L_{t−1} + L_0 in bits/dim, per item: (B,).

        x0 must lie on the 8-bit grid in [−1, 1] (the decoder L_0 is a discretised Gaussian, Ho et
        al. 2020 §3.3). With ``num_timesteps`` K < T, L_0 and L_T are exact and the sum of the
        T−1 KL terms is estimated by stratified sampling: {1..T−1} is cut into K−1 contiguous
        blocks, each item draws one timestep uniformly in each block, and a block's term counts
        as many times as the block has timesteps. That is unbiased (E[n_j L_{t_j}] = Σ_{t in block j}
        L_t); an evenly spaced grid is not, since the KL terms peak at t = 1 and the grid's first
        point would stand for a whole block of much smaller ones. K = T is the exact bound (what
        DDPM reports); a smaller K trades variance for speed.
        """
        T = self.timesteps
        k = T if num_timesteps is None else min(check_int("bpd_timesteps", num_timesteps, minimum=2), T)
        edges = torch.linspace(1, T, k).round().long().unique().tolist()  # block j: [e_j, e_{j+1})
        total = prior_bpd(self.schedule, x0)
        blocks = [(0, 1)] + list(zip(edges[:-1], edges[1:]))  # L_0 first: one timestep, exact
        for start, stop in track(blocks, "bits/dim bound timesteps"):
            t = torch.randint(start, stop, (x0.shape[0],), device=x0.device)  # (B,) one per item
            x_t = self.schedule.q_sample(x0, t, torch.randn_like(x0))
            mean, _, log_var, _ = p_mean_variance(
                self.schedule, self.predict_eps(x_t, t), x_t, t, variance=variance, clip_denoised=True
            )
            total = total + (stop - start) * vb_term_bpd(self.schedule, x0, x_t, t, mean, log_var)
        return total
