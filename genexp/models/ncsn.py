"""NCSN: a noise-conditional score network trained by denoising score matching over a ladder of
noise levels and sampled by annealed Langevin dynamics (Song & Ermon 2019, "Generative Modeling by
Estimating Gradients of the Data Distribution"; NCSNv2, Song & Ermon 2020, "Improved Techniques for
Training Score-Based Generative Models"); the talk's score-based model (section 3.4, SBM).

Images are mapped to [−1, 1], as the diffusion families do. The score of q_σ = p_data ⊛ N(0, σ² I)
is learnt at every σ_i of a geometric ladder σ_1 = σ_max > ... > σ_L = σ_min
(:class:`genexp.diffusion.langevin.SigmaLadder`) by denoising score matching (Vincent 2011; Song &
Ermon 2019, eq. 5-6) with λ(σ) = σ² and σ drawn uniformly from the ladder:

    ℓ(θ) = E_{σ, x, z} ½ λ(σ) ‖s_θ(x̃, σ) + (x̃ − x)/σ²‖²,   x̃ = x + σ z,  z ~ N(0, I)
         = E ½ ‖σ s_θ(x̃, σ) + z‖²                          (λ = σ² and (x̃ − x)/σ² = z/σ).

With NCSNv2's parameterisation s_θ(x, σ) = net(x, c(σ)) / σ (technique 3) the loss is
E ½ ‖net(x̃, c(σ)) + z‖²: DDPM's ε-prediction loss with ε_θ = −net, the talk's "the training
objective is actually the same". Why this parameterisation: the true score's size grows as 1/σ
(E‖∇ log q_σ(x̃ | x)‖² = D/σ²), so dividing by σ leaves the net a target of unit scale at every
level, as DDPM's ε has. Why c(σ) = time_scale · log(σ/σ_min) / log(σ_max/σ_min): the ``net/``
UNets embed a time step on DDPM's 0..999 range (sinusoids built for it), so σ_min ↔ step 0 (least
noise, as DDPM's t = 0) and σ_max ↔ step 999, linear in log σ: the ladder's rungs are evenly spaced
in the embedding, and a σ between rungs (the ODE's continuous σ(t)) is a real-valued step.

Sampling: x ~ N(0, σ_max² I) (q_σ1 once σ_max dwarfs the data; NCSNv2 technique 1), then the
``sampler/`` group's annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1; NCSNv2's final
denoising step).

Likelihood: the ladder's continuous interpolation σ(t) = σ_min (σ_max/σ_min)^t is the VE SDE of
Song et al. 2021 (eq. 9), whose probability-flow ODE (eq. 13) is

    dx/dt = −½ d[σ²(t)]/dt · ∇ log q_σ(t)(x) = −σ(t)² log(σ_max/σ_min) · s_θ(x, σ(t)),

transporting q_σmin (t = 0) to q_σmax (t = 1) exactly (the heat equation ∂q/∂t = ½ dσ²/dt Δq is
its continuity equation). :mod:`genexp.diffusion.ode_likelihood` runs noise at u = 0 and data at
u = 1, so u = 1 − t and dx/du = σ(t)² log(σ_max/σ_min) s_θ(x, σ(t)); the prior at u = 0 is
N(0, σ_max² I). ``nll_bpd`` is then the bits/dim of the uniformly dequantised images under
q_σmin (the data blurred by σ_min, an estimate by Hutchinson's trace), as for flow matching.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from genexp.diffusion.langevin import LangevinSampler, SigmaLadder
from genexp.diffusion.samplers import noise_like
from genexp.errors import ConfigError, check_float, check_int
from genexp.models.base import LossOutput, check_net_fits, upcast
from genexp.models.ode_bpd import ODEBitsPerDim


def langevin_sampler(sampler: Callable, ladder: SigmaLadder) -> LangevinSampler:
    """The ``sampler/`` node (a ``_partial_``) completed with the ladder; any other sampler (one
    built for a noise schedule) is refused in one line before it is called."""
    target = getattr(sampler, "func", sampler)
    if not (isinstance(target, type) and issubclass(target, LangevinSampler)):
        name = getattr(target, "__name__", type(target).__name__)
        raise ConfigError(
            "sampler",
            name,
            "ncsn samples by annealed Langevin dynamics only; use sampler=langevin "
            "(sampler.steps_per_scale, sampler.step_lr, sampler.denoise)",
        )
    try:
        return sampler(ladder)  # holds the ladder, not copies: always on its device
    except ConfigError as err:
        raise ConfigError(f"sampler.{err.key}", err.value, err.message) from None


class NCSN(ODEBitsPerDim, nn.Module):
    """Args:
    net: ``(B, C, H, W), (B,) -> (B, C, H, W)`` (a UNet from ``net/``); s_θ(x, σ) = net(x, c(σ)) / σ.
    sampler: ``ladder -> LangevinSampler`` (``sampler=langevin``, ``_partial_``): how ``sample`` runs.
    image_size, channels: data shape (from the dataset config); must match the net.
    sigma_min, sigma_max, num_scales: the geometric ladder σ_1 = σ_max > ... > σ_L = σ_min, L levels.
    time_scale: c(σ) = time_scale · log(σ/σ_min) / log(σ_max/σ_min), the net's time input (999:
        DDPM's step range, which the UNet's sinusoidal embedding is built for).
    bpd_steps, bpd_probes, bpd_images, bpd_stages, bpd_solver, bpd_tol: the ODE likelihood's settings
        (:meth:`genexp.models.ode_bpd.ODEBitsPerDim.set_bpd`).
    """

    def __init__(
        self,
        net: nn.Module,
        sampler: Callable,
        image_size: int,
        channels: int,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        num_scales: int = 100,
        time_scale: float = 999.0,
        bpd_steps: int = 32,
        bpd_probes: int = 2,
        bpd_images: int | None = 64,
        bpd_stages: tuple[str, ...] = ("test",),
        bpd_solver: str = "rk4",
        bpd_tol: float = 1e-5,
    ):
        super().__init__()
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.channels = check_int("channels", channels, minimum=1)
        self.ladder = SigmaLadder(sigma_min, sigma_max, num_scales)
        self.time_scale = check_float("time_scale", time_scale, positive=True, maximum=1e6)
        self.sampler = langevin_sampler(sampler, self.ladder)
        self.set_bpd(bpd_steps, bpd_probes, bpd_images, bpd_stages, bpd_solver, bpd_tol)
        self.net = net
        check_net_fits(net, self.channels, self.image_size)
        self.nfe_log: list[int] = []  # NFE of each sample() call (what genexp sample reports)

    @property
    def num_dims(self) -> int:
        return self.channels * self.image_size * self.image_size

    @property
    def nfe(self) -> int:
        """Network evaluations per sample of the configured sampler (L · T + denoise)."""
        return self.sampler.nfe

    def score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """s_θ(x, σ) = net(x, c(σ)) / σ: (B, C, H, W) in [−1, 1] coordinates, (B,) σ -> (B, C, H, W)."""
        c = self.time_scale * self.ladder.time_of(sigma)  # float64 steps: the embedding casts them
        out = upcast(self.net(x, c))
        return out / sigma.to(device=out.device, dtype=out.dtype).reshape(-1, *([1] * (x.dim() - 1)))

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> LossOutput:
        """Denoising score matching with λ(σ) = σ², σ uniform on the ladder (module docstring)."""
        x0 = x * 2 - 1  # (B, C, H, W) in [-1, 1]
        sigmas = self.ladder.sigmas
        i = torch.randint(0, len(sigmas), (x0.shape[0],), device=sigmas.device)
        sigma = sigmas[i]  # (B,) float64
        z = torch.randn_like(x0)
        x_tilde = x0 + sigma.to(x0.dtype).reshape(-1, 1, 1, 1) * z
        s = self.score(x_tilde, sigma)
        # ½ σ² ‖s + (x̃ − x)/σ²‖² = ½ ‖σ s + z‖²: written without dividing by σ² (1e-4 at σ_min)
        residual = sigma.to(s.dtype).reshape(-1, 1, 1, 1) * s + z.to(s.dtype)
        per_image = 0.5 * residual.pow(2).flatten(1).sum(1)  # (B,)
        loss = per_image.mean()
        with torch.no_grad():
            # ‖σ s + z‖² per dimension is DDPM's ε-MSE (ε_θ = −σ s): its low- and high-noise halves
            mse = residual.pow(2).flatten(1).mean(1)
            low = i >= len(sigmas) // 2  # the smaller half of the σ
            logs = {"mse": mse.mean()}
            if low.any():
                logs["mse_low_noise"] = mse[low].mean()
            if (~low).any():
                logs["mse_high_noise"] = mse[~low].mean()
        return LossOutput(loss, logs)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, C, H, W) images in [0, 1]: x ~ N(0, σ_max² I), then annealed Langevin dynamics."""
        weight = next(self.net.parameters())
        shape = (n, self.channels, self.image_size, self.image_size)
        x = self.ladder.sigma_max * noise_like(torch.empty(shape, device=weight.device), generator)
        x = self.sampler.sample(self.score, x, generator)
        self.nfe_log.append(self.sampler.nfe)
        return ((x + 1) / 2).clamp(0.0, 1.0)

    def velocity(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """dx/du = σ(t)² log(σ_max/σ_min) s_θ(x, σ(t)) at t = 1 − u: the VE probability-flow ODE
        from the prior (u = 0) to the data (u = 1), :mod:`genexp.diffusion.ode_likelihood`'s time."""
        sigma = self.ladder.sigma_at(1.0 - u.to(torch.float64))  # (B,) float64
        coef = (sigma**2 * self.ladder.log_ratio).to(device=x.device, dtype=x.dtype)
        return coef.reshape(-1, *([1] * (x.dim() - 1))) * self.score(x, sigma).to(x.dtype)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, σ_max² I) in nats per item, (B, ...) -> (B,): the ODE's noise end."""
        var = self.ladder.sigma_max**2
        return -0.5 * (x.pow(2) / var + math.log(2 * math.pi * var)).flatten(1).sum(1)

    def bpd_field(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The likelihood ODE's field: :meth:`velocity` (prior at u = 0, data at u = 1)."""
        return self.velocity(x, u)

    def bpd_prior(self, x0: torch.Tensor) -> torch.Tensor:
        """:meth:`prior_log_prob`, N(0, σ_max² I): the noise end."""
        return self.prior_log_prob(x0)
