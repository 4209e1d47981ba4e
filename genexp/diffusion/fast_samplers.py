"""Few-step samplers of the probability-flow ODE for a model trained as DDPM is (no retraining).

Both solve the same ODE as DDIM with eta = 0 (Song et al. 2021, section 4.3), with a higher-order
method, and own their loop: :func:`~genexp.diffusion.samplers.sample_loop` hands them
``eps_fn(x_t, t_batch) -> eps_hat`` and x_T and they return the sample.

- :class:`DPMSolverPPSampler`: DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2),
  multistep second order in the data-prediction form, on the model's own discrete timesteps: one
  network evaluation per step.
- :class:`HeunSampler`: Heun's method on the EDM sigma grid (Karras et al. 2022, Algorithm 1,
  deterministic): two evaluations per step but the last, 2 steps - 1 in all. It queries the model
  at continuous sigma, i.e. at a fractional timestep (interpolated over log sigma, as k-diffusion's
  ``DiscreteSchedule`` does).

Notation: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) (VP), lambda_t = log(alpha_t / sigma_t)
the half log-SNR; Karras's sigma = sigma_t / alpha_t = sqrt((1 - abar_t) / abar_t) and the EDM state
x / alpha_t. Run them under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from genexp.checks import check_bool
from genexp.diffusion.noise_schedule import NoiseSchedule
from genexp.diffusion.samplers import Sampler
from genexp.errors import ConfigError, check_choice, check_float, check_int
from genexp.progress import track

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SPACINGS = ("logsnr", "time")


def _check_steps(schedule: NoiseSchedule, steps: int) -> int:
    steps = check_int("steps", steps, minimum=1)
    if steps > schedule.timesteps:
        raise ConfigError("steps", steps, f"must be <= the schedule's timesteps ({schedule.timesteps})")
    return steps


def _batch(value: float | int | torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A timestep (B,) on x's device: long for an index, float for a fractional one."""
    return torch.full(
        (x.shape[0],), float(value) if dtype.is_floating_point else int(value), dtype=dtype, device=x.device
    )


def half_log_snr(schedule: NoiseSchedule) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t) at every timestep (T,), float64, decreasing in t."""
    return 0.5 * (torch.log(schedule.alphas_cumprod) - schedule.log_one_minus_alphas_cumprod)


def logsnr_timesteps(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """``steps`` timesteps from T - 1 to 0 evenly spaced in lambda (Lu et al. 2022, "DPM-Solver",
    section 3.3: uniform logSNR steps, their choice for low-resolution images), each rounded to the
    timestep of nearest lambda.

    Two targets can round to one timestep where lambda changes fastest (near t = 0 at large
    ``steps``); such a target takes the next free timestep towards t = 0 instead, so the grid always
    has exactly ``steps`` distinct timesteps, starts at T - 1 and (steps >= 2) ends at 0.
    """
    lam = half_log_snr(schedule).cpu()
    targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
    nearest = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
    chosen, floor = [], schedule.timesteps  # descending; each at most one below the previous
    for k, t in enumerate(nearest):
        t = min(t, floor - 1, schedule.timesteps - 1)
        t = max(t, steps - 1 - k)  # leave room for the targets still to place
        chosen.append(t)
        floor = t
    return torch.tensor(chosen, dtype=torch.long)


class DPMSolverPPSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data prediction
    x0_hat = (x_t - sigma_t eps_hat) / alpha_t, with h_i = lambda_{t_i} - lambda_{t_{i-1}}:

        first step:  x_{t_1} = (sigma_{t_1} / sigma_{t_0}) x_{t_0} - alpha_{t_1} (e^{-h_1} - 1) x0_hat_0
        then:        D_i = (1 + 1 / (2 r_i)) x0_hat_{i-1} - 1 / (2 r_i) x0_hat_{i-2},  r_i = h_{i-1} / h_i
                     x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i

    The grid is ``steps`` timesteps from T - 1 to 0 (``spacing``) followed by the clean end
    (abar = 1, lambda = inf), as DDIM's is; the step to it is first order (h = inf: the result is
    x0_hat at timestep 0), DPM-Solver's ``lower_order_final`` (k-diffusion's ``sample_dpmpp_2m``
    does the same at sigma = 0). One network evaluation per timestep: NFE = ``steps``.

    Args:
        schedule: the model's noise schedule.
        steps: timesteps visited (network evaluations), 1..T.
        spacing: ``logsnr`` (uniform in lambda, :func:`logsnr_timesteps`) or ``time`` (uniform in t,
            DDIM's grid: ``linspace(T - 1, 0, steps)`` rounded).
        clip_denoised: clamp x0_hat to [-1, 1] (the thresholding data prediction allows; DDIM's option).
    """

    @classmethod
    def steps_for_nfe(cls, nfe: int, **node) -> int:
        """The most steps whose NFE is at most ``nfe``: one evaluation per step, so ``nfe`` itself
        (the lower-order final steps reuse the multistep history, costing no extra evaluation)."""
        return int(nfe)

    def __init__(
        self, schedule: NoiseSchedule, steps: int = 10, spacing: str = "logsnr", clip_denoised: bool = True
    ):
        steps = _check_steps(schedule, steps)
        self.spacing = check_choice("spacing", spacing, SPACINGS)
        self.clip_denoised = check_bool("clip_denoised", clip_denoised)
        if self.spacing == "logsnr":
            grid = logsnr_timesteps(schedule, steps)
        else:
            grid = torch.linspace(schedule.timesteps - 1, 0, steps, dtype=torch.float64).round().long()
        super().__init__(schedule, grid)

    def step(self, model_out, t, x_t, generator=None):
        raise TypeError("DPMSolverPPSampler is multistep: it runs its own loop (sample), not step by step")

    def sample(
        self, eps_fn: EpsFn, x_T: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The sample from x_T (B, ...) at timestep T - 1; deterministic (``generator`` unused)."""
        s = self.schedule
        lam = half_log_snr(s)
        x, prev, h_prev = x_T, None, None  # prev: (x0_hat, t) of the step before
        ts = self.timesteps.tolist()
        for i, t in enumerate(track(ts, f"{type(self).__name__} steps")):
            t_batch = _batch(t, x, torch.long)
            x0 = s.predict_x0_from_eps(x, t_batch, eps_fn(x, t_batch))
            if self.clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
            if i == len(ts) - 1:
                return x0  # first order to lambda = inf: x_0 = x0_hat
            nxt = ts[i + 1]
            h = lam[nxt] - lam[t]
            d = x0
            if prev is not None:  # second order from the last two data predictions
                r = h_prev / h
                d = (1.0 + 0.5 / r).to(x.dtype) * x0 - (0.5 / r).to(x.dtype) * prev
            ratio = s.sqrt_one_minus_alphas_cumprod[nxt] / s.sqrt_one_minus_alphas_cumprod[t]
            coef = -s.sqrt_alphas_cumprod[nxt] * torch.expm1(-h)
            x = ratio.to(x.dtype) * x + coef.to(x.dtype) * d
            prev, h_prev = x0, h
        return x  # not reached: the last timestep returns


class HeunSampler:
    """Heun's 2nd-order method on the EDM sigma grid (Karras et al. 2022, Algorithm 1, deterministic,
    S_churn = 0) for a discrete-time DDPM model.

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i < N, then sigma_N = 0 (their eq. 5), with sigma = sqrt((1 - abar) / abar) and sigma_min,
    sigma_max that of timesteps 0 and T - 1. In the EDM state x = x_t / alpha_t the ODE is
    dx / dsigma = (x - D(x; sigma)) / sigma = eps_hat, with D = x - sigma eps_hat(x / sqrt(1 + sigma^2),
    t(sigma)); each step is Euler, corrected by the slope at its end except into sigma = 0.

    The model is queried at t(sigma), the fractional timestep that interpolates log sigma linearly
    between the two neighbouring timesteps (k-diffusion's ``DiscreteSchedule.sigma_to_t``):
    ``eps_fn`` receives a float64 ``t_batch`` (a net's sinusoidal embedding takes one). The start
    is the same x_T as the other samplers', mapped exactly: x = x_T / alpha_{T-1}.

    Args:
        schedule: the model's noise schedule.
        steps: N, the sigma values before 0; NFE = 2 N - 1.
        rho: the grid's exponent (7: Karras et al.'s choice; larger spends more steps at low sigma).
        clip_denoised: clamp D to [-1, 1] (DDIM's option).
    """

    @classmethod
    def steps_for_nfe(cls, nfe: int, **node) -> int:
        """The most steps N whose NFE 2 N - 1 is at most ``nfe``: N = (nfe + 1) // 2 (an even ``nfe``
        leaves one evaluation unspent; ``rho`` does not change the cost)."""
        return (int(nfe) + 1) // 2

    def __init__(
        self, schedule: NoiseSchedule, steps: int = 10, rho: float = 7.0, clip_denoised: bool = True
    ):
        self.schedule = schedule
        self.steps = _check_steps(schedule, steps)
        self.rho = check_float("rho", rho, positive=True)
        self.clip_denoised = check_bool("clip_denoised", clip_denoised)

    @property
    def nfe(self) -> int:
        """Network evaluations per sample: two per step, one for the last (Euler into sigma = 0)."""
        return 2 * self.steps - 1

    num_steps = nfe  # what Sampler.num_steps means: network evaluations per sample

    def log_sigmas(self) -> torch.Tensor:
        """log sigma at every timestep (T,), float64, increasing in t."""
        s = self.schedule
        return 0.5 * (s.log_one_minus_alphas_cumprod - torch.log(s.alphas_cumprod))

    def sigmas(self) -> torch.Tensor:
        """The grid sigma_0 > ... > sigma_{N-1} > sigma_N = 0, (N + 1,) float64 (Karras et al. eq. 5)."""
        log_sigma = self.log_sigmas()
        lo, hi = log_sigma[0].exp(), log_sigma[-1].exp()
        ramp = torch.linspace(0.0, 1.0, self.steps, dtype=torch.float64, device=log_sigma.device)
        inv = 1.0 / self.rho
        grid = (hi**inv + ramp * (lo**inv - hi**inv)) ** self.rho
        if self.steps == 1:
            grid = hi.reshape(1)
        return torch.cat([grid, grid.new_zeros(1)])

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional timestep of ``sigma`` (linear in log sigma between neighbours), float64."""
        log_sigma = self.log_sigmas()
        x = sigma.log().clamp(float(log_sigma[0]), float(log_sigma[-1]))
        hi = torch.searchsorted(log_sigma, x.reshape(1)).clamp(1, len(log_sigma) - 1)
        lo = hi - 1
        w = (x - log_sigma[lo]) / (log_sigma[hi] - log_sigma[lo])
        return (lo + w).reshape(())

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`t_of_sigma` for t in [0, T - 1] (any shape), float64."""
        log_sigma = self.log_sigmas()
        t = t.to(torch.float64)
        lo = t.floor().long().clamp(0, len(log_sigma) - 2)
        w = t - lo
        return torch.exp((1 - w) * log_sigma[lo] + w * log_sigma[lo + 1])

    def denoise(self, eps_fn: EpsFn, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x; sigma) = x - sigma eps_hat(x / sqrt(1 + sigma^2), t(sigma)) for the EDM state x."""
        t_batch = _batch(self.t_of_sigma(sigma), x, torch.float64)
        eps = eps_fn(x * torch.rsqrt(1.0 + sigma**2).to(x.dtype), t_batch)
        d = x - sigma.to(x.dtype) * eps
        return d.clamp(-1.0, 1.0) if self.clip_denoised else d

    def sample(
        self, eps_fn: EpsFn, x_T: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The sample from x_T (B, ...) at timestep T - 1; deterministic (``generator`` unused)."""
        sigmas = self.sigmas()
        x = x_T * torch.sqrt(1.0 + sigmas[0] ** 2).to(x_T.dtype)  # x_T / alpha_{T-1}
        for i in track(range(self.steps), f"{type(self).__name__} steps"):
            sigma, nxt = sigmas[i], sigmas[i + 1]
            d = (x - self.denoise(eps_fn, x, sigma)) / sigma.to(x.dtype)
            x_next = x + (nxt - sigma).to(x.dtype) * d
            if nxt > 0:  # the trapezoidal correction (Algorithm 1, lines 9-11)
                d_next = (x_next - self.denoise(eps_fn, x_next, nxt)) / nxt.to(x.dtype)
                x_next = x + (nxt - sigma).to(x.dtype) * (0.5 * d + 0.5 * d_next)
            x = x_next
        return x

    def __repr__(self) -> str:
        return f"HeunSampler(steps={self.steps}, nfe={self.nfe})"
