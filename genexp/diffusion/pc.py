"""Predictor-corrector sampling of a reverse-time SDE (Song et al. 2021, section 4.2, Algorithms 2-5).

Each of ``steps`` steps from t_i to t_{i+1} < t_i first runs ``corrector_steps`` of Langevin MCMC at
t_i (the corrector: Algorithm 4 for VE, 5 for VP), then one step of a numerical reverse-SDE solver
(the predictor) to t_{i+1}:

- ``euler_maruyama``: x <- x - f dt + g^2 s dt + g sqrt(dt) z with dt = t_i - t_{i+1} (the reverse
  SDE of eq. 6, discretised by Euler-Maruyama);
- ``reverse_diffusion``: x <- x - f_i + G_i^2 s + G_i z, the forward discretisation
  x(t_i) = x(t_{i+1}) + f_i + G_i z reversed (appendix E, eq. 45-46): SMLD's chain for VE, DDPM's
  ancestral step (2 - sqrt(1 - beta_i)) x + beta_i s + sqrt(beta_i) z for VP.

The Langevin step is x <- x + e s + sqrt(2 e) z with e = 2 alpha_i (snr ||z|| / ||s||)^2, the norms
averaged over the batch, as Song et al.'s code does. (Per-sample norms make e depend on the sample's
own position, and the chain then no longer keeps p_t: on Gaussian data its std drifts up, +3.5 % in
400 corrector steps at snr 0.05, measured; with the batch's mean norms one e serves every sample.)
The last predictor step adds no noise (the denoised mean).
NFE = steps (1 + corrector_steps), or steps with ``corrector=none``.

Both processes a model hands in are sampled the same way, through the network's eps-hat and the
score s = -eps-hat / std(t) (Song et al. 2021, eq. 7 with the noise-predicting parameterisation):

- :class:`ContinuousTime` (a :mod:`genexp.diffusion.sde` SDE and the smallest time eps): the grid
  is uniform from t = 1 to t = eps and the network gets (B,) float times;
- a DDPM :class:`~genexp.diffusion.noise_schedule.NoiseSchedule`: the discrete VP chain of its
  timesteps (``steps`` of them, DDIM's ``linspace(T - 1, 0, steps)`` rounded), with
  beta_i = 1 - abar_t / abar_prev between visited timesteps and std = sqrt(1 - abar_t): an
  eps-network trained as DDPM is read as the score of its own chain, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from genexp.diffusion.noise_schedule import NoiseSchedule
from genexp.diffusion.samplers import noise_like
from genexp.diffusion.sde import SDE, per_row
from genexp.errors import ConfigError, check_choice, check_float, check_int
from genexp.progress import track

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PREDICTORS = ("euler_maruyama", "reverse_diffusion")
CORRECTORS = ("langevin", "none")


class ContinuousTime(NamedTuple):
    """A continuous-time SDE to sample from t = 1 down to its smallest time ``eps``."""

    sde: SDE
    eps: float


class _Continuous:
    """The SDE's coefficients at grid points t (float, in [eps, 1]), as (B,) tensors."""

    def __init__(self, process: ContinuousTime):
        self.sde, self.eps = process.sde, process.eps

    def grid(self, steps: int) -> list[float]:
        return torch.linspace(1.0, self.eps, steps + 1, dtype=torch.float64).tolist()

    def times(self, t: float, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return self.sde.std(t)

    def increments(self, x, t, t_next):
        """(f dt, g^2 dt) of the forward SDE over dt = t - t_next (Euler-Maruyama)."""
        f, g = self.sde.sde(x, t)
        dt = t - t_next
        return f * per_row(dt, x), g.pow(2) * dt

    def discretize(self, x, t, t_next):
        return self.sde.discretize(x, t, t_next)

    def langevin_alpha(self, t, t_next):
        return self.sde.langevin_alpha(t, t_next)


class _DiscreteVP:
    """DDPM's chain over a subsequence of its timesteps (long indices; -1 after the last: x_0)."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    def grid(self, steps: int) -> list[int]:
        if steps > self.schedule.timesteps:
            raise ConfigError(
                "steps", steps, f"must be <= the schedule's timesteps ({self.schedule.timesteps})"
            )
        visited = torch.linspace(self.schedule.timesteps - 1, 0, steps, dtype=torch.float64).round().long()
        return [*visited.tolist(), -1]

    def times(self, t: int, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t (B,) float64, 1 at t = -1 (the clean data)."""
        abar = self.schedule.alphas_cumprod
        t = t.to(abar.device)
        return torch.where(t >= 0, abar[t.clamp(min=0)], abar.new_ones(()))

    def std(self, t):
        return (1 - self.abar(t)).sqrt()

    def beta(self, t, t_next):
        """beta_i = 1 - abar_t / abar_{t_next}: the chain's noise between the two visited steps."""
        return 1 - self.abar(t) / self.abar(t_next)

    def increments(self, x, t, t_next):
        beta = self.beta(t, t_next)  # beta(t) dt of the VP SDE the chain discretises
        return -0.5 * per_row(beta, x) * x, beta

    def discretize(self, x, t, t_next):
        beta = self.beta(t, t_next)
        return per_row((1 - beta).sqrt() - 1, x) * x, beta.sqrt()

    def langevin_alpha(self, t, t_next):
        return 1 - self.beta(t, t_next)


class PCSampler:
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2-3; see the module docstring).

    Args:
        process: what the model samples: a :class:`ContinuousTime` SDE (``score_sde``) or a DDPM
            :class:`NoiseSchedule` (``ddpm``, ``ldm``: ``sampler=pc`` reads their eps-net as a score).
        predictor: ``euler_maruyama`` or ``reverse_diffusion``.
        corrector: ``langevin`` or ``none``.
        snr: the corrector's signal-to-noise ratio r (> 0; Song et al.'s 0.16 for VE on CIFAR-10).
        steps: predictor steps N (>= 1; at most the schedule's timesteps on a DDPM chain).
        corrector_steps: Langevin steps M per predictor step (>= 1 with ``corrector=langevin``).
    """

    def __init__(
        self,
        process: ContinuousTime | NoiseSchedule,
        predictor: str = "reverse_diffusion",
        corrector: str = "langevin",
        snr: float = 0.16,
        steps: int = 1000,
        corrector_steps: int = 1,
    ):
        self.predictor = check_choice("predictor", predictor, PREDICTORS)
        self.corrector = check_choice("corrector", corrector, CORRECTORS)
        self.snr = check_float("snr", snr, positive=True)
        self.steps = check_int("steps", steps, minimum=1)
        self.corrector_steps = check_int("corrector_steps", corrector_steps, minimum=0)
        if corrector == "langevin" and corrector_steps == 0:
            raise ConfigError(
                "corrector_steps", 0, "the langevin corrector needs >= 1 step; or pass sampler.corrector=none"
            )
        if isinstance(process, NoiseSchedule):
            self.process = _DiscreteVP(process)
        elif isinstance(process, ContinuousTime):
            self.process = _Continuous(process)
        else:
            raise TypeError(
                f"PCSampler samples a ContinuousTime SDE or a NoiseSchedule, not {type(process).__name__}"
            )
        self.grid = self.process.grid(self.steps)  # checks steps against a DDPM chain's length now

    @property
    def corrections(self) -> int:
        return self.corrector_steps if self.corrector == "langevin" else 0

    @property
    def nfe(self) -> int:
        """Network evaluations per sample: steps (1 + corrector_steps), or steps without a corrector."""
        return self.steps * (1 + self.corrections)

    @classmethod
    def steps_for_nfe(cls, nfe: int, **node) -> int:
        """The most steps whose NFE is at most ``nfe``: nfe // (1 + corrector_steps), the node's
        ``corrector_steps`` counting 0 with ``corrector: none`` (the defaults: langevin, 1)."""
        corrector = node.get("corrector", "langevin")
        per_step = 1 + (int(node.get("corrector_steps", 1)) if corrector == "langevin" else 0)
        return int(nfe) // per_step

    def _score(self, eps_fn: EpsFn, x: torch.Tensor, t_batch: torch.Tensor) -> torch.Tensor:
        """s = -eps-hat(x, t) / std(t), (B, ...)."""
        eps = eps_fn(x, t_batch).to(x.dtype)
        return -eps / per_row(self.process.std(t_batch), x)

    def _langevin(self, eps_fn, x, t_batch, alpha, generator):
        """``corrector_steps`` of Algorithm 4/5: x <- x + e s + sqrt(2 e) z, e = 2 alpha (r ||z|| / ||s||)^2."""
        for _ in range(self.corrections):
            s = self._score(eps_fn, x, t_batch)
            z = noise_like(x, generator)
            ratio = z.flatten(1).norm(dim=1).mean() / s.flatten(1).norm(dim=1).mean().clamp(min=1e-12)
            e = per_row(2 * alpha * (self.snr * ratio) ** 2, x)  # (B, 1, ...): alpha is per row, one value
            x = x + e * s + (2 * e).sqrt() * z
        return x

    def _predict(self, eps_fn, x, t_batch, next_batch):
        """(mean, noise std (B,)) of the predictor's step from t to t_next."""
        s = self._score(eps_fn, x, t_batch)
        if self.predictor == "euler_maruyama":
            f_dt, g2_dt = self.process.increments(x, t_batch, next_batch)
            return x - f_dt + per_row(g2_dt, x) * s, g2_dt.sqrt()
        f, big_g = self.process.discretize(x, t_batch, next_batch)
        return x - f + per_row(big_g.pow(2), x) * s, big_g

    @torch.no_grad()
    def sample(
        self, eps_fn: EpsFn, x_T: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The sample from x_T (B, ...) drawn from the prior, with ``eps_fn(x, t_batch) -> eps-hat``."""
        x = x_T
        last = len(self.grid) - 2
        pairs = list(zip(self.grid[:-1], self.grid[1:]))
        for i, (t, t_next) in enumerate(track(pairs, "PC steps")):
            t_batch, next_batch = self.process.times(t, x), self.process.times(t_next, x)
            alpha = self.process.langevin_alpha(t_batch, next_batch).to(device=x.device, dtype=x.dtype)
            x = self._langevin(eps_fn, x, t_batch, alpha, generator)
            mean, noise_std = self._predict(eps_fn, x, t_batch, next_batch)
            x = mean if i == last else mean + per_row(noise_std, x) * noise_like(x, generator)
        return x

    def __repr__(self) -> str:
        return (
            f"PCSampler(predictor={self.predictor}, corrector={self.corrector}, snr={self.snr:g}, "
            f"steps={self.steps}, corrector_steps={self.corrector_steps})"
        )
