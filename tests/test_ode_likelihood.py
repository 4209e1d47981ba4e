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
