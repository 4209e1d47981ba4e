"""A flow as a density over 8-bit images: dequantise, logit, flow, standard-normal base.

For an image of integer levels k in {0, ..., 255}^D (the data hold x = k / 255), D = C*H*W:

    v = k + U,  U ~ Uniform[0, 1)^D                    uniform dequantisation (Theis et al. 2016)
    u = v / 256                                        in [0, 1);     log |det| = -D log 256
    p = alpha + (1 - 2 alpha) u                        away from 0, 1
    y = logit(p) = log p - log(1 - p)                  log |det| = sum_i log(1 - 2 alpha) - log p_i - log(1 - p_i)
    z = f(y) ~ N(0, I)                                 the flow;      log |det| = sum of its layers' log-dets

    log p(v) = log N(z; 0, I) + log |det dz/dy| + log |det dy/du| - D log 256
    bpd(x)   = -log p(v) / (D ln 2)

p(v) is a density over [0, 256)^D, so P(k) = integral of p(k + U) dU >= exp E_U log p(k + U) (Jensen):
E_U bpd is an upper bound on the bits/dim of the discrete 8-bit data, the number published for
RealNVP and Glow; one draw of U is an unbiased estimate of it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from genexp.errors import ConfigError, check_float, check_int
from genexp.flows.multiscale import MultiScaleFlow
from genexp.metrics.bpd import nats_to_bpd
from genexp.models.base import LossOutput

LEVELS = 256  # 8-bit data


class Logit(nn.Module):
    """u in [0, 1) -> logit(alpha + (1 - 2 alpha) u): the pre-transform to an unbounded space.

    Without it the flow would have to put its mass inside the unit cube; alpha keeps the logit
    finite at u = 0 (Dinh et al. 2017, 4.1, with a symmetric margin).
    """

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        self.alpha = alpha

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.alpha + (1 - 2 * self.alpha) * u
        y = torch.log(p) - torch.log1p(-p)
        log_det = (math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
        return y, log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)


def check_alpha(alpha) -> float:
    alpha = check_float("alpha", alpha)
    if not 0 < alpha < 0.5:
        raise ConfigError("alpha", alpha, "must be in (0, 0.5): logit(alpha + (1 - 2 alpha) u)")
    return alpha


def check_squeezable(image_size: int, squeezes: int, n_scales: int, family: str) -> None:
    """A squeeze halves H and W, so the image size must be divisible by 2**squeezes.

    More squeezes than ``image_size`` has bits is refused before 2**squeezes is computed: with
    ``n_scales=2**62`` that power alone would take all memory."""
    if squeezes >= image_size.bit_length():
        raise ConfigError(
            "n_scales",
            n_scales,
            f"{family} squeezes {squeezes} time(s), but image_size={image_size} halves at most "
            f"{max(image_size.bit_length() - 1, 0)} times; lower model.n_scales",
        )
    if image_size % 2**squeezes:
        raise ConfigError(
            "image_size",
            image_size,
            f"{family} with n_scales={n_scales} squeezes {squeezes} time(s), so image_size must be a "
            f"multiple of {2**squeezes}; lower model.n_scales or resize (dataset.image_size)",
        )


class DequantizedFlow(nn.Module):
    """The family contract for a flow on 8-bit images; subclasses build ``self.flow``.

    ``forward(u) -> (z, log_det)`` and ``inverse(z) -> u`` are the whole bijection from the
    dequantised image u in [0, 1)^(C, H, W) to z in R^D (logit and flow), so the model is itself a
    flow layer and the layer tests apply to it.

    Args:
        image_size, channels: data shape.
        alpha: margin of the logit pre-transform.
    """

    flow: MultiScaleFlow

    def __init__(self, image_size: int, channels: int, alpha: float = 0.05):
        super().__init__()
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.channels = check_int("channels", channels, minimum=1)
        self.logit = Logit(check_alpha(alpha))

    @property
    def num_dims(self) -> int:
        return self.channels * self.image_size * self.image_size

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) in [0, 1) -> z (B, D) and log |det dz/du| (B,)."""
        y, ld_logit = self.logit(u)
        z, ld_flow = self.flow(y)
        return z, ld_logit + ld_flow

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) -> u (B, C, H, W)."""
        return self.logit.inverse(self.flow.inverse(z))

    def _terms(self, x: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None):
        """log N(z) and log |det dz/dv| in nats per image, for v = 255 x + noise, both (B,)."""
        if noise is None:
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        u = (torch.round(x * (LEVELS - 1)) + noise) / LEVELS  # (B, C, H, W) in [0, 1)
        z, log_det = self(u)
        log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)
        return log_pz, log_det - self.num_dims * math.log(LEVELS)

    def log_prob(
        self, x: torch.Tensor, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """log p(255 x + noise) in nats per image: (B, C, H, W) -> (B,).

        Args:
            x: 8-bit images in [0, 1].
            noise: the dequantisation offsets in [0, 1), like x (default: uniform draws).
        """
        log_pz, log_det = self._terms(x, noise, generator)
        return log_pz + log_det

    @torch.no_grad()
    def nll_bpd(
        self, x: torch.Tensor, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Bits/dim of the dequantised 8-bit images (see the module docstring): (B, C, H, W) -> (B,)."""
        return nats_to_bpd(-self.log_prob(x, noise, generator), self.num_dims)

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> LossOutput:
        """Exact -log p in bits/dim (scale-free across image sizes), one dequantisation draw."""
        log_pz, log_det = self._terms(x, None, None)
        bpd = nats_to_bpd(-(log_pz + log_det), self.num_dims)
        with torch.no_grad():
            logs = {
                "bpd": bpd.mean(),
                "prior_bpd": nats_to_bpd(-log_pz, self.num_dims).mean(),  # -log N(z)
                "log_det_bpd": nats_to_bpd(log_det, self.num_dims).mean(),  # bpd = prior - log_det
            }
        return LossOutput(bpd.mean(), logs)

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """(n, C, H, W) 8-bit images in [0, 1] from z ~ N(0, temperature^2 I).

        The inverse of the dequantisation is the floor: a sample's level is the bin its u falls in.
        """
        temperature = check_float("temperature", temperature, minimum=0.0)
        ref = next(self.parameters())
        z = torch.randn(n, self.num_dims, generator=generator, device=ref.device, dtype=ref.dtype)
        u = self.inverse(z * temperature)
        return torch.floor(u * LEVELS).clamp(0, LEVELS - 1) / (LEVELS - 1)
