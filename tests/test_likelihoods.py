"""Decoder likelihoods: proper pmfs over the 256 levels, golden values, mean images in [0, 1].

All math in float64 on a few pixels; x holds 8-bit values k / 255.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Binomial

from genexp.models.likelihoods import LIKELIHOODS, Bernoulli, DiscretizedLogistic

F64 = torch.float64


def all_levels(c: int, h: int, w: int) -> torch.Tensor:
    """(256, C, H, W): row k is the constant image k / 255."""
    return (torch.arange(256, dtype=F64) / 255).view(256, 1, 1, 1).expand(256, c, h, w)


def logistic_out(mu: float, log_s: float) -> torch.Tensor:
    """One-pixel decoder output (1, 2, 1, 1): channel 0 the mean, channel 1 the log-scale."""
    return torch.tensor([mu, log_s], dtype=F64).view(1, 2, 1, 1)


def level(k: int) -> torch.Tensor:
    return torch.tensor([k / 255], dtype=F64).view(1, 1, 1, 1)


def test_registry_names_both_likelihoods():
    assert LIKELIHOODS == {"bernoulli": Bernoulli, "discretized_logistic": DiscretizedLogistic}
    assert Bernoulli.params_per_channel == 1 and DiscretizedLogistic.params_per_channel == 2


# ---------------------------------------------------------------- Bernoulli (Binomial(255, mu) over levels)


def test_bernoulli_pmf_sums_to_one_over_256_levels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 3, 3, generator=g, dtype=F64) * 4  # (1, C, H, W), mu from ~0 to ~1
    logp = Bernoulli().log_pmf(logits, all_levels(2, 3, 3))  # (256, C, H, W) via broadcasting
    total = logp.exp().sum(0)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-10)


@pytest.mark.parametrize("logit", [-3.0, -0.4, 0.0, 1.7, 6.0])
def test_bernoulli_pmf_is_binomial_255(logit):
    k = torch.tensor([0.0, 1.0, 37.0, 128.0, 254.0, 255.0], dtype=F64)
    logits = torch.full_like(k, logit)
    got = Bernoulli().log_pmf(logits, k / 255)
    want = Binomial(total_count=255, logits=logits).log_prob(k)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_bernoulli_pmf_golden_at_half():
    # mu = sigmoid(0) = 1/2: P(k) = C(255, k) / 2^255, so
    #   k = 0:   log P = -255 ln 2 = -176.7530...
    #   k = 1:   log P = ln 255 - 255 ln 2
    logits = torch.zeros(2, dtype=F64)
    got = Bernoulli().log_pmf(logits, torch.tensor([0.0, 1 / 255], dtype=F64))
    want = torch.tensor([-255 * math.log(2), math.log(255) - 255 * math.log(2)], dtype=F64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_bernoulli_pmf_is_stable_for_large_logits():
    # mu = sigmoid(+-800) is 1 / 0 in float64; the softplus form still gives log P(k = 255) = -softplus(-800) ~ 0
    logits = torch.tensor([800.0, -800.0], dtype=F64)
    got = Bernoulli().log_pmf(logits, torch.tensor([1.0, 0.0], dtype=F64))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)


def test_bernoulli_log_prob_is_minus_bce():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 3, 3, generator=g, dtype=F64)
    x = torch.randint(0, 256, (2, 1, 3, 3), generator=g).to(F64) / 255
    got = Bernoulli().log_prob(logits, x)
    # BCE(l, x) = -(x log s(l) + (1 - x) log(1 - s(l))), per pixel
    s = torch.sigmoid(logits)
    torch.testing.assert_close(got, x * s.log() + (1 - x) * (1 - s).log(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got, -F.binary_cross_entropy_with_logits(logits, x, reduction="none"))


def test_bernoulli_mean_is_sigmoid_in_unit_interval():
    logits = torch.tensor([-1000.0, -2.0, 0.0, 3.0, 1000.0], dtype=F64)
    m = Bernoulli().mean(logits)
    assert ((m >= 0) & (m <= 1)).all()
    torch.testing.assert_close(m, torch.sigmoid(logits))
    assert m[2].item() == 0.5


# ---------------------------------------------------------------- DiscretizedLogistic


def test_discretized_logistic_pmf_sums_to_one_moderate_scales():
    # scales s in [0.02, 1] (bin width 2/255 = 0.0078): every bin whose mass is < 1e-5 (where the code
    # switches to density-at-centre x width) is many scales from the mean, where the midpoint rule is
    # accurate to ~(w/s)^2/24 relative, so the sum is 1 to well under 1e-6.
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(1, 2, 3, 3, generator=g, dtype=F64) * 2.4 - 1.2  # includes means beyond [-1, 1]
    log_s = torch.rand(1, 2, 3, 3, generator=g, dtype=F64) * math.log(50) - math.log(50)
    out = torch.cat([mu, log_s], 1)  # (1, 2C, H, W): means first, then log-scales
    total = DiscretizedLogistic().log_pmf(out, all_levels(2, 3, 3)).exp().sum(0)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)


def test_discretized_logistic_pmf_sums_to_one_sharp_scales_loosely():
    # At the smallest scale (log s = -7, s = 9e-4 << bin width) the mid-bin approximation replaces bins whose
    # true mass is < 1e-5 by something of the same order, and only the one or two bins next to the mean's bin
    # carry such mass: the sum stays within a few 1e-5 of 1 (measured ~6e-6), not 1e-6.
    g = torch.Generator().manual_seed(1)
    mu = torch.rand(1, 2, 3, 3, generator=g, dtype=F64) * 2 - 1
    out = torch.cat([mu, torch.full_like(mu, -7.0)], 1)
    total = DiscretizedLogistic().log_pmf(out, all_levels(2, 3, 3)).exp().sum(0)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=5e-5)


def test_discretized_logistic_interior_bins_golden():
    # mean 0, scale s = 1/255 (log s = -ln 255) on the [-1, 1] scale; level k sits at x = 2k/255 - 1 and owns
    # [x - 1/255, x + 1/255]. With CDF(t) = sigmoid((t - 0) / s) = sigmoid(255 t):
    #   k = 128: x = 1/255,  P = sigmoid(255 * 2/255) - sigmoid(0)   = sigmoid(2) - 1/2  = 0.3807970779778823
    #   k = 127: x = -1/255, P = sigmoid(0) - sigmoid(-2)             = 1/2 - sigmoid(-2) = 0.3807970779778823
    #   k = 129: x = 3/255,  P = sigmoid(4) - sigmoid(2)                                  = 0.10121671206002614
    d = DiscretizedLogistic()
    out = logistic_out(0.0, -math.log(255))
    for k, want in [(128, 0.3807970779778823), (127, 0.3807970779778823), (129, 0.10121671206002614)]:
        assert d.log_pmf(out, level(k)).item() == pytest.approx(math.log(want), abs=1e-12)


def test_discretized_logistic_edge_bins_use_the_tails():
    # mean -0.99, s = 0.05. Level 0 (x = -1) owns (-inf, -1 + 1/255]:
    #   P(0) = sigmoid((-1 + 1/255 + 0.99) / 0.05) = sigmoid(-0.12156862745098...) = 0.4696452182...
    # Mirror image at mean +0.99 for level 255 (x = 1), which owns [1 - 1/255, +inf):
    #   P(255) = 1 - sigmoid((1 - 1/255 - 0.99) / 0.05) = sigmoid(-0.1215686...) = same number.
    # A plain bin [x - 1/255, x + 1/255] would give sigmoid(-0.1216) - sigmoid(-0.2784) = 0.039 instead.
    want = math.log(1 / (1 + math.exp((0.01 - 1 / 255) / 0.05)))
    assert want == pytest.approx(math.log(0.4696452182), abs=1e-9)
    d = DiscretizedLogistic()
    assert d.log_pmf(logistic_out(-0.99, math.log(0.05)), level(0)).item() == pytest.approx(want, abs=1e-12)
    assert d.log_pmf(logistic_out(0.99, math.log(0.05)), level(255)).item() == pytest.approx(want, abs=1e-12)


def test_discretized_logistic_far_tail_edge_bin_is_exact():
    # mean 0, s = 1/255: P(0) = sigmoid(255 * (-1 + 1/255)) = sigmoid(-254), log P = -254 - log(1 + e^-254) = -254.
    # (The mid-bin density approximation would give -255 + ln 255 - ln 127.5 = -255 + ln 2 = -254.307.)
    got = DiscretizedLogistic().log_pmf(logistic_out(0.0, -math.log(255)), level(0)).item()
    assert got == pytest.approx(-254.0, abs=1e-9)


def test_discretized_logistic_tiny_bin_uses_mid_bin_density():
    # mean 0, s = 1/255, k = 140: x = 25/255, bin mass sigmoid(26) - sigmoid(24) ~ 3.4e-11 < 1e-5, so the code
    # uses log(pdf(x) * 2/255) with pdf(x) = sigmoid'(x/s)/s: mid = x/s = 25,
    #   log = 25 - log s - 2 softplus(25) - ln(255/2) = -25 + ln 255 - ln 127.5 + O(e^-25) = -25 + ln 2
    got = DiscretizedLogistic().log_pmf(logistic_out(0.0, -math.log(255)), level(140)).item()
    assert got == pytest.approx(-25 + math.log(2), abs=1e-9)


def test_discretized_logistic_clamps_the_log_scale():
    # log s below min_log_scale = -7 behaves exactly as -7 (a floor against infinitely sharp bins)
    x = all_levels(1, 1, 1)
    d = DiscretizedLogistic()
    torch.testing.assert_close(d.log_pmf(logistic_out(0.3, -30.0), x), d.log_pmf(logistic_out(0.3, -7.0), x))


def test_discretized_logistic_log_prob_is_log_pmf():
    g = torch.Generator().manual_seed(2)
    out = torch.randn(2, 2, 3, 3, generator=g, dtype=F64)
    x = torch.randint(0, 256, (2, 1, 3, 3), generator=g).to(F64) / 255
    d = DiscretizedLogistic()
    torch.testing.assert_close(d.log_prob(out, x), d.log_pmf(out, x))


def test_discretized_logistic_mean_maps_to_unit_interval():
    # 2 image channels -> 4 output channels: means (-3, 0.5) then log-scales (5, -7), which must not matter
    mu = torch.tensor([-3.0, 0.5], dtype=F64).view(1, 2, 1, 1)
    out = torch.cat([mu, torch.tensor([5.0, -7.0], dtype=F64).view(1, 2, 1, 1)], 1)
    m = DiscretizedLogistic().mean(out)
    assert m.shape == (1, 2, 1, 1)
    torch.testing.assert_close(m.flatten(), torch.tensor([0.0, 0.75], dtype=F64))  # (mu + 1) / 2, clamped
    wide = torch.linspace(-5, 5, 41, dtype=F64).view(1, 41, 1, 1)
    m = DiscretizedLogistic().mean(torch.cat([wide, torch.zeros_like(wide)], 1))
    assert ((m >= 0) & (m <= 1)).all() and m.min() == 0 and m.max() == 1
