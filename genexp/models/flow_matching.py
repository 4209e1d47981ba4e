"""Flow matching: a network regresses the velocity of a probability path from noise to data
(Lipman et al. 2023; rectified flow, Liu et al. 2022; minibatch OT-CFM, Tong et al. 2023).

Training pairs data x1 (images mapped to [−1, 1], as the diffusion families do) with noise
x0 ~ N(0, I) (independently or by the batch's optimal transport), draws t, and minimises the
conditional flow matching loss E ||v_θ(x_t, t) − u_t(x_t | x0, x1)||² (Lipman et al. 2023, eq. 9
and 14), whose minimiser is the marginal velocity. Sampling integrates dx/dt = v_θ(x, t) from
t = 0 (noise) to t = 1 (data) with the configured ODE solver (the ``solver/`` group); the NFE each
``sample`` call spent is kept in :attr:`FlowMatching.nfe_log`. ``nll_bpd`` is the exact likelihood
of the ODE's flow (the probability-flow change of variables, Hutchinson's trace estimate).
"""

from __future__ import annotations

import torch
from torch import nn

from genexp.diffusion.coupling import COUPLINGS
from genexp.diffusion.ode_likelihood import standard_normal_log_prob
from genexp.diffusion.ode_solvers import Field, ODEResult
from genexp.diffusion.paths import PATHS, TIME_SAMPLERS
from genexp.diffusion.samplers import noise_like
from genexp.errors import ConfigError, check_choice, check_float, check_int
from genexp.models.base import LossOutput, check_net_fits, upcast
from genexp.models.ode_bpd import ODEBitsPerDim


class FlowMatching(ODEBitsPerDim, nn.Module):
    """Args:
    net: the velocity network, ``(B, C, H, W), (B,) -> (B, C, H, W)`` (a UNet from ``net/``).
    solver: ``(field, x0, t0, t1) -> ODEResult`` (``solver/`` group): how ``sample`` integrates.
    image_size, channels: data shape (from the dataset config); must match the net.
    path: ``linear`` (rectified flow / OT path) or ``cosine`` (variance preserving).
    sigma_min: the linear path's end width σ_min (Lipman et al. 2023, eq. 22); 0: rectified flow.
    coupling: ``independent`` or ``minibatch_ot`` (exact OT within the batch, Tong et al. 2023).
    time_sampling: training times ``uniform`` or ``logit_normal`` (SD3, Esser et al. 2024).
    time_scale: t in [0, 1] enters the net as t · time_scale, so a UNet's sinusoidal embedding
        (built for DDPM's 0..999 steps) sees the same range of frequencies.
    bpd_steps, bpd_probes, bpd_images, bpd_stages, bpd_solver, bpd_tol: the ODE likelihood's settings
        (:meth:`genexp.models.ode_bpd.ODEBitsPerDim.set_bpd`).
    """

    def __init__(
        self,
        net: nn.Module,
        solver: object,
        image_size: int,
        channels: int,
        path: str = "linear",
        sigma_min: float = 0.0,
        coupling: str = "independent",
        time_sampling: str = "uniform",
        time_scale: float = 1000.0,
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
        self.path_name = check_choice("path", path, tuple(PATHS))
        sigma_min = check_float("sigma_min", sigma_min, minimum=0.0, maximum=1.0)
        if path != "linear" and sigma_min != 0.0:
            raise ConfigError("sigma_min", sigma_min, "applies to model.path=linear only; leave it 0")
        self.path = PATHS[path](sigma_min) if sigma_min else PATHS[path]()
        self.coupling = check_choice("coupling", coupling, tuple(COUPLINGS))
        self.time_sampling = check_choice("time_sampling", time_sampling, tuple(TIME_SAMPLERS))
        self.time_scale = check_float("time_scale", time_scale, positive=True, maximum=1e6)
        if not callable(solver):
            raise ConfigError(
                "solver", solver, "must be a config node with a _target_ (solver=euler|heun|...)"
            )
        self.solver = solver
        self.set_bpd(bpd_steps, bpd_probes, bpd_images, bpd_stages, bpd_solver, bpd_tol)
        self.net = net
        check_net_fits(net, self.channels, self.image_size)
        self.nfe_log: list[int] = []  # NFE of each sample() call (a dopri5 solve varies per batch)

    @property
    def num_dims(self) -> int:
        return self.channels * self.image_size * self.image_size

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v_θ(x, t): (B, C, H, W) in [−1, 1] coordinates, (B,) times in [0, 1] -> (B, C, H, W)."""
        return upcast(self.net(x, t * self.time_scale))

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> LossOutput:
        """The conditional flow matching loss on a batch of images in [0, 1]."""
        x1 = x * 2 - 1  # (B, C, H, W) in [-1, 1]
        x0 = COUPLINGS[self.coupling](torch.randn_like(x1), x1)
        t = TIME_SAMPLERS[self.time_sampling](x1.shape[0], x1)  # (B,)
        x_t = self.path.interpolate(x0, x1, t)
        v = self.velocity(x_t, t)
        target = self.path.target_velocity(x0, x1, t).to(v.dtype)
        mse = (v - target).pow(2).flatten(1).mean(1)  # (B,)
        loss = mse.mean()
        with torch.no_grad():
            late = t >= 0.5  # the MSE near the data and near the noise: which end the net has learnt
            logs = {"mse": loss.detach()}
            if late.any():
                logs["mse_near_data"] = mse[late].mean()
            if (~late).any():
                logs["mse_near_noise"] = mse[~late].mean()
        return LossOutput(loss, logs)

    def integrate(
        self, x: torch.Tensor, t0: float = 0.0, t1: float = 1.0, field: Field | None = None
    ) -> ODEResult:
        """The configured solver from t0 to t1 on ``field`` (the model's velocity by default)."""
        return self.solver(field or self.velocity, x, t0, t1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, C, H, W) images in [0, 1]: x0 ~ N(0, I) pushed to t = 1 by the solver."""
        weight = next(self.net.parameters())
        shape = (n, self.channels, self.image_size, self.image_size)
        x0 = noise_like(torch.empty(shape, device=weight.device, dtype=torch.float32), generator)
        result = self.integrate(x0)
        self.nfe_log.append(result.nfe)
        return ((result.x + 1) / 2).clamp(0.0, 1.0)

    def bpd_field(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The likelihood ODE's field: the velocity itself (noise at t = 0, data at t = 1)."""
        return self.velocity(x, u)

    def bpd_prior(self, x0: torch.Tensor) -> torch.Tensor:
        """log N(x0; 0, I) in nats per item: the noise end."""
        return standard_normal_log_prob(x0)
