"""Math of the VAE and AE families and the conv nets' shape plan (float64, tiny shapes, golden numbers)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from genexp.errors import ConfigError
from genexp.metrics.bpd import nats_to_bpd
from genexp.models.ae import AE, gaussian_kl_full
from genexp.models.vae import VAE, gaussian_kl
from genexp.nets.conv import ConvDecoder, ConvEncoder, conv_plan

F64 = torch.float64


def tiny_vae(**kwargs) -> VAE:
    torch.manual_seed(0)
    return VAE(**{"image_size": 8, "channels": 1, "latent_dim": 2, "base_channels": 4, **kwargs}).double()


def binary_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g, dtype=F64) > 0.5).to(F64)


# ---------------------------------------------------------------- closed forms


def test_gaussian_kl_golden():
    # KL(N(mu, s^2) || N(0, 1)) = 0.5 (mu^2 + s^2 - 1 - ln s^2) per dim, summed:
    #   dim 1: mu = 1, logvar = 0     -> 0.5 (1 + 1 - 1 - 0)     = 0.5
    #   dim 2: mu = 0, logvar = ln 2  -> 0.5 (0 + 2 - 1 - ln 2)  = 0.5 - 0.5 ln 2
    #   total = 1 - 0.5 ln 2 = 0.6534264097200273;  second row mu = 0, logvar = 0 -> 0
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    logvar = torch.tensor([[0.0, math.log(2)], [0.0, 0.0]], dtype=F64)
    got = gaussian_kl(mu, logvar)
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.tensor([0.6534264097200273, 0.0], dtype=F64), rtol=0, atol=1e-14)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 5, generator=g, dtype=F64)
    logvar = torch.randn(3, 5, generator=g, dtype=F64)
    want = kl_divergence(
        Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))
    ).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), want)


def test_gaussian_kl_full_golden():
    # KL(N(m, S) || N(0, I)) = 0.5 (tr S + |m|^2 - d - ln det S); m = (1, 2), S = [[2, .5], [.5, 1]]:
    #   tr S = 3, |m|^2 = 5, d = 2, det S = 2 - 0.25 = 1.75 -> 0.5 (6 - ln 1.75) = 2.7201921060322887
    mean = torch.tensor([1.0, 2.0], dtype=F64)
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    assert gaussian_kl_full(mean, cov).item() == pytest.approx(0.5 * (6 - math.log(1.75)), abs=1e-14)
    assert gaussian_kl_full(mean, cov).item() == pytest.approx(2.7201921060322887, abs=1e-14)


def test_gaussian_kl_full_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 4, generator=g, dtype=F64)
    cov = a @ a.T + 0.3 * torch.eye(4, dtype=F64)  # a random SPD matrix with correlations
    mean = torch.randn(4, generator=g, dtype=F64)
    want = kl_divergence(
        MultivariateNormal(mean, cov), MultivariateNormal(torch.zeros(4, dtype=F64), torch.eye(4, dtype=F64))
    )
    torch.testing.assert_close(gaussian_kl_full(mean, cov), want)


def test_nats_to_bpd_golden():
    # 784 ln 2 nats over 784 dims = 784 bits / 784 dims = 1 bit/dim; 8 bits/dim on 3x32x32 = 3072 dims
    one_bit = nats_to_bpd(torch.tensor(784 * math.log(2), dtype=F64), 784)
    assert one_bit.item() == pytest.approx(1.0, abs=1e-15)
    got = nats_to_bpd(torch.tensor([3072 * 8 * math.log(2), 0.0], dtype=F64), 3072)
    torch.testing.assert_close(got, torch.tensor([8.0, 0.0], dtype=F64))


# ---------------------------------------------------------------- VAE


def test_vae_kl_warmup_raises_beta_linearly_in_training_only():
    # beta_t = beta * min(1, (t + 1) / W) at training step t (0-based): W = 4, beta = 2 -> .5, 1, 1.5, 2, 2, 2
    m = tiny_vae(beta=2.0, kl_warmup_steps=4).train()
    x = binary_images(4)
    betas = []
    for step in range(6):
        out = m.loss(x)
        betas.append(out.logs["beta"].item())
        assert int(m.num_steps) == step + 1
        # the objective really uses that beta: loss = mean(-log p(x|z)) + beta * mean(KL)
        torch.testing.assert_close(out.loss, out.logs["recon"] + betas[-1] * out.logs["kl"])
    assert betas == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0], abs=1e-12)

    m.eval()
    out = m.loss(x)
    assert int(m.num_steps) == 6  # evaluation does not advance the warm-up
    assert "beta" not in out.logs
    torch.testing.assert_close(out.loss, out.logs["recon"] + 2.0 * out.logs["kl"])


def test_vae_warmup_step_count_is_checkpointed():
    m = tiny_vae(kl_warmup_steps=10).train()
    for _ in range(3):
        m.loss(binary_images(2))
    fresh = tiny_vae(kl_warmup_steps=10)
    assert fresh.current_beta() == pytest.approx(0.1)
    fresh.load_state_dict(m.state_dict())
    assert fresh.current_beta() == pytest.approx(0.4)  # (3 + 1) / 10


def test_vae_without_warmup_uses_beta_from_step_zero():
    m = tiny_vae(beta=0.5).train()
    assert m.current_beta() == 0.5
    out = m.loss(binary_images(2))
    assert "beta" not in out.logs  # constant: not logged every step
    torch.testing.assert_close(out.loss, out.logs["recon"] + 0.5 * out.logs["kl"])


@pytest.mark.parametrize("nll_samples", [1, 8])
def test_vae_bounds_golden_when_posterior_is_the_prior(nll_samples):
    # All weights zero: the encoder outputs mu = 0, logvar = 0, so q(z|x) = p(z) = N(0, I) and KL = 0, and the
    # decoder outputs logit 0 whatever z is, so p(x|z) = p(x) = prod Binomial(k; 255, 1/2). Both bounds are then
    # exact (every importance weight equals p(x)). For binary pixels (k = 0 or 255), P(k) = 2^-255:
    #   -log2 p(x) / D = 255 bits/dim;   BCE(logit 0, x) = ln 2 per pixel, so recon = 64 ln 2 nats on 8x8.
    m = tiny_vae(nll_samples=nll_samples).eval()
    for p in m.parameters():
        p.data.zero_()
    x = binary_images(3)
    torch.testing.assert_close(m.nll_bpd(x), torch.full((3,), 255.0, dtype=F64))
    out = m.loss(x)
    assert out.logs["kl"].item() == 0.0
    assert out.logs["recon"].item() == pytest.approx(64 * math.log(2), abs=1e-10)
    assert out.logs["bpd"].item() == pytest.approx(255.0, abs=1e-10)
    assert out.logs["mse"].item() == pytest.approx(0.25, abs=1e-15)  # mean image 1/2 vs pixels 0 or 1


def test_vae_importance_weighted_bound_is_tighter_on_average():
    # Burda et al. 2016: E[log (1/k) sum_i w_i] rises with k towards log p(x), so the bits/dim bound falls.
    # 256 copies of one image give 256 independent draws of each bound. With these seeds the means are
    # 260.9, 256.0, 254.6 bits/dim with standard errors 0.37, 0.10, 0.05: the gaps are > 10 standard errors,
    # so the order is not a sampling accident.
    m = tiny_vae().eval()
    x = binary_images(1).expand(256, -1, -1, -1)
    means = {}
    for k in (1, 4, 16):
        m.nll_samples = k
        torch.manual_seed(1)
        bpd = m.nll_bpd(x)
        assert bpd.shape == (256,) and torch.isfinite(bpd).all()
        means[k] = bpd.mean().item()
    assert means[1] > means[4] > means[16] > 0


# ---------------------------------------------------------------- AE


def tiny_ae(**kwargs) -> AE:
    torch.manual_seed(0)
    return AE(**{"image_size": 8, "channels": 1, "latent_dim": 3, "base_channels": 4, **kwargs})


@pytest.mark.filterwarnings("ignore:std\\(\\)")  # the batch of one below logs a NaN latent_std
def test_ae_running_gaussian_fit():
    m = tiny_ae(prior_momentum=0.25).train()
    g = torch.Generator().manual_seed(0)
    x1, x2, x3 = (torch.rand(16, 1, 8, 8, generator=g) for _ in range(3))
    with torch.no_grad():
        z1, z2 = m.encode(x1).double(), m.encode(x2).double()
    tol = {"rtol": 1e-5, "atol": 1e-6}
    assert not bool(m.prior_fitted)

    m.loss(x1)  # first batch: the fit is the batch's mean and (unbiased) covariance
    assert bool(m.prior_fitted)
    torch.testing.assert_close(m.prior_mean.double(), z1.mean(0), **tol)
    torch.testing.assert_close(m.prior_cov.double(), torch.cov(z1.T), **tol)

    m.loss(x2)  # then an exponential moving average: new = old + momentum * (batch - old)
    torch.testing.assert_close(m.prior_mean.double(), z1.mean(0) + 0.25 * (z2.mean(0) - z1.mean(0)), **tol)
    torch.testing.assert_close(m.prior_cov.double(), 0.75 * torch.cov(z1.T) + 0.25 * torch.cov(z2.T), **tol)

    mean, cov = m.prior_mean.clone(), m.prior_cov.clone()
    m.eval()
    m.loss(x3)  # evaluation leaves the fit alone
    m.train()
    m.loss(x3[:1])  # one code has no covariance: skipped
    torch.testing.assert_close(m.prior_mean, mean, rtol=0, atol=0)
    torch.testing.assert_close(m.prior_cov, cov, rtol=0, atol=0)


def test_ae_running_gaussian_fit_in_float64():
    m = tiny_ae().double().train()
    x = torch.rand(4, 1, 8, 8, dtype=F64)
    m.loss(x)
    m.loss(x)
    assert m.prior_mean.dtype == F64


def test_ae_sample_draws_from_the_fitted_gaussian(monkeypatch):
    m = tiny_ae(latent_dim=2).eval()
    mean = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[2.0, 0.6], [0.6, 0.5]])
    m.prior_mean.copy_(mean)
    m.prior_cov.copy_(cov)
    monkeypatch.setattr(m, "decode", lambda z: z)  # return the codes themselves
    n = 20000
    z = m.sample(n, generator=torch.Generator().manual_seed(0))
    # exactly mean + eps L^T with L L^T = cov + 1e-5 I (jitter) and eps from the given generator
    eps = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    chol = torch.linalg.cholesky(cov + 1e-5 * torch.eye(2))
    torch.testing.assert_close(z, mean + eps @ chol.T)
    # and its moments are those of N(mean, cov): standard errors ~0.01 (mean) and ~0.02 (cov) at n = 20000
    torch.testing.assert_close(z.mean(0), mean, rtol=0, atol=0.05)
    torch.testing.assert_close(torch.cov(z.T), cov, rtol=0, atol=0.1)


def test_ae_sample_is_images_in_unit_interval():
    for reconstruction in ("mse", "bce"):
        x = tiny_ae(reconstruction=reconstruction).sample(5, generator=torch.Generator().manual_seed(0))
        assert x.shape == (5, 1, 8, 8) and x.min() >= 0 and x.max() <= 1


def test_ae_sample_in_float64():
    assert tiny_ae().double().sample(2).dtype == F64


# ---------------------------------------------------------------- conv nets


@pytest.mark.parametrize(
    ("image_size", "base", "widths", "size"),
    [
        (28, 32, [32, 64, 128], 7),  # 28 -> 14 -> 7 (odd: stop)
        (32, 16, [16, 32, 64], 8),  # 32 -> 16 -> 8 (<= 8: stop)
        (64, 8, [8, 16, 32, 64], 8),  # 3 downsamples
        (8, 4, [4], 8),  # already 8: no downsample
        (12, 4, [4, 8], 6),  # 12 -> 6
        (256, 4, [4, 8, 16, 32, 32, 32], 8),  # widths capped at 8x base
        (512, 1, [1, 2, 4, 8, 8, 8], 16),  # at most MAX_DOWNSAMPLES = 5 stages
    ],
)
def test_conv_plan_golden(image_size, base, widths, size):
    assert conv_plan(image_size, base) == (widths, size)


@pytest.mark.parametrize("image_size", [30, 4, 0, 10])
def test_conv_plan_rejects_unsupported_sizes(image_size):
    with pytest.raises(ConfigError) as err:
        conv_plan(image_size, 8)
    assert err.value.key == "image_size"


@pytest.mark.parametrize("image_size", [8, 12, 16, 28, 32, 64])
def test_conv_encoder_decoder_shapes_round_trip(image_size):
    torch.manual_seed(0)
    enc = ConvEncoder(3, image_size, 5, base_channels=2)
    dec = ConvDecoder(5, image_size, 6, base_channels=2)
    h = enc(torch.rand(2, 3, image_size, image_size))
    assert h.shape == (2, 5)
    assert dec(h).shape == (2, 6, image_size, image_size)
