"""Reverse-process samplers, diffusers style: a sampler owns no network and the caller owns the loop.

    x = noise_like(x_T_shaped_tensor, generator)
    for t in sampler.timesteps:                       # descending
        eps_hat = objective.to_eps(schedule, net(x, t_batch), x, t_batch)
        x = sampler.step(eps_hat, int(t), x, generator)

:func:`sample_loop` is that loop. Samplers are plain classes holding a reference to the schedule, so
they always read its buffers on its current device. Run the loop under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from genexp.checks import check_bool
from genexp.diffusion.likelihood import VARIANCES, p_mean_variance
from genexp.diffusion.noise_schedule import NoiseSchedule
from genexp.errors import ConfigError, check_choice, check_float, check_int
from genexp.progress import track


def noise_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like x, in x's dtype and on x's device.

    Drawn on the generator's device and then moved, so a CPU generator also drives CUDA sampling
    (and gives the same numbers on every device); without a generator, drawn on x's device.
    """
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class Sampler:
    """What both samplers share: the descending ``timesteps`` and the step that follows each one."""

    def __init__(self, schedule: NoiseSchedule, timesteps: torch.Tensor):
        self.schedule = schedule
        self.timesteps = timesteps  # (num_steps,) long, descending, on CPU
        following = [*timesteps.tolist()[1:], -1]  # -1: the step that returns the final sample
        self._prev = dict(zip(timesteps.tolist(), following))

    @property
    def num_steps(self) -> int:
        """How many network evaluations one sample takes."""
        return len(self.timesteps)

    @property
    def nfe(self) -> int:
        """Network evaluations per sample (every sampler has it; a 2-evaluation method differs from its steps)."""
        return self.num_steps

    def prev_timestep(self, t: int) -> int:
        """The timestep after ``t`` in ``timesteps`` (-1 after the last)."""
        try:
            return self._prev[int(t)]
        except KeyError:
            raise ValueError(f"t={int(t)} is not one of this sampler's timesteps") from None

    def step(
        self, model_out: torch.Tensor, t: int, x_t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x at ``prev_timestep(t)`` from x_t and eps-hat ``model_out`` (the final sample after the last t)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps})"


class DDPMSampler(Sampler):
    """Ancestral sampling x_{t-1} ~ N(mu_tilde(x_t, x0_hat), sigma_t^2 I) over all T steps
    (Ho et al. 2020, Algorithm 2).

    Args:
        schedule: the model's noise schedule.
        variance: sigma_t^2 = beta_t (``beta``) or beta_tilde_t (``beta_tilde``); see
            :data:`~genexp.diffusion.likelihood.VARIANCES`.
        clip_denoised: clamp x0_hat to [-1, 1] before forming the mean.

    No noise is added at t = 0 (index 0), so the last step returns the mean, which is x0_hat there.
    """

    def __init__(self, schedule: NoiseSchedule, variance: str = "beta_tilde", clip_denoised: bool = True):
        self.variance = check_choice("variance", variance, tuple(VARIANCES))
        self.clip_denoised = check_bool("clip_denoised", clip_denoised)
        super().__init__(schedule, torch.arange(schedule.timesteps - 1, -1, -1, dtype=torch.long))

    def step(self, model_out, t, x_t, generator=None):
        self.prev_timestep(t)  # validates t
        t_batch = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
        p = p_mean_variance(self.schedule, model_out, x_t, t_batch, self.variance, self.clip_denoised)
        if int(t) == 0:
            return p.mean
        return p.mean + torch.exp(0.5 * p.log_var) * noise_like(x_t, generator)


class DDIMSampler(Sampler):
    """DDIM: x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z over a
    sub-sequence of the timesteps (Song et al. 2021, eq. 12), with
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (their eq. 16).

    Args:
        schedule: the model's noise schedule.
        steps: how many timesteps to visit, 1..T. They are ``linspace(T - 1, 0, steps)`` rounded: evenly
            spaced, always starting at T - 1 (the step x_T ~ N(0, I) stands for; Lin et al. 2024,
            "Common diffusion noise schedules and sample steps are flawed", "trailing") and, for
            steps >= 2, ending at 0. steps = T visits every timestep.
        eta: 0 is deterministic DDIM; 1 with steps = T is DDPM with sigma^2 = beta_tilde.
        clip_denoised: clamp x0_hat to [-1, 1] and re-derive eps_hat from it.

    Noise is drawn only where sigma > 0 (eta > 0, not the last step), in the same order as
    :class:`DDPMSampler` draws it, so the two agree sample for sample at steps = T, eta = 1.
    """

    @classmethod
    def steps_for_nfe(cls, nfe: int, **node) -> int:
        """The most steps whose NFE is at most ``nfe``: one network evaluation per visited timestep,
        so ``nfe`` itself (``node``, the other arguments such as ``eta``, cost nothing)."""
        return int(nfe)

    def __init__(
        self, schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0, clip_denoised: bool = True
    ):
        steps = check_int("steps", steps, minimum=1)
        if steps > schedule.timesteps:
            raise ConfigError("steps", steps, f"must be <= the schedule's timesteps ({schedule.timesteps})")
        self.eta = check_float("eta", eta, minimum=0.0, maximum=1.0)
        self.clip_denoised = check_bool("clip_denoised", clip_denoised)
        spaced = torch.linspace(schedule.timesteps - 1, 0, steps, dtype=torch.float64).round().long()
        super().__init__(schedule, spaced)

    def step(self, model_out, t, x_t, generator=None):
        t, prev = int(t), self.prev_timestep(t)
        schedule = self.schedule
        t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        x0_pred = schedule.predict_x0_from_eps(x_t, t_batch, model_out)
        eps = model_out
        if self.clip_denoised:
            x0_pred = x0_pred.clamp(-1.0, 1.0)
            eps = schedule.predict_eps_from_x0(x_t, t_batch, x0_pred)
        # scalars in float64 on the schedule's device; abar of the step after the last is 1 (x_0 itself)
        a_t = schedule.alphas_cumprod[t]
        a_prev = schedule.alphas_cumprod[prev] if prev >= 0 else torch.ones_like(a_t)
        sigma = self.eta * torch.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        # clamp: rounding can push 1 - abar_prev - sigma^2 a hair below 0 at eta = 1
        dir_coef = (1.0 - a_prev - sigma**2).clamp(min=0.0).sqrt()
        x_prev = a_prev.sqrt().to(x_t.dtype) * x0_pred + dir_coef.to(x_t.dtype) * eps
        if self.eta > 0 and prev >= 0:  # sigma > 0 exactly then; decided in Python (no device sync)
            x_prev = x_prev + sigma.to(x_t.dtype) * noise_like(x_t, generator)
        return x_prev


def sample_loop(
    sampler: Sampler,
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run ``sampler`` from x_T (B, ...) to a sample, with ``eps_fn(x_t, t_batch) -> eps_hat``.

    ``t_batch`` is a LongTensor (B,) on x_T's device. Call it under ``torch.no_grad()``. A sampler
    with its own ``sample(eps_fn, x_T, generator)`` (a multistep or two-evaluation method,
    :mod:`genexp.diffusion.fast_samplers`) runs its own loop.
    """
    own_loop = getattr(sampler, "sample", None)
    if callable(own_loop):
        return own_loop(eps_fn, x_T, generator)
    x = x_T
    for t in track(sampler.timesteps.tolist(), f"{type(sampler).__name__} steps"):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x = sampler.step(eps_fn(x, t_batch), t, x, generator)
    return x
