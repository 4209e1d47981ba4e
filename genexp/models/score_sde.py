"""Score SDEs: a network learns the score of a continuous-time diffusion (Song et al. 2021, "Score-Based
Generative Modeling through Stochastic Differential Equations"; talk section 3.4, SBM).

A forward SDE (``sde/``: VE, VP, sub-VP; :mod:`genexp.diffusion.sde`) carries images in [−1, 1]
at t = 0 to a Gaussian prior at t = 1, with Gaussian marginals p_0t(x_t | x_0) = N(m_t x_0, σ_t² I).
The score network s_θ(x, t) = −ε_θ(x, t) / σ_t is the UNet of ``net/`` predicting the noise (t in
[ε, 1] enters its embedding as t · ``time_scale``, DDPM's step range). Training minimises the
continuous denoising score matching objective (Song et al. 2021, eq. 7) with λ(t) = σ_t²,

    E_t E_{x0, z} λ(t) ||s_θ(x_t, t) − ∇ log p_0t(x_t | x_0)||²,  x_t = m_t x_0 + σ_t z,
    ∇ log p_0t = −z / σ_t,  so  λ(t) ||s_θ + z / σ_t||² = ||ε_θ(x_t, t) − z||²,

DDPM's simple loss (Ho et al. 2020, eq. 14): the talk's "the training objective is the same". Here
t ~ U[ε, 1] and the squared norm is averaged over dimensions (DDPM's ``mse``).

Sampling (``sample_with``): ``sde`` runs the predictor-corrector sampler (``sampler=pc``,
:mod:`genexp.diffusion.pc`) on the reverse SDE; ``ode`` integrates the probability-flow ODE (eq. 13)
with the ``solver/`` group, which also gives the exact likelihood (``nll_bpd``, as flow matching's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from genexp.diffusion.ode_solvers import ODEResult
from genexp.diffusion.pc import ContinuousTime, PCSampler
from genexp.diffusion.sde import SDE, per_row
from genexp.errors import ConfigError, check_choice, check_float, check_int
from genexp.models.base import LossOutput, check_net_fits, upcast
from genexp.models.ode_bpd import ODEBitsPerDim

SAMPLE_WITH = ("sde", "ode")


def _pc_only(sampler: Callable) -> None:
    """A sampler/ node other than pc (langevin, ddim, ...) cannot sample a continuous-time SDE."""
    func = getattr(sampler, "func", sampler)
    if not (isinstance(func, type) and issubclass(func, PCSampler)):
        name = getattr(func, "__name__", type(func).__name__)
        raise ConfigError(
            "sampler", name, "score_sde samples its reverse SDE with sampler=pc (or model.sample_with=ode)"
        )


class ScoreSDE(ODEBitsPerDim, nn.Module):
    """Args:
    net: the noise predictor ε_θ, ``(B, C, H, W), (B,) -> (B, C, H, W)`` (a UNet from ``net/``).
    sde: the forward SDE (``sde/`` group): VE, VP or sub-VP.
    sampler: ``ContinuousTime -> PCSampler`` (``sampler=pc``, ``_partial_``): the reverse-SDE sampler.
    solver: ``(field, x0, t0, t1) -> ODEResult`` (``solver/`` group): the probability-flow ODE's.
    image_size, channels: data shape (from the dataset config); must match the net.
    sample_with: ``sde`` (the PC sampler) or ``ode`` (the probability flow through ``solver``).
    eps: the smallest time ε (training draws t ~ U[ε, 1], sampling ends at ε); null: the SDE's
        own (VE 1e-5, VP and sub-VP 1e-3, as Song et al. 2021).
    time_scale: t enters the net's embedding as t · time_scale (999: DDPM's 0..999 steps).
    bpd_steps, bpd_probes, bpd_images, bpd_stages, bpd_solver, bpd_tol: the ODE likelihood's settings
        (:meth:`genexp.models.ode_bpd.ODEBitsPerDim.set_bpd`).
    """

    def __init__(
        self,
        net: nn.Module,
        sde: SDE,
        sampler: Callable,
        solver: Callable,
        image_size: int,
        channels: int,
        sample_with: str = "sde",
        eps: float | None = None,
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
        if not isinstance(sde, SDE):
            raise ConfigError("sde", sde, "must be a config node with a _target_ (sde=ve|vp|subvp)")
        self.sde = sde
        self.sample_with = check_choice("sample_with", sample_with, SAMPLE_WITH)
        eps = sde.default_eps if eps is None else eps
        self.eps = check_float("eps", eps, positive=True, maximum=0.5)
        self.time_scale = check_float("time_scale", time_scale, positive=True, maximum=1e6)
        if not callable(solver):
            raise ConfigError(
                "solver", solver, "must be a config node with a _target_ (solver=euler|heun|...)"
            )
        self.solver = solver
        _pc_only(sampler)
        try:
            self.sampler = sampler(ContinuousTime(sde, self.eps))
        except ConfigError as err:
            raise ConfigError(f"sampler.{err.key}", err.value, err.message) from None
        self.set_bpd(bpd_steps, bpd_probes, bpd_images, bpd_stages, bpd_solver, bpd_tol)
        self.net = net
        check_net_fits(net, self.channels, self.image_size)
        self.nfe_log: list[int] = []  # NFE of each sample() call (PC: steps (1 + corrector_steps))

    @property
    def num_dims(self) -> int:
        return self.channels * self.image_size * self.image_size

    def predict_eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε_θ(x, t): (B, C, H, W) in [−1, 1] coordinates, (B,) times in [ε, 1] -> (B, C, H, W)."""
        return upcast(self.net(x, t * self.time_scale))

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s_θ(x, t) = −ε_θ(x, t) / σ_t ≈ ∇ₓ log p_t(x), (B, C, H, W)."""
        eps = self.predict_eps(x, t)
        return -eps / per_row(self.sde.std(t), eps)

    def dsm(self, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """λ(t) ||s_θ(x_t, t) − ∇ log p_0t(x_t | x0)||² / D with λ = σ_t², per item (B,): the
        integrand of eq. 7, which is ||ε_θ(x_t, t) − z||² / D (the module docstring)."""
        mean, std = self.sde.marginal_prob(x0, t)
        x_t = mean + per_row(std, x0) * z
        eps = self.predict_eps(x_t, t)
        return (eps - z.to(eps.dtype)).pow(2).flatten(1).mean(1)

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> LossOutput:
        """Continuous DSM on a batch of images in [0, 1] at t ~ U[ε, 1]."""
        x0 = x * 2 - 1  # (B, C, H, W) in [-1, 1]
        t = self.eps + (1 - self.eps) * torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype)
        mse = self.dsm(x0, t, torch.randn_like(x0))
        loss = mse.mean()
        with torch.no_grad():
            late = t >= 0.5  # the MSE near the prior and near the data: which end the net has learnt
            logs = {"mse": loss.detach()}
            if (~late).any():
                logs["mse_near_data"] = mse[~late].mean()
            if late.any():
                logs["mse_near_noise"] = mse[late].mean()
        return LossOutput(loss, logs)

    def ode_velocity(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The probability-flow field (eq. 13) in the solvers' time u in [0, 1], from the prior
        (u = 0, t = 1) to the data end (u = 1, t = ε), on the SDE's grid
        :meth:`~genexp.diffusion.sde.SDE.ode_time` (about uniform in log σ_t, where the flow bends):
        dx/du = (f − g² s / 2)(x, t(u)) · dt/du. The sampler's solver and the likelihood ODE share it
        (on a trained mnist5k VP run, Heun at NFE 16 / 64: FID 216 / 355 this way, 392 / 464
        uniform in t)."""
        u = torch.as_tensor(u, dtype=x.dtype, device=x.device)
        t, dt_du = self.sde.ode_time(u, self.eps)  # u: (B,), as the solvers and the likelihood give it
        drift = self.sde.ode_drift(x, t, self.score(x, t).to(x.dtype))
        return per_row(dt_du, x) * drift

    def integrate(self, x: torch.Tensor) -> ODEResult:
        """The configured solver from the prior (u = 0, t = 1) to the data end (u = 1, t = ε)."""
        return self.solver(self.ode_velocity, x, 0.0, 1.0)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, C, H, W) images in [0, 1]: x(1) from the prior, taken to t = ε by PC or the ODE."""
        weight = next(self.net.parameters())
        shape = (n, self.channels, self.image_size, self.image_size)
        x_T = self.sde.prior_sample(shape, torch.empty((), device=weight.device), generator)
        if self.sample_with == "ode":
            result = self.integrate(x_T)
            x, nfe = result.x, result.nfe
        else:
            x, nfe = self.sampler.sample(self.predict_eps, x_T, generator), self.sampler.nfe
        self.nfe_log.append(nfe)
        return ((x + 1) / 2).clamp(0.0, 1.0)

    def bpd_field(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The likelihood ODE's field: the probability flow :meth:`ode_velocity` (Song et al. 2021,
        section 4.3 and appendix D.2) from the SDE's prior at t = 1 (u = 0) to t = ε (u = 1); the
        density is that of x(ε), the data convolved with N(0, σ_ε²) (σ_ε ≈ 0.01 for VP's ε = 1e-3)."""
        return self.ode_velocity(x, u)

    def bpd_prior(self, x0: torch.Tensor) -> torch.Tensor:
        """The SDE's prior log-density at t = 1."""
        return self.sde.prior_log_prob(x0)
