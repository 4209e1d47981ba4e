"""The noise levels of a noise-conditional score model and annealed Langevin dynamics over them.

A noise-conditional score network s_θ(x, σ) ≈ ∇ₓ log q_σ(x), q_σ = p_data ⊛ N(0, σ² I), is trained
on a geometric ladder σ_1 > σ_2 > ... > σ_L (Song & Ermon 2019, section 4.1): σ_1 large enough
that q_σ1 forgets the data (NCSNv2, Song & Ermon 2020, technique 1: about the largest pairwise
distance of the training images), σ_L small enough that q_σL is the data, and a constant ratio
γ = σ_{i-1}/σ_i between neighbours so that each level's samples are typical for the next.

:class:`SigmaLadder` holds the ladder (a float64 buffer that moves with the model) and its
continuous interpolation σ(t) = σ_min (σ_max/σ_min)^t, t in [0, 1] (Song et al. 2021, the VE SDE of
eq. 9 / 31), which the probability-flow ODE of the model and its likelihood use.

:class:`LangevinSampler` is Song & Ermon 2019, Algorithm 1: for each σ_i, T Langevin steps

    x ← x + (α_i / 2) s(x, σ_i) + √α_i z,   α_i = ε σ_i² / σ_L²,   z ~ N(0, I),

then NCSNv2's final denoising step x ← x + σ_L² s(x, σ_L) (Tweedie's formula, E[x | x̃] for the
σ_L-noised x̃; Song & Ermon 2020, appendix C.2). The sampler owns no network: the model passes
its score as ``score(x, σ)`` with σ a (B,) tensor, as diffusers' schedulers take the model output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from genexp.checks import check_bool
from genexp.diffusion.samplers import noise_like
from genexp.errors import ConfigError, check_float, check_int
from genexp.progress import track

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SigmaLadder(nn.Module):
    """σ_1 = σ_max > ... > σ_L = σ_min, geometric: σ_i = σ_max (σ_min/σ_max)^((i−1)/(L−1)).

    Args:
        sigma_min: σ_L > 0, the smallest noise (the data end).
        sigma_max: σ_1 > σ_min, the largest noise (the prior N(0, σ_max² I) stands for q_σ1).
        num_scales: L >= 2 levels.
    """

    def __init__(self, sigma_min: float, sigma_max: float, num_scales: int):
        super().__init__()
        self.sigma_min = check_float("sigma_min", sigma_min, positive=True)
        self.sigma_max = check_float("sigma_max", sigma_max, positive=True)
        if not self.sigma_min < self.sigma_max:
            raise ConfigError(
                "sigma_min", sigma_min, f"must be < model.sigma_max ({sigma_max}); σ runs from large to small"
            )
        self.num_scales = check_int("num_scales", num_scales, minimum=2)
        sigmas = self.sigma_at(torch.linspace(1.0, 0.0, num_scales, dtype=torch.float64))  # (L,)
        self.register_buffer("sigmas", sigmas, persistent=False)  # rebuilt from the arguments

    @property
    def log_ratio(self) -> float:
        """log(σ_max / σ_min): σ(t)'s growth rate in t, d log σ / dt."""
        return math.log(self.sigma_max / self.sigma_min)

    @property
    def gamma(self) -> float:
        """γ = σ_{i−1} / σ_i, the constant ratio of neighbouring levels (NCSNv2, technique 2)."""
        return math.exp(self.log_ratio / (self.num_scales - 1))

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t) = σ_min (σ_max/σ_min)^t (t = 0: σ_min, t = 1: σ_max), in t's dtype and device."""
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def time_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(σ) = log(σ/σ_min) / log(σ_max/σ_min), the inverse of :meth:`sigma_at` (σ_L: 0, σ_1: 1)."""
        return torch.log(sigma / self.sigma_min) / self.log_ratio


class LangevinSampler:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) with NCSNv2's final denoising.

    Args:
        ladder: the model's :class:`SigmaLadder` (the ``_partial_`` sampler node is completed with
            it by the model); held by reference, so it reads σ on the model's device.
        steps_per_scale: T, Langevin steps at each σ_i (>= 1).
        step_lr: ε > 0, the step at the smallest level; α_i = ε σ_i² / σ_L² (Algorithm 1).
        denoise: end with x ← x + σ_L² s(x, σ_L) (NCSNv2, appendix C.2): removes the σ_L noise
            the last Langevin steps leave, one more network evaluation.
    """

    steps_key = "steps_per_scale"  # the node key the NFE sweep sets (see :meth:`steps_for_nfe`)

    @classmethod
    def steps_for_nfe(cls, nfe: int, **node) -> int:
        """The most ``steps_per_scale`` whose NFE (L · T + denoise) is at most ``nfe`` (0: none fits).

        ``node`` holds the sampler's other arguments and the model's ``num_scales`` (L), which the
        sampler node lacks: the caller passes ``num_scales=cfg.model.num_scales``."""
        num_scales = node.get("num_scales")
        if num_scales is None:
            raise ConfigError(
                "num_scales", None, "pass the model's num_scales (L) to count L · T evaluations"
            )
        num_scales = check_int("num_scales", num_scales, minimum=2)
        denoise = bool(node.get("denoise", True))
        return max(0, (int(nfe) - int(denoise)) // num_scales)

    def __init__(
        self, ladder: SigmaLadder, steps_per_scale: int = 5, step_lr: float = 2e-5, denoise: bool = True
    ):
        if not isinstance(ladder, SigmaLadder):
            raise ConfigError(
                "_target_",
                f"{type(self).__module__}.{type(self).__name__}",
                f"annealed Langevin samples a noise-conditional score model (a σ ladder), not a "
                f"{type(ladder).__name__}; pick one of this model's samplers (sampler=ddim, dpm_solver_pp, heun)",
            )
        self.ladder = ladder
        self.steps_per_scale = check_int("steps_per_scale", steps_per_scale, minimum=1)
        self.step_lr = check_float("step_lr", step_lr, positive=True)
        self.denoise = check_bool("denoise", denoise)

    @property
    def nfe(self) -> int:
        """Network evaluations per sample: L · T, plus one for the denoising step."""
        return self.ladder.num_scales * self.steps_per_scale + int(self.denoise)

    def step_sizes(self) -> torch.Tensor:
        """α_i = ε σ_i² / σ_L², (L,) float64 on the ladder's device."""
        sigmas = self.ladder.sigmas
        return self.step_lr * (sigmas / sigmas[-1]) ** 2

    @torch.no_grad()
    def sample(self, score: Score, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Run Algorithm 1 from x (B, ...) (drawn from the prior by the caller) with ``score(x, σ)``."""
        sigmas, alphas = self.ladder.sigmas, self.step_sizes()
        levels = list(zip(sigmas.tolist(), alphas.tolist()))  # Python floats: no device syncs
        for sigma, alpha in track(levels, "Langevin noise levels"):
            sigma_batch = x.new_full((x.shape[0],), sigma, dtype=sigmas.dtype)
            for _ in range(self.steps_per_scale):
                s = score(x, sigma_batch).to(x.dtype)
                x = x + (alpha / 2) * s + math.sqrt(alpha) * noise_like(x, generator)
        if self.denoise:
            sigma_last = float(sigmas[-1])
            x = x + sigma_last**2 * score(x, x.new_full((x.shape[0],), sigma_last, dtype=sigmas.dtype)).to(
                x.dtype
            )
        return x

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_scales={self.ladder.num_scales}, steps_per_scale={self.steps_per_scale}, "
            f"step_lr={self.step_lr:g}, denoise={self.denoise})"
        )
