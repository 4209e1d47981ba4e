"""Score SDEs' math in float64 against closed forms (Song et al. 2021), and tiny runs through the config.

Gaussian data make every score exact. Data x0 ~ N(μ, s² I); the forward SDE's marginal given x0 is
N(m_t x0, v_t I), so x_t ~ N(m_t μ, (m_t² s² + v_t) I) and

    ∇ log p_t(x) = −(x − m_t μ) / V_t,   V_t = m_t² s² + v_t,

i.e. the noise-predicting network ε(x, t) = −σ_t ∇ log p_t(x) = σ_t (x − m_t μ) / V_t (σ_t = √v_t).
The probability-flow ODE of this score is affine: with f = a(t) x (a = 0 for VE, −β/2 for VP),
y = x − m_t μ obeys dy/dt = a x − ṁ μ + g² y / (2 V) = (a + g² / (2 V)) y, and V obeys
dV/dt = 2 a V + g², so d log √V / dt is the same rate: x_t − m_t μ = √(V_t / V_1) (x_1 − m_1 μ).
The push of x_1 to t = ε is known exactly, and the pushforward of the prior N(0, p² I) is
N(m_ε μ − r m_1 μ, r² p² I) with r = √(V_ε / V_1): the ODE likelihood's reference.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from conftest import compose_cfg, tiny

from genexp.diffusion.noise_schedule import NoiseSchedule
from genexp.diffusion.ode_likelihood import bits_per_dim, dequantize
from genexp.diffusion.ode_solvers import HeunSolver, RK4Solver
from genexp.diffusion.pc import ContinuousTime, PCSampler
from genexp.diffusion.schedules import linear
from genexp.diffusion.sde import VESDE, VPSDE, SubVPSDE
from genexp.errors import ConfigError, GenexpError
from genexp.models.score_sde import ScoreSDE

MU, S = 0.3, 0.4  # data N(μ, s² I) in the [-1, 1] coordinates
SDES = {"ve": VESDE(0.01, 10.0), "vp": VPSDE(0.1, 20.0), "subvp": SubVPSDE(0.1, 20.0)}
F64 = torch.float64


def times(n: int = 11) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, n, dtype=F64)


def total_variance(sde, t: torch.Tensor) -> torch.Tensor:
    """V_t = m_t² s² + v_t of the Gaussian data's marginal."""
    return sde.mean_coef(t) ** 2 * S**2 + sde.variance(t)


def gaussian_eps(sde, mu: float = MU):
    """The exact ε(x, t) = σ_t (x − m_t μ) / V_t of N(μ, s² I) data (the module docstring)."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (-1, *([1] * (x.dim() - 1)))
        m, v = sde.mean_coef(t).reshape(shape), total_variance(sde, t).reshape(shape)
        return sde.std(t).reshape(shape) * (x - m * mu) / v

    return eps


def draws(n: int, d: int, seed: int, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return mean + var.sqrt() * (z - z.mean(0)) / z.std(0, correction=0)  # exactly the two moments


def test_marginals_match_their_closed_forms_written_out():
    """VE: m = 1, v = σ_min² ((σ_max/σ_min)^{2t} − 1); VP: m = exp(−B/2), v = 1 − exp(−B); sub-VP:
    v = (1 − exp(−B))², B(t) = β_min t + (β_max − β_min) t² / 2 (Song et al. 2021, eq. 29, 33, 17)."""
    t = times()
    ve, vp, sub = SDES["ve"], SDES["vp"], SDES["subvp"]
    torch.testing.assert_close(ve.variance(t), 0.01**2 * ((10.0 / 0.01) ** (2 * t) - 1))
    torch.testing.assert_close(ve.std(t[1:]) ** 2 + 0.01**2, (0.01 * (10.0 / 0.01) ** t[1:]) ** 2)
    big_b = 0.1 * t + 19.9 * t**2 / 2
    torch.testing.assert_close(vp.mean_coef(t), torch.exp(-big_b / 2))
    torch.testing.assert_close(vp.variance(t), 1 - torch.exp(-big_b))
    torch.testing.assert_close(sub.variance(t), (1 - torch.exp(-big_b)) ** 2)
    x0 = torch.randn(11, 3, dtype=F64)
    mean, std = vp.marginal_prob(x0, t)
    torch.testing.assert_close(mean, torch.exp(-big_b / 2)[:, None] * x0)
    assert std.shape == (11,)


@pytest.mark.parametrize("name", list(SDES))
def test_marginals_solve_the_forward_sdes_moment_odes(name):
    """With f = a(t) x, the moments of x(t) | x(0) obey dm/dt = a m, dv/dt = 2 a v + g² (m(0) = 1,
    v(0) = 0): RK4 with 500 steps on the SDE's own f and g reproduces m_t and v_t to 1e-8."""
    sde = SDES[name]
    one = torch.ones(1, 1, dtype=F64)

    def field(state, t):
        tt = torch.full((1,), t, dtype=F64)
        f, g = sde.sde(one, tt)
        a = f[0, 0]  # the drift of x = 1 is a(t)
        return torch.stack([a * state[0], 2 * a * state[1] + g[0] ** 2])

    state, h, n = torch.tensor([1.0, 0.0], dtype=F64), 1.0 / 500, 500
    for i in range(n):
        t = i * h
        k1 = field(state, t)
        k2 = field(state + h / 2 * k1, t + h / 2)
        k3 = field(state + h / 2 * k2, t + h / 2)
        k4 = field(state + h * k3, t + h)
        state = state + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if (i + 1) % 100 == 0:
            tt = torch.full((1,), (i + 1) * h, dtype=F64)
            assert abs(state[0] - sde.mean_coef(tt)[0]) < 1e-8
            assert abs(state[1] - sde.variance(tt)[0]) < 1e-8 * max(1.0, float(sde.variance(tt)[0]))


def test_sub_vp_variance_never_exceeds_the_vp_variance():
    t = torch.linspace(0.0, 1.0, 1001, dtype=F64)
    vp, sub = SDES["vp"].variance(t), SDES["subvp"].variance(t)
    assert (sub <= vp).all() and (sub[1:] < vp[1:]).all()
    torch.testing.assert_close(SDES["vp"].mean_coef(t), SDES["subvp"].mean_coef(t))


def test_reverse_sde_and_probability_flow_drifts():
    """reverse(score).sde = (f − g² s, g); with probability_flow = (f − g² s / 2, 0) = ode_drift."""
    sde, x, t = SDES["vp"], torch.randn(4, 2, dtype=F64), torch.full((4,), 0.3, dtype=F64)
    s = -x / 2
    f, g = sde.sde(x, t)
    drift, diffusion = sde.reverse(lambda x, t: -x / 2).sde(x, t)
    torch.testing.assert_close(drift, f - (g**2)[:, None] * s)
    torch.testing.assert_close(diffusion, g)
    pf = sde.reverse(lambda x, t: -x / 2, probability_flow=True).sde(x, t)
    torch.testing.assert_close(pf.drift, sde.ode_drift(x, t, s))
    torch.testing.assert_close(pf.diffusion, torch.zeros(4, dtype=F64))


class GaussianNet(torch.nn.Module):
    """The exact ε of N(μ, s²) data under ``sde``, with the UNet's (x, t · time_scale) signature."""

    def __init__(self, sde, time_scale: float = 999.0):
        super().__init__()
        self.eps, self.time_scale = gaussian_eps(sde), time_scale
        self.unused = torch.nn.Parameter(torch.zeros((), dtype=F64))

    def forward(self, x, t):
        return self.eps(x.double(), t.double() / self.time_scale).to(x.dtype)


def model_for(name: str, solver=None, **kwargs) -> ScoreSDE:
    sde = SDES[name]
    return ScoreSDE(
        GaussianNet(sde), sde, functools.partial(PCSampler, steps=2), solver or RK4Solver(64), 4, 1, **kwargs
    )


@pytest.mark.parametrize("name", list(SDES))
def test_probability_flow_ode_pushes_the_prior_exactly(name):
    """The PF-ODE of the exact score (through the model's solver time u, t = SDE.ode_time(u): log-σ steps)
    maps x_1 to m_ε μ + √(V_ε / V_1) (x_1 − m_1 μ) (the module docstring) within 1e-5 by RK4-64
    (measured: 1.0e-6 on VP, where β(t) reaches 20; less on VE and sub-VP)."""
    model = model_for(name)
    sde, eps = model.sde, model.eps
    x1 = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * 2
    one, end = torch.ones(1, dtype=F64), torch.full((1,), eps, dtype=F64)
    r = (total_variance(sde, end) / total_variance(sde, one)).sqrt()
    exact = sde.mean_coef(end) * MU + r * (x1 - sde.mean_coef(one) * MU)
    result = model.integrate(x1)
    assert result.nfe == 256
    assert (result.x - exact).abs().max() < 1e-5


# the SDE, predictor, corrector, predictor steps
SLOW = pytest.mark.slow  # 2-3 s each on one core: two cases run by default, every one with -m slow
PC_CASES = [
    ("ve", "reverse_diffusion", "langevin", 100),
    ("vp", "euler_maruyama", "none", 100),
    pytest.param("ve", "euler_maruyama", "none", 100, marks=SLOW),
    pytest.param("vp", "reverse_diffusion", "langevin", 100, marks=SLOW),
    pytest.param("subvp", "euler_maruyama", "langevin", 100, marks=SLOW),
    pytest.param("subvp", "reverse_diffusion", "none", 200, marks=SLOW),  # Euler's f, G: 1 % off at 100
]
N, D = 2000, 64  # draws x dimensions


@pytest.mark.parametrize("name,predictor,corrector,steps", PC_CASES)
def test_pc_sampler_and_the_probability_flow_reach_the_gaussian_target(name, predictor, corrector, steps):
    """From x_1 drawn from the exact marginal N(m_1 μ, V_1) (standardised per dimension), PC with the
    exact score ends at N(m_ε μ, V_ε) at t = ε: the mean of the 128,000 values within 0.012 √V_ε
    (4 standard errors) and the std within 0.6 % of √V_ε (1 + snr² / 2) with the corrector, √V_ε
    without. The snr² / 2 is Langevin's own bias: a step x + e s + √(2e) z with e = 2 r² V (what
    e = 2 (r ||z|| / ||s||)² is for Gaussian data) keeps N(m, V (1 − e / 2V)^-1), std 1 + r² / 2 =
    1.0128 at r = 0.16 (measured 1.013-1.016 at 100 steps; without the corrector 0.998-1.004). The
    probability-flow ODE from the same x_1 lands on the target exactly (up to RK4: 1e-6): the
    reverse SDE's and the PF-ODE's means agree within 0.012 √V_ε."""
    sde = SDES[name]
    eps = sde.default_eps
    one, end = torch.ones(1, dtype=F64), torch.full((1,), eps, dtype=F64)
    x1 = draws(N, D, 1, sde.mean_coef(one) * MU, total_variance(sde, one))
    sampler = PCSampler(ContinuousTime(sde, eps), predictor, corrector, 0.16, steps, 1)
    x = sampler.sample(gaussian_eps(sde), x1, torch.Generator().manual_seed(2))
    target_mean, target_std = float(sde.mean_coef(end) * MU), float(total_variance(sde, end).sqrt())
    assert sampler.nfe == steps * (2 if corrector == "langevin" else 1)
    inflation = 0.16**2 / 2 if corrector == "langevin" else 0.0
    ode = model_for(name).integrate(x1.reshape(N, D, 1, 1)).x.reshape(N, D)
    for out, std_tol, expected in ((x, 6e-3, 1 + inflation), (ode, 1e-5, 1.0)):
        assert abs(out.mean().item() - target_mean) < 0.012 * target_std, (out.mean(), target_mean)
        assert abs(out.std(correction=0).item() / target_std - expected) < std_tol, (out.std(), target_std)
    assert abs(x.mean().item() - ode.mean().item()) < 0.012 * target_std


@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_ode_likelihood_equals_the_analytic_log_density(solver):
    """The ODE log-likelihood of the dequantised images y under the exact VP score equals the
    pushforward of the prior N(0, I), N(m_ε μ − r m_1 μ, r² I) with r = √(V_ε / V_1) (the module
    docstring), to 1e-3 nats/dim by RK4 with 64 steps and by adaptive dopri5 (steps ignored: 2 given).
    The field's Jacobian is c_t I, so Hutchinson's probes are exact (standard error 0). The first
    draw of the generator is the dequantisation."""
    steps = 64 if solver == "rk4" else 2
    model = model_for("vp", bpd_steps=steps, bpd_probes=4, bpd_solver=solver, bpd_tol=1e-6)
    sde, eps = model.sde, model.eps
    x = torch.randint(80, 180, (3, 1, 4, 4), generator=torch.Generator().manual_seed(7)).double() / 255
    bpd, std_err = model.ode_bpd(x, torch.Generator().manual_seed(8))
    y = dequantize(x, generator=torch.Generator().manual_seed(8))
    one, end = torch.ones(1, dtype=F64), torch.full((1,), eps, dtype=F64)
    r = float((total_variance(sde, end) / total_variance(sde, one)).sqrt())
    mean = float(sde.mean_coef(end) * MU - r * sde.mean_coef(one) * MU)
    exact = -0.5 * (((y - mean) / r) ** 2 + math.log(2 * math.pi * r**2)).flatten(1).sum(1)
    reference = bits_per_dim(exact, 16)
    assert torch.equal(std_err, torch.zeros(3, dtype=F64))
    assert ((bpd - reference).abs() * math.log(2) < 1e-3).all(), (bpd, reference)
    assert torch.equal(model.nll_bpd(x, torch.Generator().manual_seed(8)), bpd)


def test_a_negative_bits_per_dim_warns_that_the_likelihood_ode_is_not_converged(monkeypatch):
    """Below 0 bits/dim is impossible for 8-bit data (E_u[-log2 p(x + u)] >= -log2 P(x) >= 0): a
    prior density raised by 10 nats per dimension stands in for a solver's error (the trained VE
    run's 32-step RK4 gave -6.6). The exact field's estimate (above 0) warns nothing."""
    model = model_for("vp", bpd_steps=4, bpd_probes=2)
    x = torch.randint(80, 180, (3, 1, 4, 4), generator=torch.Generator().manual_seed(7)).double() / 255
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (model.ode_bpd(x, torch.Generator().manual_seed(1))[0] > 0).all()
    prior = model.bpd_prior
    monkeypatch.setattr(model, "bpd_prior", lambda x0: prior(x0) + 10.0 * x0[0].numel())
    with pytest.warns(
        RuntimeWarning, match=r"< 0 is impossible .* raise model.bpd_steps .*model.bpd_solver=dopri5"
    ):
        model.ode_bpd(x, torch.Generator().manual_seed(1))
    model.bpd_solver = "dopri5"
    with pytest.warns(RuntimeWarning, match=r"< 0 is impossible .* lower model.bpd_tol"):
        model.ode_bpd(x, torch.Generator().manual_seed(1))


def test_dsm_with_sigma_squared_weighting_is_ddpms_simple_loss():
    """The talk's "the training objective is the same": with s_θ = −ε_θ / σ_t, λ(t) = σ_t² and
    ∇ log p_0t(x_t | x_0) = −z / σ_t, λ ||s_θ − ∇ log p_0t||² = ||ε_θ − z||² on the same tensors,
    for any ε_θ (a random linear map here). And DDPM's linear schedule (β from 1e-4 to 0.02,
    T = 1000) is the VP SDE with β_min = 0.1, β_max = 20 sampled at t_i = (i + 1) / T: ᾱ_i and
    m(t_i)² agree within 2e-3 (measured 1.1e-3; the discrete product vs the integral's Riemann sum)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 16, generator=g, dtype=F64) / 4

    class LinearNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(weight.clone())

        def forward(self, x, t):
            return (x.flatten(1) @ self.w).reshape(x.shape) * (1 + t[:, None, None, None] / 999)

    sde = VPSDE(0.1, 20.0)
    model = ScoreSDE(LinearNet(), sde, functools.partial(PCSampler, steps=2), HeunSolver(2), 4, 1)
    x0, z = (
        torch.rand(5, 1, 4, 4, generator=g, dtype=F64) * 2 - 1,
        torch.randn(5, 1, 4, 4, generator=g, dtype=F64),
    )
    t = torch.rand(5, generator=g, dtype=F64) * 0.99 + 0.01
    mean, std = sde.marginal_prob(x0, t)
    x_t = mean + std[:, None, None, None] * z
    eps_hat = model.net(x_t, t * 999)
    score_form = (std**2)[:, None, None, None] * (model.score(x_t, t) + z / std[:, None, None, None]) ** 2
    torch.testing.assert_close(model.dsm(x0, t, z), score_form.flatten(1).mean(1))
    torch.testing.assert_close(model.dsm(x0, t, z), (eps_hat - z).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(model.score(x_t, t), -eps_hat / std[:, None, None, None])
    schedule = NoiseSchedule(linear, 1000)
    t_i = (torch.arange(1000, dtype=F64) + 1) / 1000
    assert (schedule.alphas_cumprod - sde.mean_coef(t_i) ** 2).abs().max() < 2e-3


def test_pc_sampler_reads_a_ddpm_eps_net_as_the_score_of_its_chain():
    """On a DDPM schedule (T = 100) the PC sampler takes ε(x_t, t) at the chain's long timesteps,
    s = −ε / √(1 − ᾱ_t): with the exact ε of N(μ, s²) data under the chain's own marginals
    (m = √ᾱ_t, v = 1 − ᾱ_t), 100 reverse-diffusion steps + 1 Langevin step each reach N(μ, s²)
    (the mean of 128,000 values within 0.012 s; std within 0.6 % of s (1 + snr² / 2): Langevin's bias,
    see the test above), spending 200
    evaluations; DDIM's grid when steps < T."""
    schedule = NoiseSchedule(linear, 100)
    abar = schedule.alphas_cumprod
    seen = []

    def eps(x, t):
        assert t.dtype == torch.long
        seen.append(int(t[0]))
        a = abar[t][:, None]  # (B, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)

    x_T = draws(N, D, 4, abar[-1].sqrt() * MU, abar[-1] * S**2 + 1 - abar[-1])
    sampler = PCSampler(schedule, "reverse_diffusion", "langevin", 0.16, 100, 1)
    x = sampler.sample(eps, x_T, torch.Generator().manual_seed(5))
    assert sampler.nfe == len(seen) == 200 and seen[:2] == [99, 99] and seen[-1] == 0
    assert abs(x.mean().item() - MU) < 0.012 * S, x.mean()
    assert abs(x.std(correction=0).item() / S - (1 + 0.16**2 / 2)) < 6e-3, x.std()
    assert PCSampler(schedule, steps=5).grid == [99, 74, 50, 25, 0, -1]
    with pytest.raises(ConfigError, match="timesteps"):
        PCSampler(schedule, steps=101)


def test_nfe_and_steps_for_nfe():
    process = ContinuousTime(SDES["vp"], 1e-3)
    assert PCSampler(process, steps=10, corrector_steps=2).nfe == 30
    assert PCSampler(process, steps=10, corrector="none", corrector_steps=3).nfe == 10
    assert PCSampler.steps_for_nfe(64) == 32  # the node's defaults: langevin, 1 corrector step
    assert PCSampler.steps_for_nfe(64, corrector="langevin", corrector_steps=3) == 16
    assert PCSampler.steps_for_nfe(64, corrector="none", corrector_steps=3) == 64
    assert PCSampler.steps_for_nfe(1, corrector_steps=1) == 0


def test_bad_values_are_refused_naming_the_key():
    process = ContinuousTime(SDES["vp"], 1e-3)
    for make, key in [
        (lambda: VESDE(1.0, 0.5), "sigma_max"),
        (lambda: VESDE(0.0, 1.0), "sigma_min"),
        (lambda: VPSDE(20.0, 0.1), "beta_max"),
        (lambda: SubVPSDE(1.0, 1.0), "beta_max"),
        (lambda: PCSampler(process, snr=0), "snr"),
        (lambda: PCSampler(process, corrector_steps=0), "corrector_steps"),
        (lambda: PCSampler(process, steps=0), "steps"),
        (lambda: PCSampler(process, predictor="ancestral"), "predictor"),
        (lambda: model_for("vp", sample_with="both"), "sample_with"),
        (lambda: model_for("vp", eps=0), "eps"),
    ]:
        with pytest.raises(ConfigError) as err:
            make()
        assert err.value.key == key
    PCSampler(process, corrector="none", corrector_steps=0)  # no corrector: no steps needed


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["sde=ve", "sde.sigma_min=60"], "model.sde.sigma_max=50.0: must be > sigma_min"),
        (["sde.beta_min=30"], "model.sde.beta_max=20.0: must be > beta_min"),
        (["sampler=ddim"], "model.sampler='DDIMSampler': score_sde samples its reverse SDE with sampler=pc"),
        (["sampler.snr=0"], "model.sampler.snr=0: must be > 0"),
        (["sampler.corrector_steps=0"], "model.sampler.corrector_steps=0: the langevin corrector needs"),
        (["sampler.steps=0"], "model.sampler.steps=0: must be >= 1"),
    ],
)
def test_the_real_config_refuses_bad_values_in_one_line(overrides, message, tmp_path):
    from genexp.build import build_model
    from genexp.errors import GenexpError

    with pytest.raises(GenexpError) as err:
        build_model(compose_cfg([*tiny("score_sde"), *overrides], tmp_path))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("sde", ["ve", "subvp"])
def test_every_sde_option_composes_and_builds(sde, tmp_path):
    from genexp.build import build_model

    model = build_model(compose_cfg([*tiny("score_sde"), f"sde={sde}"], tmp_path))
    assert type(model.sde).__name__ == {"ve": "VESDE", "subvp": "SubVPSDE"}[sde]
    assert model.eps == type(model.sde).default_eps


def test_a_tiny_run_checkpoints_samples_both_ways_and_reports_bpd(tiny_cfg, tmp_path):
    """``genexp train model=score_sde``: test/bpd by the ODE; ``genexp sample sampler=pc`` on its run
    (NFE in the meta); the probability flow with Heun through the stored config's solver node."""
    from test_sample_cli import compose_app, load_npz

    from genexp.checkpoints import load_model
    from genexp.commands.sample import sample
    from genexp.commands.train import train

    run = tmp_path / "run"
    metrics = train(tiny_cfg("~callbacks.sample_grid", model="score_sde"))
    assert metrics["global_step"] == 3 and math.isfinite(metrics["test"]["test/loss"])
    assert metrics["test"]["test/bpd"] > 0
    pc = sample(compose_app("sample", [f"ckpt={run}", "n=3", "sampler=pc", "sampler.steps=3"]))
    meta = load_npz(pc.npz)[1]["sampler"]
    assert meta["name"] == "PCSampler" and meta["nfe"] == 6
    heun = {"_target_": "genexp.diffusion.ode_solvers.HeunSolver", "steps": 3}
    loaded = load_model(run, {"model.sample_with": "ode", "model.solver": heun})
    images = loaded.model.sample(3, torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 16, 16) and loaded.model.nfe_log == [6]
    # genexp sample solver=heun: the family node's selects switch it to the ODE (model.sample_with=ode)
    ode = sample(compose_app("sample", [f"ckpt={run}", "n=3", "solver=heun", "solver.steps=3"]))
    meta = load_npz(ode.npz)[1]["sampler"]
    assert meta["name"] == "HeunSolver" and meta["nfe"] == 6
    with pytest.raises(GenexpError) as err:  # both at once: which way to sample is ambiguous
        sample(compose_app("sample", [f"ckpt={run}", "n=3", "solver=heun", "sampler=pc"]))
    assert str(err.value).startswith("sampler, solver: score_sde samples with one of them at a time")
    # the NFE sweep steps the node the run samples with (PC by default), or the one passed
    from genexp.commands.evaluate import evaluate

    fast = ["metrics=[fid]", "eval.num_samples=8", "eval.kid_subset_size=4", "eval.classifier_epochs=1"]
    fast += ["eval.speed_repeats=1", "eval.speed_batch_size=2"]
    for extra, name, spent in (([], "PCSampler", [4, 8]), (["solver=euler"], "EulerSolver", [4, 8])):
        evaluation, _ = evaluate(
            compose_app(
                "evaluate", [f"ckpt={run}", "nfe=[4,8]", *fast, *extra, f"out={tmp_path}/e{name}.json"]
            )
        )
        table = evaluation["nfe_sweep"]
        assert table["name"] == name and [row["nfe"] for row in table["rows"]] == spent


def test_sample_draws_a_trained_ddpm_run_with_the_pc_sampler(tiny_cfg, tmp_path):
    """One network sampled both ways: ``genexp sample ckpt=<ddpm run> sampler=pc`` reads its ε-net as
    the score of its chain (T = 20 in the tiny config): 4 steps + 1 Langevin step each = 8 NFE."""
    from test_sample_cli import compose_app, load_npz

    from genexp.commands.sample import sample
    from genexp.commands.train import train

    run = tmp_path / "run"
    train(tiny_cfg("~callbacks.sample_grid", "trainer.limit_train_batches=1", model="ddpm"))
    out = sample(compose_app("sample", [f"ckpt={run}", "n=3", "sampler=pc", "sampler.steps=4"]))
    images, meta = load_npz(out.npz)
    assert meta["sampler"]["name"] == "PCSampler" and meta["sampler"]["nfe"] == 8


@pytest.mark.parametrize("name", list(SDES))
def test_the_likelihood_time_grid_runs_from_one_to_eps_with_its_derivative(name):
    """SDE.ode_time: t(0) = 1, t(1) = ε, t decreasing, dt/du equal to a central difference; VP and
    sub-VP are uniform in log t (σ_t² ≈ β_min t near 0), VE uniform in t (σ(t) geometric already)."""
    sde, eps = SDES[name], SDES[name].default_eps
    u = torch.linspace(0, 1, 11, dtype=F64)
    t, dt_du = sde.ode_time(u, eps)
    assert t[0].item() == pytest.approx(1.0) and t[-1].item() == pytest.approx(eps)
    assert (t.diff() < 0).all()
    h = 1e-6
    central = (sde.ode_time(u + h, eps)[0] - sde.ode_time(u - h, eps)[0]) / (2 * h)
    assert torch.allclose(dt_du, central, rtol=1e-6)
    spacing = t.log().diff() if name != "ve" else t.diff()
    assert torch.allclose(spacing, spacing[0].expand_as(spacing))
