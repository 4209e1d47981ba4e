"""The forward process q(x_t | x_0) and the closed forms derived from it (Ho et al. 2020, section 2).

Timestep indices ``t`` are LongTensors (B,) of 0-based steps 0..T-1: index 0 is the paper's t = 1.
Tensors ``x`` may have any rank with the batch first: images (B, C, H, W) or flat latents (B, D).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from genexp.errors import ConfigError, check_int


class Gaussian(NamedTuple):
    """A diagonal Gaussian: ``var`` and ``log_var`` are (B, 1, ..., 1) and broadcast against ``mean``."""

    mean: torch.Tensor
    var: torch.Tensor
    log_var: torch.Tensor


class NoiseSchedule(nn.Module):
    """Betas and every quantity of the forward process derived from them (Ho et al. 2020, eqs. 4-7).

    Args:
        betas: a function ``timesteps -> betas`` (T,) from :mod:`genexp.diffusion.schedules`, given
            as a Hydra partial; called here with ``timesteps``.
        timesteps: T, the number of diffusion steps.

    The buffers are computed and kept in float64: in float32, 1 - abar_t loses most of its digits
    near t = 0 and sqrt(1 / abar_t) near t = T. :meth:`extract` casts what it gathers to the dtype
    of the tensor it is used with. The buffers move with ``.to(device)`` but keep float64 through
    ``.half()`` / ``.to(dtype)`` (see :meth:`_apply`), and they are not saved in ``state_dict``:
    they are derived from the config, which rebuilds them.
    """

    def __init__(self, betas: Callable[[int], torch.Tensor], timesteps: int = 1000):
        super().__init__()
        # T = 1 leaves no step between x_1 and the data: the bound's sum over t > 1 is empty and a
        # one-step sampler cannot undo the noise
        timesteps = check_int("timesteps", timesteps, minimum=2)
        if not callable(betas):
            raise ConfigError("betas", betas, "must be a schedule function timesteps -> betas")
        try:
            b = torch.as_tensor(betas(timesteps)).to(torch.float64)  # (T,)
        except ConfigError as err:  # the schedule function's own argument: name it under betas.
            raise ConfigError(f"betas.{err.key}", err.value, err.message) from None
        if b.shape != (timesteps,):
            raise ConfigError("betas", betas, f"returned shape {tuple(b.shape)}, expected ({timesteps},)")
        if not bool(torch.isfinite(b).all() and (b > 0).all() and (b < 1).all()):
            raise ConfigError("betas", betas, "every beta must lie in (0, 1)")

        # abar_t and 1 - abar_t from log(1 - beta) sums: 1 - cumprod(1 - beta) cancels catastrophically
        # for small t, while -expm1(sum log1p(-beta)) keeps full relative precision (so that, e.g.,
        # posterior_mean_coef1 at t = 0 is 1 to the last bit).
        log_alphas_cumprod = torch.cumsum(torch.log1p(-b), dim=0)
        alphas_cumprod = torch.exp(log_alphas_cumprod)
        one_minus_alphas_cumprod = -torch.expm1(log_alphas_cumprod)
        alphas_cumprod_prev = torch.cat([b.new_ones(1), alphas_cumprod[:-1]])  # abar_0 = 1
        one_minus_alphas_cumprod_prev = torch.cat([b.new_zeros(1), one_minus_alphas_cumprod[:-1]])

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t) (Ho et al. 2020, eqs. 6-7)
        posterior_variance = b * one_minus_alphas_cumprod_prev / one_minus_alphas_cumprod
        # beta_tilde at t = 0 is 0 (x_0 is known); its log is clipped to beta_tilde at t = 1 so the
        # decoder's Gaussian keeps a finite width (Nichol & Dhariwal 2021's log_variance_clipped).
        first = posterior_variance[1:2] if timesteps > 1 else b[:1]
        posterior_log_variance_clipped = torch.log(torch.cat([first, posterior_variance[1:]]))
        # sigma_t^2 = beta_t, the other fixed choice of Ho et al. 2020 (section 3.2); the same clip at
        # t = 0 (improved DDPM's "fixedlarge").
        fixed_large_log_variance = torch.log(torch.cat([first, b[1:]]))

        posterior_mean_coef2 = one_minus_alphas_cumprod_prev * torch.sqrt(1.0 - b) / one_minus_alphas_cumprod

        buffers = {
            "betas": b,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": one_minus_alphas_cumprod.sqrt(),
            "log_one_minus_alphas_cumprod": torch.log(one_minus_alphas_cumprod),
            "sqrt_recip_alphas_cumprod": torch.exp(-0.5 * log_alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": (one_minus_alphas_cumprod / alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "fixed_large_log_variance": fixed_large_log_variance,
            "posterior_mean_coef1": b * alphas_cumprod_prev.sqrt() / one_minus_alphas_cumprod,
            "posterior_mean_coef2": posterior_mean_coef2,
            "snr": alphas_cumprod / one_minus_alphas_cumprod,
        }
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    @property
    def timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.shape[0]

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}"

    def _apply(self, fn, recurse=True):
        """Move buffers to a new device but keep them float64 (``.half()``, ``.to(torch.bfloat16)``,
        Lightning's ``bf16-true``): the schedule's precision is what keeps sampling accurate."""
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    @staticmethod
    def extract(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """a[t] for a buffer a (T,) and t (B,), as (B, 1, ..., 1) in x's dtype, to broadcast against x.

        A fractional t (a continuous-time sampler such as Heun on the EDM sigma grid queries the model
        between timesteps) reads a linearly between its two neighbouring timesteps."""
        t = t.to(a.device)
        if t.dtype.is_floating_point:
            lo = t.floor().long().clamp(0, a.shape[0] - 2)
            w = (t - lo).to(a.dtype)
            out = (a[lo] * (1 - w) + a[lo + 1] * w).to(device=x.device, dtype=x.dtype)
        else:
            out = a[t].to(device=x.device, dtype=x.dtype)
        return out.reshape(t.shape[0], *([1] * (x.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4)."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> Gaussian:
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, eq. 4)."""
        mean = self.extract(self.sqrt_alphas_cumprod, t, x0) * x0
        var = self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0) ** 2
        return Gaussian(mean, var, self.extract(self.log_one_minus_alphas_cumprod, t, x0))

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> Gaussian:
        """q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I) (Ho et al. 2020, eqs. 6-7).

        ``log_var`` is clipped at t = 0 (see ``posterior_log_variance_clipped``); ``var`` is not.
        """
        mean = (
            self.extract(self.posterior_mean_coef1, t, x_t) * x0
            + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        var = self.extract(self.posterior_variance, t, x_t)
        return Gaussian(mean, var, self.extract(self.posterior_log_variance_clipped, t, x_t))

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), eq. 4 solved for x_0 (Ho et al. 2020)."""
        return (
            self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1), eq. 4 solved for eps (Ho et al. 2020)."""
        return (self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self.extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, section 4)."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x0) * eps
            - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def predict_x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022, appendix D)."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def predict_eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v (Salimans & Ho 2022, appendix D)."""
        return (
            self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
            + self.extract(self.sqrt_alphas_cumprod, t, x_t) * v
        )

    def snr_at(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t), shape (B,), float64 like the buffers (Kingma et al. 2021)."""
        return self.snr[t.to(self.snr.device)]
