"""DDPM: denoising diffusion on images in [−1, 1] (Ho et al. 2020; talk section 3.4).

Training draws t, noises x0 in closed form, q(x_t|x0) = N(√ᾱ_t x0, (1−ᾱ_t) I), and regresses the
network's prediction (ε by default) with an MSE. Sampling runs the configured sampler (DDPM's
ancestral chain or DDIM) from pure noise; ``nll_bpd`` is the variational bound in bits/dim
(``likelihood=bound``) or the probability-flow ODE's likelihood of the uniformly dequantised images
(``likelihood=ode``, Song et al. 2021, section 4.3; :mod:`genexp.diffusion.probability_flow`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from genexp.diffusion.gaussian_diffusion import GaussianDiffusion
from genexp.diffusion.noise_schedule import NoiseSchedule
from genexp.diffusion.probability_flow import ProbabilityFlow, ode_bpd
from genexp.errors import check_choice, check_int
from genexp.models.base import LossOutput, check_net_fits

BPD_STAGES = ("val", "test")
LIKELIHOODS = ("bound", "ode")


class DDPM(nn.Module):
    """Args:
    net: the denoiser, ``(B, C, H, W), (B,) -> (B, C, H, W)`` (a UNet from ``net/``).
    schedule: the noise schedule (``schedule/`` group).
    sampler: ``schedule -> sampler`` (``sampler/`` group, ``_partial_``): how ``sample`` runs.
    image_size, channels: data shape (from the dataset config); must match the net.
    objective, loss_weighting, min_snr_gamma: see :class:`GaussianDiffusion`.
    bpd_timesteps: timesteps K evaluated for the bits/dim bound (T: exact; fewer: an estimate).
    bpd_images: at most this many images per val/test epoch get the bound (it costs K forward
        passes per image); null: all.
    bpd_stages: stages that compute the bound (``[test]`` by default: validation tracks the loss).
    likelihood: what ``nll_bpd`` reports: ``bound`` (the variational bound, an upper bound on the
        8-bit data's bits/dim) or ``ode`` (the probability-flow ODE's exact likelihood of the
        dequantised images, an estimate by Hutchinson's trace; also an upper bound in expectation).
    ode_steps: RK4 steps of the ODE (4 network passes each, on ``ode_probes`` copies of the batch).
    ode_probes: Rademacher probes per image (2 or more give a standard error).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        sampler: Callable,
        image_size: int,
        channels: int,
        objective: str = "eps",
        loss_weighting: str = "simple",
        min_snr_gamma: float = 5.0,
        bpd_timesteps: int = 100,
        bpd_images: int | None = 256,
        bpd_stages: tuple[str, ...] = ("test",),
        likelihood: str = "bound",
        ode_steps: int = 32,
        ode_probes: int = 2,
    ):
        super().__init__()
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.channels = check_int("channels", channels, minimum=1)
        self.bpd_timesteps = check_int("bpd_timesteps", bpd_timesteps, minimum=2)
        self.bpd_images = None if bpd_images is None else check_int("bpd_images", bpd_images, minimum=1)
        self.bpd_stages = tuple(check_choice("bpd_stages", s, BPD_STAGES) for s in bpd_stages)
        self.likelihood = check_choice("likelihood", likelihood, LIKELIHOODS)
        self.ode_steps = check_int("ode_steps", ode_steps, minimum=1)
        self.ode_probes = check_int("ode_probes", ode_probes, minimum=1)
        self.diffusion = GaussianDiffusion(net, schedule, sampler, objective, loss_weighting, min_snr_gamma)
        check_net_fits(net, self.channels, self.image_size)

    @property
    def num_dims(self) -> int:
        return self.channels * self.image_size * self.image_size

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> LossOutput:
        loss, logs = self.diffusion.training_loss(x * 2 - 1)  # (B, C, H, W) in [-1, 1]
        return LossOutput(loss, logs)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, C, H, W) images in [0, 1] from the configured sampler."""
        x = self.diffusion.sample((n, self.channels, self.image_size, self.image_size), generator)
        return ((x + 1) / 2).clamp(0.0, 1.0)

    @torch.no_grad()
    def nll_bpd(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bits/dim of the 8-bit images x per image, (B,): the variational bound (an upper bound;
        its noise comes from the global generator, as before ``likelihood`` existed) or the ODE's."""
        if self.likelihood == "ode":
            return self.ode_bpd(x, generator)[0]
        return self.diffusion.bound_bpd(x * 2 - 1, self.bpd_timesteps)

    def bpd_cost(self) -> str:
        """What one image's bits/dim costs, for the log line before the test epoch."""
        if self.likelihood == "ode":
            passes = 4 * self.ode_steps * self.ode_probes
            return f"the probability-flow ODE (RK4, {self.ode_steps} steps x {self.ode_probes} probes): {passes} network+backward passes per image"
        k = min(self.bpd_timesteps, self.diffusion.schedule.timesteps)
        return f"the variational bound over {k} of {self.diffusion.schedule.timesteps} timesteps: {k} network passes per image"

    @torch.no_grad()
    def nll_bpd_with_error(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`nll_bpd` and, for ``likelihood=ode``, Hutchinson's standard error per image; None
        for the bound (one draw of x_t per term, whose spread is not estimated)."""
        if self.likelihood == "ode":
            return self.ode_bpd(x, generator)
        return self.nll_bpd(x, generator), None

    @torch.no_grad()
    def ode_bpd(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The probability-flow ODE's bits/dim and Hutchinson's standard error of it, both (B,)."""
        d = self.diffusion
        flow = ProbabilityFlow(d.net, d.schedule, d.objective)
        bpd, std_err, _ = ode_bpd(flow, x, self.ode_steps, self.ode_probes, generator=generator)
        return bpd, std_err
