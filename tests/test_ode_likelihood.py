"""The ODE log-likelihood against closed forms: Gaussian data under its exact flow-matching velocity.

Data x_1 ~ N(mu, Sigma) (a full covariance), noise x_0 ~ N(0, I) independent, the linear path
x_t = (1 - t) x_0 + t x_1 (rectified flow, sigma_min = 0). Then

    x_t ~ N(t mu, C_t),  C_t = (1 - t)^2 I + t^2 Sigma,

and the marginal velocity is the conditional mean of x_1 - x_0 given x_t (Gaussian conditioning):
Cov(x_1 - x_0, x_t) = t Sigma - (1 - t) I, so

    v(x, t) = mu + M_t (x - t mu),  M_t = (t Sigma - (1 - t) I) C_t^{-1}.

(Check: the affine map x_t = t mu + C_t^{1/2} z has dx/dt = mu + (1/2) C_t' C_t^{-1} (x - t mu), and
C_t' / 2 = t Sigma - (1 - t) I; everything commutes, being a function of Sigma.) For Sigma = s^2 I
this is the brief's v = mu + (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2) (x - t mu). The Jacobian M_t
is symmetric and independent of x, and M_t = (1/2) d/dt log C_t, so

    integral_0^1 M_t dt = (1/2) log Sigma =: A  (matrix log; C_0 = I),

the exact log-density change is -tr A = -(1/2) log det Sigma (the Gaussian's normaliser), and one
Rademacher probe held along the solve estimates tr A by eps^T A eps, whose variance is
2 sum_{i != j} A_ij^2 (Hutchinson 1990; the diagonal terms are exact since eps_i^2 = 1).
"""

from __future__ import annotations

import math

import torch

from genexp.diffusion.ode_likelihood import (
    ODELogLikelihood,
    bits_per_dim,
    dequantize,
    ode_log_likelihood,
    standard_normal_log_prob,
)

F64 = torch.float64  # every tensor here is float64
MU = torch.tensor([0.5, -1.0, 0.25, 0.1], dtype=torch.float64)
L = torch.tensor(
    [[0.6, 0.0, 0.0, 0.0], [0.3, 0.5, 0.0, 0.0], [-0.2, 0.4, 0.7, 0.0], [0.1, -0.3, 0.2, 0.8]],
    dtype=torch.float64,
)
SIGMA = L @ L.T


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v(x, t) of the module docstring for x (N, ...) with C*H*W = 4, t (N,)."""
    flat = x.reshape(x.shape[0], -1)
    eye = torch.eye(4, dtype=x.dtype)
    tt = t.reshape(-1, 1, 1)
    cov = (1 - tt) ** 2 * eye + tt**2 * SIGMA  # (N, 4, 4)
    m = torch.linalg.solve(cov, tt * SIGMA - (1 - tt) * eye)  # C^{-1} (t Sigma - (1-t) I) = M_t (commute)
    centred = flat - t[:, None] * MU
    return (MU + torch.einsum("nij,nj->ni", m, centred)).reshape(x.shape)


def data(n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + torch.randn(n, 4, generator=g, dtype=F64) @ L.T


def analytic_log_prob(x1: torch.Tensor) -> torch.Tensor:
    return torch.distributions.MultivariateNormal(MU, SIGMA).log_prob(x1.reshape(x1.shape[0], -1))


def test_exact_trace_matches_the_gaussian_log_density():
    x1 = data()
    out = ode_log_likelihood(gaussian_velocity, x1, steps=32, divergence="exact", solver="rk4")
    assert isinstance(out, ODELogLikelihood)
    err = (out.log_prob - analytic_log_prob(x1)).abs() / 4  # nats/dim
    assert float(err.max()) < 1e-3  # the tolerance
    assert float(err.max()) < 1e-6  # RK4 with 32 steps on this smooth field: far inside it
    assert torch.equal(out.std_err, torch.zeros(3, dtype=F64))
    assert out.nfe == 4 * 32  # RK4: four evaluations per step


def test_exact_trace_on_image_shapes_and_the_other_solvers():
    x1 = data(2, seed=1).reshape(2, 1, 2, 2)  # (B, C, H, W), D = 4
    ref = analytic_log_prob(x1)
    for solver, steps, tol, nfe in [("midpoint", 64, 1e-3, 128), ("euler", 400, 1e-2, 400)]:
        out = ode_log_likelihood(gaussian_velocity, x1, steps=steps, divergence="exact", solver=solver)
        assert float((out.log_prob - ref).abs().max()) / 4 < tol, solver
        assert out.nfe == nfe
    out = ode_log_likelihood(gaussian_velocity, x1, divergence="exact", solver="dopri5", rtol=1e-8, atol=1e-8)
    assert float((out.log_prob - ref).abs().max()) < 1e-5
    assert 0 < out.nfe < 2000  # counted by the field wrapper: adaptive steps, every stage


def test_euler_is_first_order():
    """Halving Euler's step halves its error: the log-likelihood is integrated, not looked up."""
    x1 = data(2, seed=2)
    ref = analytic_log_prob(x1)
    errs = [
        float(
            (
                ode_log_likelihood(
                    gaussian_velocity, x1, steps=n, divergence="exact", solver="euler"
                ).log_prob
                - ref
            )
            .abs()
            .max()
        )
        for n in (50, 100)
    ]
    assert 1.7 < errs[0] / errs[1] < 2.3


def test_hutchinson_is_unbiased_and_its_standard_error_is_right():
    x1 = data(2, seed=3)
    exact = ode_log_likelihood(gaussian_velocity, x1, steps=16, divergence="exact").log_prob
    probes = 4000
    g = torch.Generator().manual_seed(0)
    est = ode_log_likelihood(gaussian_velocity, x1, steps=16, probes=probes, generator=g)
    assert est.nfe == 4 * 16  # the probes are stacked: one solve
    assert bool(((est.log_prob - exact).abs() < 3 * est.std_err).all())
    # the spread of one probe's estimate is known: Var eps^T A eps = 2 sum_{i != j} A_ij^2, A = log(Sigma) / 2
    lam, q = torch.linalg.eigh(SIGMA)
    a = q @ torch.diag(0.5 * lam.log()) @ q.T
    off = a - torch.diag(torch.diagonal(a))
    expected_se = math.sqrt(2 * float(off.pow(2).sum()) / probes)
    assert torch.allclose(est.std_err, torch.full((2,), expected_se, dtype=F64), rtol=0.1)
    # one probe: no spread to report
    one = ode_log_likelihood(gaussian_velocity, x1, steps=4, generator=torch.Generator().manual_seed(1))
    assert bool(one.std_err.isnan().all())


def test_runs_under_inference_mode():
    """Lightning validates and tests under torch.inference_mode(): the divergence still gets autograd."""
    x1 = data(2, seed=6)
    ref = ode_log_likelihood(gaussian_velocity, x1, steps=8, divergence="exact").log_prob
    with torch.inference_mode():
        x1 = x1.clone()  # an inference tensor, as a val batch is
        out = ode_log_likelihood(gaussian_velocity, x1, steps=8, divergence="exact")
    assert torch.equal(out.log_prob, ref)


def test_hutchinson_probes_follow_the_generator():
    x1 = data(2, seed=4)
    a, b = (
        ode_log_likelihood(
            gaussian_velocity, x1, steps=4, probes=3, generator=torch.Generator().manual_seed(5)
        )
        for _ in range(2)
    )
    assert torch.equal(a.log_prob, b.log_prob)


def test_bits_per_dim_hand_values():
    # the uniform density on [-1, 1)^D: log p(y) = -D log 2, every 8-bit level equally likely: 8 bits/dim
    d = 5
    assert torch.allclose(
        bits_per_dim(torch.tensor([-d * math.log(2.0)], dtype=F64), d), torch.tensor([8.0], dtype=F64)
    )
    # N(0, 1) at y = 0, D = 1: log p = -log(2 pi) / 2, so bpd = log2(2 pi) / 2 - log2(2) + log2(256)
    expected = 0.5 * math.log2(2 * math.pi) - 1 + 8  # 8.32574...
    assert (
        abs(float(bits_per_dim(standard_normal_log_prob(torch.zeros(1, 1, dtype=F64)), 1)) - expected) < 1e-12
    )
    assert abs(expected - 8.325748) < 1e-6
    # data_range 1 ([-1/2, 1/2)): the uniform density there has log p = 0, again 8 bits/dim
    assert torch.allclose(
        bits_per_dim(torch.zeros(1, dtype=F64), 3, data_range=1.0), torch.tensor([8.0], dtype=F64)
    )


def test_dequantize_keeps_each_level_in_its_bin():
    k = torch.arange(256, dtype=torch.float64).reshape(1, 1, 16, 16)
    x = k / 255
    assert torch.allclose(dequantize(x, noise=torch.zeros_like(x)), 2 * k / 256 - 1)
    y = dequantize(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.floor((y + 1) * 128), k)
    assert float(y.min()) >= -1 and float(y.max()) < 1


# --- DDPM's probability-flow ODE (genexp.diffusion.probability_flow) on Gaussian data --------------
#
# Data y ~ N(mu, S) with S = Sigma / 4 (a full covariance, so Hutchinson's estimate has a spread),
# D = 4 as (1, 2, 2) images, under DDPM's linear schedule at T = 1000 (a real NoiseSchedule). At a
# real step r the VP marginal is N(m_r, V_r), m_r = sqrt(abar(r)) mu, V_r = abar(r) S + (1 - abar(r)) I,
# and the exact eps-prediction is E[eps | x_r] = sqrt(1 - abar(r)) V_r^{-1} (x - m_r), with
# abar(r) = sigmoid(lambda(r)) of the flow's interpolation between the knots (exact at integer
# steps). The V_r commute (functions of S), so the probability-flow ODE maps step 0 to step T - 1 by
# the affine x_T = m_T + (V_T V_0^{-1})^{1/2} (x - m_0), and with the N(0, I) prior its value is
#     log N(x_T; 0, I) + (1/2) log det(V_T V_0^{-1});
# with the true prior N(m_T, V_T) it is log N(x; m_0, V_0), the density of the data at step 0.

DDPM_MU = 0.5 * MU
DDPM_S = SIGMA / 4
EIG, EIGVEC = torch.linalg.eigh(DDPM_S)


def linear_schedule():
    from genexp.diffusion import schedules
    from genexp.diffusion.noise_schedule import NoiseSchedule

    return NoiseSchedule(schedules.linear, timesteps=1000)


class ExactEps(torch.nn.Module):
    """eps-hat of the Gaussian data at real steps r, through the flow's own lambda(r); objective
    ``v`` returns E[v | x] = sqrt(abar) eps-hat - sqrt(1 - abar) x0-hat instead."""

    def __init__(self, schedule, objective="eps"):
        super().__init__()
        from genexp.diffusion.probability_flow import ProbabilityFlow

        self.flow, self.objective = ProbabilityFlow(None, schedule), objective

    def marginal(self, r):
        """abar (N, 1), m_r (N, 4), V_r (N, 4, 4)."""
        abar = torch.sigmoid(self.flow.lambda_of_step(r)).reshape(-1, 1)
        cov = abar[:, :, None] * DDPM_S + (1 - abar[:, :, None]) * torch.eye(4, dtype=F64)
        return abar, abar.sqrt() * DDPM_MU, cov

    def forward(self, x, r):
        abar, m, cov = self.marginal(r)
        flat = x.reshape(x.shape[0], 4)
        eps = (1 - abar).sqrt() * torch.linalg.solve(cov, flat - m)
        if self.objective == "v":
            x0 = (flat - (1 - abar).sqrt() * eps) / abar.sqrt()
            eps = abar.sqrt() * eps - (1 - abar).sqrt() * x0
        return eps.reshape(x.shape)


def gaussian_images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g, dtype=F64)
    return (DDPM_MU + z @ torch.linalg.cholesky(DDPM_S).T).reshape(n, 1, 2, 2)


def mvn_log_prob(x, mean, cov):
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(x.reshape(x.shape[0], 4))


def test_probability_flow_carries_the_step_0_density_to_the_step_T_density():
    from genexp.diffusion.probability_flow import ProbabilityFlow

    schedule = linear_schedule()
    net = ExactEps(schedule)
    flow = ProbabilityFlow(net, schedule, "eps")
    y = gaussian_images()
    a_t, m_t, v_t = net.marginal(torch.tensor([999.0], dtype=F64))
    a_0, m_0, v_0 = net.marginal(torch.tensor([0.0], dtype=F64))
    out = ode_log_likelihood(
        flow.velocity, y, lambda x: mvn_log_prob(x, m_t, v_t), steps=64, divergence="exact"
    )
    err = (out.log_prob - mvn_log_prob(y, m_0, v_0)).abs().max() / 4
    assert float(err) < 1e-6, float(err)  # RK4, 64 uniform log-SNR steps
    # the N(0, I) prior at the noisy end, as DDPM's nll uses: the closed form of the header
    out = ode_log_likelihood(flow.velocity, y, steps=64, divergence="exact")
    ratio = (a_t * EIG + 1 - a_t) / (a_0 * EIG + 1 - a_0)  # eigenvalues of V_T V_0^{-1}, (1, 4)
    a = EIGVEC @ torch.diag(ratio[0].sqrt()) @ EIGVEC.T
    x_t = m_t + (y.reshape(3, 4) - m_0) @ a.T
    ref = standard_normal_log_prob(x_t) + 0.5 * ratio.log().sum()
    assert float((out.log_prob - ref).abs().max()) / 4 < 1e-6
    # ... and the endpoint error against the data's own N(mu, S). In expectation over the data it is
    # -(KL(N(mu, S) || q_0) + KL(q_{T-1} || N(0, I))) / D = -(1.25e-6 + 1.67e-6) nats/dim (beta_0 = 1e-4
    # of noise at step 0; abar_{T-1} = 4.0e-5 of signal left at the noisy end); single images scatter
    # by about 1e-3 nats/dim, tails to 1e-2 (the prior scores the sqrt(abar_{T-1}) mu shift per image). On 256 images:
    y = gaussian_images(256, seed=5)
    out = ode_log_likelihood(flow.velocity, y, steps=32, divergence="exact")
    gap = (out.log_prob - mvn_log_prob(y, DDPM_MU, DDPM_S)) / 4
    assert float(gap.abs().max()) < 2e-2  # 7.9e-3 measured (a tail image)
    assert abs(float(gap.mean())) < 3 * float(gap.std()) / 16 + 1e-5  # mean 0 within 3 SE of 256


def test_probability_flow_converts_v_and_x0_predictions_at_real_steps():
    from genexp.diffusion.probability_flow import ProbabilityFlow

    schedule = linear_schedule()
    y = gaussian_images(4, seed=1)
    r = torch.tensor([0.0, 10.5, 500.25, 999.0], dtype=F64)
    lam = ProbabilityFlow(None, schedule).lambda_of_step(r)
    eps = ProbabilityFlow(ExactEps(schedule), schedule, "eps").eps(y, lam)
    from_v = ProbabilityFlow(ExactEps(schedule, "v"), schedule, "v").eps(y, lam)
    assert torch.allclose(from_v, eps, atol=1e-10)
    abar = torch.sigmoid(lam).reshape(-1, 1, 1, 1)
    x0_net = lambda x, t: (x - (1 - abar).sqrt() * eps) / abar.sqrt()  # noqa: E731
    from_x0 = ProbabilityFlow(x0_net, schedule, "x0").eps(y, lam)
    assert torch.allclose(from_x0, eps, atol=1e-8)


def ddpm_model(**kwargs):
    from functools import partial

    from genexp.diffusion.samplers import DDIMSampler
    from genexp.models.ddpm import DDPM

    schedule = linear_schedule()
    return DDPM(ExactEps(schedule), schedule, partial(DDIMSampler), image_size=2, channels=1, **kwargs)


def eight_bit(y):
    return torch.round(((y + 1) / 2).clamp(0, 1) * 255) / 255


def test_ddpm_ode_bpd_matches_the_exact_trace_within_its_standard_error():
    from genexp.diffusion.probability_flow import ProbabilityFlow, ode_bpd

    model = ddpm_model(likelihood="ode", ode_steps=32, ode_probes=200)
    x = eight_bit(gaussian_images(3, seed=2))
    bpd, se = model.ode_bpd(x, torch.Generator().manual_seed(0))
    flow = ProbabilityFlow(model.diffusion.net, model.diffusion.schedule, "eps")
    exact, zero, raw = ode_bpd(flow, x, 32, divergence="exact", generator=torch.Generator().manual_seed(0))
    assert torch.equal(zero, torch.zeros(3, dtype=F64)) and raw.nfe == 128
    assert bool(((bpd - exact).abs() < 3 * se).all())
    assert bool((se > 0).all() and (se < 0.1).all())  # 0.028 bits/dim with 200 probes
    assert torch.equal(model.nll_bpd(x, torch.Generator().manual_seed(0)), bpd)  # likelihood=ode


def test_ddpm_bound_stays_the_default():
    model = ddpm_model()
    assert model.likelihood == "bound"
    x = eight_bit(gaussian_images(2, seed=3))
    torch.manual_seed(0)
    got = model.nll_bpd(x, torch.Generator().manual_seed(1))  # the generator is the ODE's only
    torch.manual_seed(0)
    assert torch.equal(got, model.diffusion.bound_bpd(x * 2 - 1, model.bpd_timesteps))


def test_the_real_config_builds_the_ode_likelihood(tmp_path):
    """model.likelihood=ode through the real config and tiny UNet: finite bits/dim, the NFE spent,
    and the same number from the same generator (mean_bpd hands its seeded generator in)."""
    from conftest import compose_cfg, tiny

    from genexp.build import build_model
    from genexp.metrics.bpd import mean_bpd

    cfg = compose_cfg([*tiny("ddpm"), "model.likelihood=ode", "model.ode_steps=2"], tmp_path)
    model = build_model(cfg).eval()
    assert (model.likelihood, model.ode_probes) == ("ode", 2)
    images = torch.randint(
        0, 256, (2, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    a = mean_bpd(model, images, batch_size=2, device=torch.device("cpu"), seed=0)
    assert math.isfinite(a) and a > 0
    assert a == mean_bpd(model, images, batch_size=2, device=torch.device("cpu"), seed=0)
    bpd, se = model.ode_bpd(images.float() / 255, torch.Generator().manual_seed(1))
    assert bpd.shape == se.shape == (2,) and bool(torch.isfinite(se).all())
