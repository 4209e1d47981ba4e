"""What the autoregressive family shares: output heads over the 256 levels and exact bits/dim.

An autoregressive model factorises the probability of the 8-bit levels k in {0..255}^D (the data
hold x = k / 255, D = C*H*W) along a fixed order, log P(k) = sum_i log P(k_i | k_<i), so its
likelihood is exact, with no dequantisation and no bound:

    bpd(x) = -log P(k) / (D ln 2)

the quantity that the flows' dequantised density bounds from above and the VAE/DDPM bounds bound,
so all of them share one column. An untrained model with uniform outputs has P(k_i | .) = 1/256,
i.e. exactly 8 bits/dim.

Heads turn a network's per-pixel parameters (N, P) into log P of the pixel's levels (N, C) and
draw levels from them:

- :class:`Categorical`: a 256-way softmax per sub-pixel (P = 256*C, channel-major). Temperature
  T divides the logits (T = 0: the argmax).
- :class:`LogisticMixture`: PixelCNN++'s discretised mixture of logistics (Salimans et al. 2017),
  M components shared by the channels of a pixel, with the paper's linear channel dependence:
  the mean of channel c is mu_c + sum_{j<c} a_cj * x_j (a = tanh(.), x_j the pixel's own earlier
  channels on [-1, 1]), so one network pass gives the whole pixel (P = M * (1 + 2C + C(C-1)/2)).
  Level k owns the bin [x_k - 1/255, x_k + 1/255] of x_k = 2k/255 - 1, the end bins reach +-inf.
  Temperature T divides the mixture logits and multiplies the logistic scales.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from genexp.errors import check_choice, check_float, check_int
from genexp.models.base import LossOutput, upcast
from genexp.models.likelihoods import DiscretizedLogistic

LEVELS = 256  # 8-bit sub-pixels: k in {0, ..., 255}, x = k / 255
HEADS = ("categorical", "logistic_mixture")


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] holding k / 255 -> int64 levels k."""
    return torch.round(x * (LEVELS - 1)).clamp(0, LEVELS - 1).long()


def to_images(k: torch.Tensor) -> torch.Tensor:
    """Levels k -> float images k / 255."""
    return k.float() / (LEVELS - 1)


def check_temperature(temperature) -> float:
    return check_float("temperature", temperature, minimum=0.0)


def sample_levels(
    logits: torch.Tensor, generator: torch.Generator | None, temperature: float
) -> torch.Tensor:
    """(N, 256) logits -> (N,) levels from softmax(logits / T) (T = 0: the argmax), with ``generator``."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(upcast(logits) / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Categorical:
    """256-way softmax per sub-pixel: params (N, C*256), channel-major."""

    joint_channels = False  # the logits of channel c may depend on channels < c of the same pixel

    def __init__(self, channels: int):
        self.channels = channels
        self.num_params = channels * LEVELS

    def param_groups(self) -> torch.Tensor:
        """(P,) the channel whose sub-pixel each parameter describes (for channel-masked networks)."""
        return torch.arange(self.channels).repeat_interleave(LEVELS)

    def logits(self, params: torch.Tensor) -> torch.Tensor:
        return upcast(params).unflatten(-1, (self.channels, LEVELS))  # (N, C, 256)

    def log_prob(self, params: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(N, P) params, (N, C) levels -> (N,) log P(k) in nats, summed over the channels."""
        log_p = torch.log_softmax(self.logits(params), dim=-1)
        return log_p.gather(-1, k[..., None]).squeeze(-1).sum(-1)

    def sample(
        self, params: torch.Tensor, generator: torch.Generator | None, temperature: float
    ) -> torch.Tensor:
        """(N, P) -> (N, C) levels, every channel from its own logits."""
        logits = self.logits(params)
        n = logits.shape[0]
        return sample_levels(logits.flatten(0, 1), generator, temperature).view(n, self.channels)


class LogisticMixture:
    """PixelCNN++'s discretised logistic mixture with linear channel dependence (module docstring)."""

    joint_channels = True  # one set of parameters per pixel; channels are coupled inside the head
    min_log_scale = DiscretizedLogistic.min_log_scale  # -7, PixelCNN++'s

    def __init__(self, channels: int, n_components: int):
        self.channels = channels
        self.n_components = n_components
        self.num_pairs = channels * (channels - 1) // 2
        self.num_params = n_components * (1 + 2 * channels + self.num_pairs)
        self._bins = DiscretizedLogistic()

    def param_groups(self) -> torch.Tensor:
        return torch.zeros(self.num_params, dtype=torch.long)

    def split(self, params: torch.Tensor):
        """(N, P) -> mixture logits (N, M), means (N, M, C), log-scales (N, M, C), coefficients (N, M, pairs)."""
        m, c = self.n_components, self.channels
        params = upcast(params)
        logit_pi, mu, log_s, coeff = params.split([m, m * c, m * c, m * self.num_pairs], dim=-1)
        mu = mu.unflatten(-1, (m, c))
        log_s = log_s.unflatten(-1, (m, c)).clamp(min=self.min_log_scale)
        return logit_pi, mu, log_s, torch.tanh(coeff.unflatten(-1, (m, self.num_pairs)))

    def coupled_mean(self, mu: torch.Tensor, coeff: torch.Tensor, x: torch.Tensor, c: int) -> torch.Tensor:
        """Mean of channel c: mu[..., c] + sum_{j<c} coeff[..., (c, j)] * x[..., j] (x on [-1, 1])."""
        first = c * (c - 1) // 2  # pairs (c, 0), (c, 1), ... start here
        mean = mu[..., c]
        for j in range(c):
            mean = mean + coeff[..., first + j] * x[..., j]
        return mean

    def log_prob(self, params: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(N, P) params, (N, C) levels -> (N,) log P(k) of the whole pixel, in nats."""
        logit_pi, mu, log_s, coeff = self.split(params)
        x01 = to_images(k).to(mu.dtype)  # (N, C)
        x = (2 * x01 - 1)[:, None, :]  # (N, 1, C) on [-1, 1], broadcast over components
        means = torch.stack([self.coupled_mean(mu, coeff, x, c) for c in range(self.channels)], -1)
        # the VAE's discretised logistic gives each bin's log-mass (its edge bins and underflow guard)
        log_mass = self._bins.log_pmf(torch.cat([means, log_s], dim=1), x01[:, None, :])  # (N, M, C)
        return torch.logsumexp(torch.log_softmax(logit_pi, -1) + log_mass.sum(-1), dim=-1)

    def sample(
        self, params: torch.Tensor, generator: torch.Generator | None, temperature: float
    ) -> torch.Tensor:
        """(N, P) -> (N, C) levels: a component, then the channels in order, each conditioned on the
        levels already drawn (the quantised values, as the data hold)."""
        logit_pi, mu, log_s, coeff = self.split(params)
        n = logit_pi.shape[0]
        comp = sample_levels(logit_pi, generator, temperature)  # (N,)
        pick = comp[:, None, None]
        mu = mu.gather(1, pick.expand(n, 1, self.channels)).squeeze(1)  # (N, C)
        scale = log_s.gather(1, pick.expand(n, 1, self.channels)).squeeze(1).exp() * temperature
        coeff = coeff.gather(1, pick.expand(n, 1, self.num_pairs)).squeeze(1)
        x = torch.zeros_like(mu)
        k = torch.zeros(n, self.channels, dtype=torch.long, device=mu.device)
        for c in range(self.channels):
            mean = self.coupled_mean(mu, coeff, x, c)
            if temperature > 0:
                u = torch.rand(n, generator=generator, device=mu.device, dtype=mu.dtype).clamp(1e-5, 1 - 1e-5)
                mean = mean + scale[:, c] * (torch.log(u) - torch.log1p(-u))  # a logistic draw
            # rounding to the nearest level centre draws exactly the discretised pmf
            k[:, c] = torch.round((mean.clamp(-1, 1) + 1) * (LEVELS - 1) / 2).long()
            x[:, c] = 2 * to_images(k[:, c]) - 1
        return k


def make_head(head: str, channels: int, n_components: int) -> Categorical | LogisticMixture:
    check_choice("head", head, HEADS)
    check_int("n_components", n_components, minimum=1)
    return Categorical(channels) if head == "categorical" else LogisticMixture(channels, n_components)


class Autoregressive(nn.Module):
    """Base of the autoregressive family: the contract on top of ``log_prob``.

    Subclasses set ``self.head`` and implement ``log_prob(x, y=None) -> (B,)`` (nats, exact) and
    ``sample``. The loss is the mean exact bits/dim of the batch; ``nll`` (nats per image) is
    logged next to it.
    """

    def __init__(self, image_size: int, channels: int):
        super().__init__()
        check_int("image_size", image_size, minimum=1)
        check_int("channels", channels, minimum=1)
        self.shape = (channels, image_size, image_size)
        self.num_dims = channels * image_size * image_size

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def bpd(self, log_p: torch.Tensor) -> torch.Tensor:
        return -log_p / (self.num_dims * math.log(2.0))

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> LossOutput:
        log_p = self.log_prob(x, y)  # (B,) nats
        bpd = self.bpd(log_p).mean()
        return LossOutput(bpd, {"bpd": bpd.detach(), "nll": -log_p.mean().detach()})

    @torch.no_grad()
    def nll_bpd(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) exact bits/dim of the 8-bit images ``x``."""
        return self.bpd(self.log_prob(x))
