"""Diffusion math (genexp.diffusion) in float64 on tiny shapes, against closed forms.

The samplers run with a fake network whose eps-hat is exact for Gaussian data, so a 1,000-step loop
is a few hundred small tensor ops.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch

from genexp.diffusion import schedules
from genexp.diffusion.likelihood import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
    p_mean_variance,
    prior_bpd,
    vb_term_bpd,
)
from genexp.diffusion.noise_schedule import NoiseSchedule
from genexp.diffusion.objectives import LOSS_WEIGHTINGS, OBJECTIVES, check_objective, loss_weight
from genexp.diffusion.samplers import DDIMSampler, DDPMSampler, noise_like, sample_loop
from genexp.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCHEDULES = ["linear", "cosine", "sigmoid", "quadratic"]
F64 = torch.float64


def make_schedule(name: str = "linear", timesteps: int = 1000, **kwargs) -> NoiseSchedule:
    return NoiseSchedule(partial(getattr(schedules, name), **kwargs), timesteps=timesteps)


@pytest.fixture(scope="module")
def linear1000() -> NoiseSchedule:
    return make_schedule("linear", 1000)


@pytest.fixture
def one_thread():
    """The sampler loops are thousands of ops on tiny tensors: intra-op threads only add overhead
    (and contention on a busy CI machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------- schedules


def test_linear_schedule_matches_ddpm_and_its_golden_alphas_cumprod(linear1000):
    betas = schedules.linear(1000)
    # at T = 1000 the 1000 / T scaling is 1: exactly DDPM's linspace(1e-4, 0.02, 1000)
    assert torch.equal(betas, torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    # abar_T = prod(1 - beta_t), log abar_T = sum log(1 - beta_t) = -sum b - sum b^2 / 2 - sum b^3 / 3 ...
    # with b linear over [a, c] = [1e-4, 0.02], N = 1000: sum b = N (a + c) / 2 = 10.05,
    # sum b^2 / 2 ~ N (a^2 + a c + c^2) / 6 = 0.06700, sum b^3 / 3 ~ N (a + c)(a^2 + c^2) / 12 = 0.00067,
    # next terms ~ 1e-5: log abar_T = -10.1177 -> abar_T = 4.036e-5 (exactly: 4.0358e-05)
    assert linear1000.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)
    assert linear1000.timesteps == 1000


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("timesteps", [1000, 100])
def test_every_schedule_is_sensible(name, timesteps):
    s = make_schedule(name, timesteps)
    assert s.betas.dtype == F64 and s.betas.shape == (timesteps,)
    assert bool(((s.betas > 0) & (s.betas < 1)).all())
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()), "abar must strictly decrease"
    # ends near pure noise, also at T = 100 (the 1000 / T scaling of linear / quadratic)
    assert s.alphas_cumprod[-1].item() < 1e-2
    assert s.alphas_cumprod[0].item() > 0.99  # and starts near the data


def test_cosine_alphas_cumprod_is_its_closed_form():
    # Nichol & Dhariwal 2021 eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) pi / 2);
    # index i is t = i + 1. The product of the unclipped ratios telescopes to f(t) / f(0).
    T, s = 1000, 0.008
    sched = make_schedule("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    closed = torch.tensor([f(i + 1) / f(0) for i in range(T)], dtype=F64)
    unclipped = sched.betas < 0.999
    first_clipped = int((~unclipped).nonzero()[0]) if (~unclipped).any() else T
    assert first_clipped > 990  # only the very last steps hit max_beta
    torch.testing.assert_close(
        sched.alphas_cumprod[:first_clipped], closed[:first_clipped], rtol=1e-10, atol=0
    )


def test_sigmoid_schedule_is_chen_2023_algorithm_1():
    # abar(t) = (v_end - sigmoid((t (end - start) + start) / tau)) / (v_end - v_start), t = i / T
    T, start, end, tau = 50, -3.0, 3.0, 1.0
    sched = make_schedule("sigmoid", T)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    v0, v1 = sig(start / tau), sig(end / tau)
    closed = [(v1 - sig(((i / T) * (end - start) + start) / tau)) / (v1 - v0) for i in range(1, T)]
    # the last step (abar = 0) is clipped at max_beta
    torch.testing.assert_close(sched.alphas_cumprod[:-1], torch.tensor(closed, dtype=F64), rtol=1e-10, atol=0)


def test_quadratic_schedule_is_sqrt_linear_squared():
    betas = schedules.quadratic(1000)
    torch.testing.assert_close(betas.sqrt(), torch.linspace(0.01, math.sqrt(0.02), 1000, dtype=F64))


def test_schedule_buffers_are_float64_move_with_to_and_stay_out_of_state_dict(linear1000):
    s = make_schedule("linear", 10)
    s.to(torch.float32)
    s.half()
    assert all(b.dtype == F64 for b in s.buffers()), "the schedule keeps float64 through .to(dtype)"
    assert s.state_dict() == {}  # derived from the config, rebuilt from it
    names = {
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
        "posterior_mean_coef2", "snr",
    }  # fmt: skip
    assert names <= {n for n, _ in s.named_buffers()}
    torch.testing.assert_close(linear1000.snr, linear1000.alphas_cumprod / (1 - linear1000.alphas_cumprod))


def test_extract_broadcasts_over_images_and_flat_latents(linear1000):
    t = torch.tensor([0, 999, 5])
    for shape in [(3, 2, 4, 4), (3, 6)]:
        x = torch.ones(shape, dtype=torch.float32)
        a = linear1000.extract(linear1000.alphas_cumprod, t, x)
        assert a.shape == (3,) + (1,) * (len(shape) - 1) and a.dtype == torch.float32
        assert a.flatten()[1].item() == pytest.approx(linear1000.alphas_cumprod[999].item(), rel=1e-6)
        assert linear1000.q_sample(x, t, x).shape == shape


# ------------------------------------------------------------------------------------ forward process


def test_q_sample_has_mean_sqrt_abar_x0_and_variance_one_minus_abar(linear1000):
    n = 20_000
    t = torch.tensor([10, 300, 900]).repeat_interleave(n)  # (3n,)
    x0 = torch.tensor([0.8, -0.5, 0.3], dtype=F64).repeat_interleave(n)[:, None]  # (3n, 1)
    x_t = linear1000.q_sample(x0, t, randn(3 * n, 1)).reshape(3, n)
    abar = linear1000.alphas_cumprod[[10, 300, 900]]
    mean = abar.sqrt() * torch.tensor([0.8, -0.5, 0.3], dtype=F64)
    # Monte Carlo: standard error of the mean sqrt(var / n) <= 0.0071, of the variance var sqrt(2 / n) <= 0.01
    torch.testing.assert_close(x_t.mean(dim=1), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(x_t.var(dim=1), 1 - abar, atol=0.04, rtol=0)
    q = linear1000.q_mean_variance(x0[:3], torch.tensor([10, 10, 10]))
    torch.testing.assert_close(q.log_var.exp(), q.var)


def test_q_posterior_is_bayes_rule_on_the_two_gaussians():
    s = make_schedule("cosine", 50)
    betas = s.betas
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    x0, x_t = randn(4, 3, seed=1), randn(4, 3, seed=2)
    t = torch.tensor([1, 7, 30, 49])
    post = s.q_posterior(x0, x_t, t)
    # q(x_{t-1} | x_t, x_0) oc q(x_t | x_{t-1}) q(x_{t-1} | x_0)
    #   = N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}),
    # a Gaussian in x_{t-1} with precision alpha_t / beta_t + 1 / (1 - abar_{t-1}) and
    # mean = var (sqrt(alpha_t) x_t / beta_t + sqrt(abar_{t-1}) x_0 / (1 - abar_{t-1})).
    b, a, ap = betas[t][:, None], alphas[t][:, None], abar[t - 1][:, None]
    var = 1 / (a / b + 1 / (1 - ap))
    mean = var * (a.sqrt() * x_t / b + ap.sqrt() * x0 / (1 - ap))
    torch.testing.assert_close(post.mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(post.var.expand_as(var), var, rtol=1e-10, atol=0)
    torch.testing.assert_close(post.log_var, post.var.log(), rtol=1e-10, atol=0)
    # index 0 (the paper's t = 1): x_{-1} is x_0 itself: mean x_0, variance 0, log-variance clipped finite
    post0 = s.q_posterior(x0, x_t, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(post0.mean, x0, rtol=0, atol=1e-15)
    assert bool((post0.var == 0).all()) and bool(torch.isfinite(post0.log_var).all())


def test_predictions_invert_q_sample(linear1000):
    x0, eps = randn(5, 2, 3, 3, seed=3), randn(5, 2, 3, 3, seed=4)
    t = torch.tensor([0, 1, 250, 700, 999])
    x_t = linear1000.q_sample(x0, t, eps)
    torch.testing.assert_close(linear1000.predict_x0_from_eps(x_t, t, eps), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(linear1000.predict_eps_from_x0(x_t, t, x0), eps, rtol=0, atol=1e-9)
    v = linear1000.velocity(x0, eps, t)
    torch.testing.assert_close(linear1000.predict_x0_from_v(x_t, t, v), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(linear1000.predict_eps_from_v(x_t, t, v), eps, rtol=0, atol=1e-12)
    assert linear1000.snr_at(t).shape == (5,)


# ---------------------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("name", ["eps", "x0", "v"])
def test_objective_round_trip_recovers_eps(name, linear1000):
    x0, eps = randn(4, 1, 4, 4, seed=5), randn(4, 1, 4, 4, seed=6)
    t = torch.tensor([3, 100, 500, 990])
    x_t = linear1000.q_sample(x0, t, eps)
    obj = OBJECTIVES[name]
    # x0 -> eps divides by sqrt(1/abar - 1) ~ 0.01 at t = 0: a few ulps of x_t become ~1e-13
    torch.testing.assert_close(
        obj.to_eps(linear1000, obj.target(linear1000, x0, eps, t), x_t, t), eps, rtol=0, atol=1e-10
    )


def test_min_snr_weights_golden_values():
    snr = torch.tensor([1.0, 20.0], dtype=F64)
    # Hang et al. 2023: min(SNR, gamma) on x0; eps: / SNR; v: / (SNR + 1). gamma = 5:
    # SNR = 1:  eps 1/1 = 1,   x0 1,  v 1/2 = 0.5
    # SNR = 20: eps 5/20 = 0.25, x0 5, v 5/21 = 0.238095...
    golden = {"eps": [1.0, 0.25], "x0": [1.0, 5.0], "v": [0.5, 5.0 / 21.0]}
    for name, want in golden.items():
        got = loss_weight("min_snr", name, snr, 5.0)
        torch.testing.assert_close(got, torch.tensor(want, dtype=F64))
        torch.testing.assert_close(loss_weight("simple", name, snr, 5.0), torch.ones(2, dtype=F64))
    assert LOSS_WEIGHTINGS == ("simple", "min_snr")


# ---------------------------------------------------------------------------------------- samplers

M, S = 0.3, 0.2  # fake data: x0 ~ N(M, S^2) in every dimension


def gaussian_eps(schedule: NoiseSchedule):
    """E[eps | x_t] for x0 ~ N(M, S^2): eps and x_t = sqrt(abar) x0 + sqrt(1 - abar) eps are jointly
    Gaussian with Cov(eps, x_t) = sqrt(1 - abar), Var(x_t) = abar S^2 + 1 - abar, so
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) M) / (abar S^2 + 1 - abar): the optimal network."""

    def eps_fn(x_t, t):
        abar = schedule.extract(schedule.alphas_cumprod, t, x_t)
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * M) / (abar * S**2 + 1 - abar)

    return eps_fn


def run(sampler, x_T, seed=0):
    eps_fn = gaussian_eps(sampler.schedule)
    return sample_loop(sampler, eps_fn, x_T, torch.Generator().manual_seed(seed))


# (sampler, tolerance on |mean - M|, on |std - S|). Monte Carlo with 4096 x 2 values: standard error of
# the mean S / sqrt(8192) = 0.0022, of the std S / sqrt(16384) = 0.0016. DDPM and DDIM-1000 are accurate
# to that (measured std with 20k x 2 samples: beta 0.2020, beta_tilde 0.1974, DDIM-1000 0.1996). The
# 50-step DDIMs carry the known discretisation error of few steps on this narrow (S = 0.2) data:
# measured std 0.177 (eta = 0) and 0.159 (eta = 1); the tolerances are that bias plus ~5 standard
# errors. DDIM-50 eta = 0 is checked exactly against Euler's method on the ODE below, and its error
# shrinks with more steps (test_ddim_error_shrinks_with_steps).
SAMPLERS = {
    "ddpm_beta": (partial(DDPMSampler, variance="beta", clip_denoised=False), 0.01, 0.01),
    "ddpm_beta_tilde": (partial(DDPMSampler, variance="beta_tilde", clip_denoised=False), 0.01, 0.01),
    "ddim1000_eta0": (partial(DDIMSampler, steps=1000, eta=0.0, clip_denoised=False), 0.01, 0.01),
    "ddim50_eta0": (partial(DDIMSampler, steps=50, eta=0.0, clip_denoised=False), 0.01, 0.035),
    "ddim50_eta1": (partial(DDIMSampler, steps=50, eta=1.0, clip_denoised=False), 0.01, 0.05),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_recover_gaussian_data_with_the_exact_eps(name, linear1000, one_thread):
    make, tol_mean, tol_std = SAMPLERS[name]
    x_T = randn(4096, 2, seed=10)
    x = run(make(linear1000), x_T, seed=11)
    assert abs(x.mean().item() - M) < tol_mean
    assert abs(x.std().item() - S) < tol_std
    if name == "ddim50_eta1":  # the noise term matters: without it the spread collapses further
        assert x.std().item() < S


def test_ddim_error_shrinks_with_steps(linear1000, one_thread):
    x_T = randn(2048, 1, seed=12)
    errors = [
        abs(run(DDIMSampler(linear1000, steps=n, clip_denoised=False), x_T).std().item() - S)
        for n in (10, 50, 1000)
    ]
    assert errors[0] > errors[1] > errors[2]


def test_ddim_eta0_is_euler_on_the_probability_flow_ode(linear1000):
    # Song et al. 2021 eq. 13-14: with xbar = x / sqrt(abar) and sigma = sqrt((1 - abar) / abar), DDIM at
    # eta = 0 is Euler's method xbar' = xbar + (sigma' - sigma) eps_hat. For the Gaussian data,
    # eps_hat = sigma (xbar - M) / (S^2 + sigma^2), so y = xbar - M is multiplied at every step by
    # 1 + (sigma' - sigma) sigma / (S^2 + sigma^2); the last step goes to sigma = 0 (abar = 1), x = xbar.
    sampler = DDIMSampler(linear1000, steps=50, eta=0.0, clip_denoised=False)
    x_T = randn(16, 3, seed=21)
    abar = linear1000.alphas_cumprod[sampler.timesteps]
    sigmas = [*((1 - abar) / abar).sqrt().tolist(), 0.0]
    y = x_T / abar[0].sqrt() - M
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        y = y * (1 + (sigma_next - sigma) * sigma / (S**2 + sigma**2))
    torch.testing.assert_close(run(sampler, x_T), M + y, rtol=0, atol=1e-10)


def test_ddim_step_is_eq12_with_eq16_sigma(linear1000):
    # x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z (Song et al. eq. 12),
    # sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (eq. 16), at a spaced step
    sampler = DDIMSampler(linear1000, steps=10, eta=0.5, clip_denoised=False)
    t, prev = sampler.timesteps[3].item(), sampler.timesteps[4].item()
    assert t - prev > 1
    x_t, eps = randn(8, 2, seed=22), randn(8, 2, seed=23)
    a, ap = linear1000.alphas_cumprod[t], linear1000.alphas_cumprod[prev]
    sigma = 0.5 * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
    x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(24), dtype=F64)
    want = ap.sqrt() * x0_hat + (1 - ap - sigma**2).sqrt() * eps + sigma * z
    got = sampler.step(eps, t, x_t, torch.Generator().manual_seed(24))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_ddim_eta0_is_deterministic_and_draws_no_noise(linear1000):
    sampler = DDIMSampler(linear1000, steps=20, eta=0.0)
    x_T = randn(64, 3, seed=13)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    a = sample_loop(sampler, gaussian_eps(linear1000), x_T, g)
    assert torch.equal(g.get_state(), state)  # the generator was never used
    b = run(sampler, x_T, seed=2)
    assert torch.equal(a, b)


def test_last_step_returns_x0_hat_for_ddim_and_ddpm(linear1000):
    x_t, eps = randn(6, 4, seed=14), randn(6, 4, seed=15) * 0.1
    t0 = torch.zeros(6, dtype=torch.long)
    x0_hat = linear1000.predict_x0_from_eps(x_t, t0, eps)
    ddim = DDIMSampler(linear1000, steps=10, eta=1.0, clip_denoised=False)
    assert ddim.timesteps[-1].item() == 0
    assert torch.equal(ddim.step(eps, 0, x_t, torch.Generator()), x0_hat)  # abar_prev = 1, sigma = 0
    ddpm = DDPMSampler(linear1000, clip_denoised=False)
    # mu_tilde at index 0 = coef1 x0_hat + coef2 x_t with coef1 = 1, coef2 = 0: x0_hat up to rounding
    torch.testing.assert_close(ddpm.step(eps, 0, x_t, torch.Generator()), x0_hat, rtol=0, atol=1e-12)
    # with clipping both return the clamped x0_hat
    big = x_t * 50
    clamped = linear1000.predict_x0_from_eps(big, t0, eps).clamp(-1, 1)
    assert torch.equal(DDIMSampler(linear1000, steps=10).step(eps, 0, big), clamped)
    torch.testing.assert_close(DDPMSampler(linear1000).step(eps, 0, big), clamped, rtol=0, atol=1e-12)


@pytest.mark.parametrize("clip_denoised", [False, True])
def test_ddim_with_all_steps_and_eta1_is_ddpm_beta_tilde(clip_denoised, one_thread):
    # Song et al. 2021 eq. 16: at steps = T, eta = 1, sigma_t^2 = (1 - abar_{t-1}) / (1 - abar_t) beta_t
    # = beta_tilde_t, and the DDIM mean is the posterior mean: the same Markov chain, and both draw
    # their noise at the same steps, so the same generator gives the same samples.
    s = make_schedule("linear", 200)
    x_T = randn(256, 2, seed=16)
    ddim = run(DDIMSampler(s, steps=200, eta=1.0, clip_denoised=clip_denoised), x_T, seed=17)
    ddpm = run(DDPMSampler(s, variance="beta_tilde", clip_denoised=clip_denoised), x_T, seed=17)
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-8)
    assert not torch.equal(ddpm, run(DDPMSampler(s, clip_denoised=clip_denoised), x_T, seed=18))


def test_sampler_timesteps():
    s = make_schedule("linear", 1000)
    ddpm = DDPMSampler(s)
    assert torch.equal(ddpm.timesteps, torch.arange(999, -1, -1)) and ddpm.num_steps == 1000
    ddim = DDIMSampler(s, steps=50)
    ts = ddim.timesteps
    assert ts.dtype == torch.long and ts.device.type == "cpu" and ddim.num_steps == 50
    assert ts[0].item() == 999 and ts[-1].item() == 0 and bool((ts[1:] < ts[:-1]).all())
    gaps = (ts[:-1] - ts[1:]).tolist()
    assert set(gaps) <= {20, 21}  # linspace(999, 0, 50): spacing 999 / 49 = 20.39, rounded
    assert torch.equal(DDIMSampler(s, steps=1000).timesteps, ddpm.timesteps)
    assert DDIMSampler(s, steps=1).timesteps.tolist() == [999]
    with pytest.raises(ValueError, match="t=5"):
        ddim.step(torch.zeros(1, 1), 5, torch.zeros(1, 1))


def test_noise_like_takes_dtype_and_device_from_x():
    x = torch.zeros(3, 2, dtype=torch.float32)
    z = noise_like(x, torch.Generator().manual_seed(0))
    assert z.dtype == torch.float32 and z.shape == (3, 2)
    assert torch.equal(z, noise_like(x, torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------------------------ likelihood


def test_normal_kl_closed_form():
    z = torch.zeros(3, dtype=F64)
    assert torch.equal(normal_kl(z + 0.5, z - 1.0, z + 0.5, z - 1.0), z)
    # KL(N(1, 1) || N(0, 4)) = 1/2 (-1 + log 4 - log 1 + 1/4 + (1 - 0)^2 / 4) = (log 4 - 1/2) / 2 = 0.443147
    one = torch.tensor(1.0, dtype=F64)
    kl = normal_kl(one, torch.tensor(0.0, dtype=F64), torch.tensor(0.0, dtype=F64), torch.log(one * 4))
    assert kl.item() == pytest.approx(0.4431471805599453, abs=1e-12)


def test_approx_standard_normal_cdf_is_close_to_phi():
    x = torch.linspace(-5, 5, 101, dtype=F64)
    phi = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - phi).abs().max().item() < 1e-3


@pytest.mark.parametrize("mean, scale", [(0.0, 0.5), (0.37, 0.02), (-0.99, 0.1), (1.3, 1.0), (0.2, 1e-4)])
def test_discretized_gaussian_probabilities_sum_to_one(mean, scale):
    grid = torch.arange(256, dtype=F64) * 2 / 255 - 1  # the 8-bit levels on [-1, 1]
    means = torch.full_like(grid, mean)
    log_scales = torch.full_like(grid, math.log(scale))
    p = discretized_gaussian_log_likelihood(grid, means, log_scales).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-8)
    if scale < 1e-3:  # a narrow Gaussian puts all its mass on the nearest level (0.2 is ~25.5 bins in)
        assert p.max().item() > 0.999


def test_prior_bpd_is_tiny_for_zero_data(linear1000):
    x0 = torch.zeros(2, 1, 2, 2, dtype=F64)
    bpd = prior_bpd(linear1000, x0)
    # KL(N(0, 1 - abar) || N(0, 1)) = (-abar - log(1 - abar)) / 2 ~ abar^2 / 4 per dim, abar = 4.0358e-5:
    # 4.072e-10 nats = 5.875e-10 bits
    abar = linear1000.alphas_cumprod[-1].item()
    assert bpd.shape == (2,) and bool((bpd > 0).all())
    torch.testing.assert_close(bpd, torch.full((2,), abar**2 / 4 / math.log(2), dtype=F64), rtol=1e-4, atol=0)
    # x0 = 1: KL(N(sqrt(abar), 1 - abar) || N(0, 1)) = -log(1 - abar) / 2 ~ abar / 2 nats per dim
    assert prior_bpd(linear1000, torch.ones_like(x0))[0].item() == pytest.approx(
        abar / 2 / math.log(2), rel=1e-3
    )


def test_vb_terms(linear1000):
    levels = torch.randint(0, 256, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    x0 = (levels * 2 / 255 - 1).to(F64)  # 8-bit data on [-1, 1]
    eps = randn(3, 1, 4, 4, seed=20)
    t = torch.tensor([0, 5, 700])
    x_t = linear1000.q_sample(x0, t, eps)
    q = linear1000.q_posterior(x0, x_t, t)
    vb = vb_term_bpd(linear1000, x0, x_t, t, q.mean, q.log_var)
    assert vb.shape == (3,)
    # t > 0: the model equals the posterior, KL = 0
    torch.testing.assert_close(vb[1:], torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)
    # t = 0: the decoder NLL -mean log P(x0) / ln 2 of the discretised Gaussian
    log_p = discretized_gaussian_log_likelihood(x0[:1], q.mean[:1], 0.5 * q.log_var[:1].expand_as(x0[:1]))
    assert vb[0].item() == pytest.approx(-log_p.mean().item() / math.log(2), rel=1e-12)
    # the true eps gives x0_hat = x0 and the posterior mean (clipping changes nothing on [-1, 1] data)
    p = p_mean_variance(linear1000, eps, x_t, t, variance="beta_tilde", clip_denoised=True)
    torch.testing.assert_close(p.x0_pred, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(p.mean, q.mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(p.log_var, q.log_var)
    # the other fixed variance: sigma_t^2 = beta_t for t > 0
    big = p_mean_variance(linear1000, eps, x_t, t, variance="beta")
    torch.testing.assert_close(big.var.flatten()[1:], linear1000.betas[t[1:]])


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "build, key",
    [
        (lambda s: DDIMSampler(s, steps=0), "steps"),
        (lambda s: DDIMSampler(s, steps=11), "steps"),
        (lambda s: DDIMSampler(s, steps=5, eta=-0.5), "eta"),
        (lambda s: DDPMSampler(s, variance="foo"), "variance"),
        (lambda s: check_objective("foo"), "objective"),
        (lambda s: loss_weight("foo", "eps", torch.ones(1)), "weighting"),
        (lambda s: NoiseSchedule(partial(schedules.linear), timesteps=0), "timesteps"),
        (lambda s: schedules.linear(10, beta_start=0.1, beta_end=0.01), "beta_end"),
        (lambda s: schedules.sigmoid(10, tau=0.0), "tau"),
        (lambda s: NoiseSchedule(lambda T: torch.ones(T), timesteps=5), "betas"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_key(build, key):
    s = make_schedule("linear", 10)
    with pytest.raises(ConfigError) as err:
        build(s)
    assert err.value.key == key


# ---------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_yaml_instantiates(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = CONFIGS / "schedule" / f"{name}.yaml"
    assert path.read_text().startswith("# @package schedule\n")
    sched = instantiate(OmegaConf.load(path))
    assert isinstance(sched, NoiseSchedule) and sched.timesteps == 1000
    assert torch.equal(sched.betas, getattr(schedules, name)(1000))


@pytest.mark.parametrize("name, cls, num_steps", [("ddpm", DDPMSampler, 1000), ("ddim", DDIMSampler, 50)])
def test_sampler_yaml_instantiates(name, cls, num_steps, linear1000):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = CONFIGS / "sampler" / f"{name}.yaml"
    assert path.read_text().startswith("# @package sampler\n")
    sampler = instantiate(OmegaConf.load(path))(linear1000)  # _partial_: the model passes its schedule
    assert type(sampler) is cls and sampler.num_steps == num_steps and sampler.clip_denoised is True
