"""Decoder likelihoods p(x | z) for images in [0, 1] that hold 8-bit values k / 255.

Each likelihood says how many output channels it needs per image channel, gives the training
log-likelihood, a proper log-probability mass over the 256 levels (for bits/dim), and the mean
image used for sample and reconstruction grids. Tensors are (B, C*params, H, W) -> (B, C, H, W).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LEVELS = 255  # 8-bit data: x = k / 255, k in {0, ..., 255}


class Bernoulli:
    """Bernoulli decoder on intensities (binary cross-entropy against x in [0, 1]).

    Trained as usual with BCE. For bits/dim we need a pmf over the 256 levels: with k = 255 x,
    log Binomial(k; 255, mu) = log C(255, k) - 255 * BCE(mu, x), so the same decoder *is* a
    Binomial(255, mu) distribution over 8-bit values, which gives an honest bound.
    """

    params_per_channel = 1

    def log_prob(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none")

    def log_pmf(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k = torch.round(x * LEVELS)
        n = torch.tensor(float(LEVELS), dtype=logits.dtype, device=logits.device)
        log_binom = torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
        # log mu = -softplus(-l), log(1 - mu) = -softplus(l): stable for large |logits|
        return log_binom - k * F.softplus(-logits) - (n - k) * F.softplus(logits)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)


class DiscretizedLogistic:
    """Discretised logistic over the 256 levels (Salimans et al. 2017, PixelCNN++, one component).

    The decoder predicts a mean and a log-scale per sub-pixel on the [-1, 1] scale; each level owns
    a bin of width 2/255, the two end bins extend to -inf / +inf so the pmf sums to one.
    """

    params_per_channel = 2
    min_log_scale = -7.0

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_s = out.chunk(2, dim=1)  # (B, C, H, W) each
        return mu, log_s.clamp(min=self.min_log_scale)

    def log_pmf(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mu, log_s = self._split(out)
        x = 2.0 * x - 1.0  # [0, 1] -> [-1, 1]
        centered = x - mu
        inv_s = torch.exp(-log_s)
        plus_in = inv_s * (centered + 1.0 / LEVELS)
        min_in = inv_s * (centered - 1.0 / LEVELS)
        log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): bin of level 0
        log_one_minus_cdf_min = -F.softplus(min_in)  # log(1 - sigmoid(min_in)): bin of level 255
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        mid_in = inv_s * centered
        # where the bin mass underflows, use the density at the bin centre times the width 2/255
        log_pdf_mid = mid_in - log_s - 2.0 * F.softplus(mid_in) - math.log(LEVELS / 2.0)
        log_delta = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
        return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))

    def log_prob(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.log_pmf(out, x)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        mu, _ = self._split(out)
        return ((mu + 1.0) / 2.0).clamp(0.0, 1.0)


LIKELIHOODS = {"bernoulli": Bernoulli, "discretized_logistic": DiscretizedLogistic}
