"""Flow matching's math in float64 against closed forms: the paths, the ODE solvers' accuracy and
order, the OT coupling, the time sampling; and one tiny run through the real config.

Gaussian data makes the marginal velocity closed form. Data x1 ~ N(μ, s² I), noise x0 ~ N(0, I),
path x_t = α_t x1 + σ_t x0: x_t is Gaussian, N(α_t μ, (α_t² s² + σ_t²) I), and jointly Gaussian
with (x0, x1), so the marginal velocity v(x, t) = E[α'_t x1 + σ'_t x0 | x_t = x] is
(Cov(x1, x_t) = α s², Cov(x0, x_t) = σ, Var(x_t) = α² s² + σ²)

    v(x, t) = α' μ + (α α' s² + σ σ') / (α² s² + σ²) · (x − α μ).

For the linear path with σ_min = 0 (α = t, σ = 1 − t, α' = 1, σ' = −1):
v(x, t) = μ + (t s² − (1 − t)) / ((1 − t)² + t² s²) · (x − t μ). Its flow is
x_t = t μ + r_t x0 with r_t = √((1 − t)² + t² s²) (d/dt: μ + r'_t x0, r'_t = (t s² − (1 − t)) / r_t,
and x − t μ = r_t x0), so the exact push of x0 to t = 1 is μ + s x0: the reference of the order tests.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import compose_cfg, tiny

from genexp.diffusion.coupling import independent, minibatch_ot, transport_cost
from genexp.diffusion.ode_likelihood import bits_per_dim, dequantize
from genexp.diffusion.ode_solvers import (
    Dopri5Solver,
    EulerSolver,
    HeunSolver,
    MidpointSolver,
    RK4Solver,
)
from genexp.diffusion.paths import CosinePath, LinearPath, logit_normal_time, uniform_time
from genexp.errors import ConfigError
from genexp.models.flow_matching import FlowMatching

MU, S = 0.7, 0.4  # data N(μ, s² I) in the [-1, 1] coordinates


def gaussian_velocity(path, mu: float = MU, s: float = S):
    """The marginal velocity of N(0, I) -> N(mu, s² I) under ``path`` (the module docstring's formula)."""

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (-1, *([1] * (x.dim() - 1)))
        a, sg = path.alpha(t).reshape(shape), path.sigma(t).reshape(shape)
        da, ds = path.d_alpha(t).reshape(shape), path.d_sigma(t).reshape(shape)
        return da * mu + (a * da * s**2 + sg * ds) / (a**2 * s**2 + sg**2) * (x - a * mu)

    return v


def x0_fixed(n: int = 8, d: int = 3) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize(
    "path", [LinearPath(), LinearPath(0.1), CosinePath()], ids=["linear", "sigma_min", "cosine"]
)
def test_path_target_is_the_time_derivative_of_the_interpolant(path):
    """u_t = d x_t / dt (central differences, O(h²) ≈ 1e-12), and the ends: x_0 = x0, x_1 = x1 + σ_min x0."""
    g = torch.Generator().manual_seed(1)
    x0, x1 = (
        torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64),
    )
    t, h = torch.rand(5, generator=g, dtype=torch.float64) * 0.98 + 0.01, 1e-6
    numeric = (path.interpolate(x0, x1, t + h) - path.interpolate(x0, x1, t - h)) / (2 * h)
    torch.testing.assert_close(path.target_velocity(x0, x1, t), numeric, rtol=1e-7, atol=1e-7)
    ones, zeros = torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    torch.testing.assert_close(path.interpolate(x0, x1, zeros), x0)
    torch.testing.assert_close(path.interpolate(x0, x1, ones), x1 + getattr(path, "sigma_min", 0.0) * x0)


def test_linear_path_velocity_matches_the_closed_form_written_out():
    """The generic formula at α = t, σ = 1 − t is μ + (t s² − (1 − t)) / ((1 − t)² + t² s²) (x − t μ)."""
    x, t = x0_fixed(), torch.full((8,), 0.3, dtype=torch.float64)
    written = MU + (0.3 * S**2 - 0.7) / (0.7**2 + 0.3**2 * S**2) * (x - 0.3 * MU)
    torch.testing.assert_close(gaussian_velocity(LinearPath())(x, t), written)


SOLVERS = {
    # solver class, NFE per step, global order
    "euler": (EulerSolver, 1, 1),
    "midpoint": (MidpointSolver, 2, 2),
    "heun": (HeunSolver, 2, 2),
    "rk4": (RK4Solver, 4, 4),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_fixed_step_solvers_converge_with_their_order(name):
    """The error of pushing fixed x0 to t = 1 (exact: μ + s x0) falls as steps^-p: the log-log slope
    over 16..128 steps is -p within 0.15, and the NFE is steps × stages.

    On the cosine path (measured: Euler -0.97, midpoint -2.07, Heun -1.97, RK4 -4.09). The linear
    path's field is too kind to midpoint (its h² error term cancels: measured slope -3.0), so it
    would not show the method's order."""
    cls, stages, order = SOLVERS[name]
    x0, v = x0_fixed(), gaussian_velocity(CosinePath())
    exact = MU + S * x0
    steps = [16, 32, 64, 128]
    errors = []
    for n in steps:
        result = cls(n)(v, x0)
        assert result.nfe == n * stages
        errors.append((result.x - exact).abs().max().item())
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope == pytest.approx(-order, abs=0.15), (name, slope, errors)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_fixed_step_solvers_land_on_the_data_distribution(name):
    """20,000 draws of N(0, I) in 2-d, standardised (sample mean 0, std 1 per dimension, so the exact
    push μ + s x0 has mean μ and std s exactly), end after 128 steps on N(μ, s²) on both paths:
    mean within 0.01 and std within 2 % (Euler's O(h) bias at 128 steps: 1.7 % on the linear path;
    the second- and fourth-order solvers within 0.1 %)."""
    tolerance = 0.02 if name == "euler" else 1e-3
    for path in (LinearPath(), CosinePath()):
        x0 = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        x0 = (x0 - x0.mean(0)) / x0.std(0)
        x1 = SOLVERS[name][0](128)(gaussian_velocity(path), x0).x
        assert (x1.mean(0) - MU).abs().max() < tolerance / 2
        assert (x1.std(0) / S - 1).abs().max() < tolerance


def test_dopri5_reaches_its_tolerance_and_reports_the_nfe_it_spent():
    """Dormand-Prince at rtol = atol = 1e-8 lands within 1e-6 of the exact push; a looser tolerance
    spends fewer evaluations; the NFE is the count of field calls."""
    x0, v = x0_fixed(), gaussian_velocity(LinearPath())
    calls = []

    def counted(x, t):
        calls.append(t)
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype
        return v(x, t)

    tight = Dopri5Solver(rtol=1e-8, atol=1e-8)(counted, x0)
    assert (tight.x - (MU + S * x0)).abs().max() < 1e-6
    assert tight.nfe == len(calls) > 6
    loose = Dopri5Solver(rtol=1e-3, atol=1e-3)(v, x0)
    assert 0 < loose.nfe < tight.nfe
    assert (loose.x - (MU + S * x0)).abs().max() < 1e-2


def test_solvers_integrate_backwards_too():
    """From the data end back to noise (the ODE likelihood's direction): RK4 inverts its forward push."""
    x0, v = x0_fixed(), gaussian_velocity(CosinePath())
    forward = RK4Solver(40)(v, x0).x
    torch.testing.assert_close(RK4Solver(40)(v, forward, 1.0, 0.0).x, x0, rtol=1e-7, atol=1e-7)


def test_solver_arguments_are_checked():
    for make in (
        lambda: EulerSolver(0),
        lambda: RK4Solver(2.5),
        lambda: Dopri5Solver(rtol=0),
        lambda: Dopri5Solver(atol=-1),
    ):
        with pytest.raises(ConfigError):
            make()


def test_minibatch_ot_is_the_optimal_permutation_and_lowers_the_cost():
    """On 6 pairs the Hungarian pairing equals the brute-force optimum over all 720 permutations; on
    64 pairs it lowers the mean squared transport cost versus the independent pairing, keeping the
    same noise (a permutation of it)."""
    g = torch.Generator().manual_seed(3)
    x0, x1 = (
        torch.randn(6, 4, generator=g, dtype=torch.float64),
        torch.randn(6, 4, generator=g, dtype=torch.float64) + 1,
    )
    cost = transport_cost(x0, x1)
    best = min(sum(cost[p[i], i].item() for i in range(6)) for p in itertools.permutations(range(6)))
    paired = minibatch_ot(x0, x1)
    assert (paired - x1).pow(2).sum().item() == pytest.approx(best, rel=1e-12)
    x0, x1 = (
        torch.randn(64, 2, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(64, 2, 4, 4, generator=g, dtype=torch.float64),
    )
    ot = minibatch_ot(x0, x1)
    assert torch.equal(ot.flatten(1).sort(0).values, x0.flatten(1).sort(0).values)
    independent_cost = (independent(x0, x1) - x1).pow(2).flatten(1).sum(1).mean()
    assert (ot - x1).pow(2).flatten(1).sum(1).mean() < 0.9 * independent_cost


def test_time_sampling_distributions():
    """Uniform: mean 1/2. Logit-normal t = sigmoid(N(0, 1)): median 1/2 and P(t <= sigmoid(1)) = Φ(1)
    = 0.8413 (within 0.005 on 100,000 draws: 3.3 standard errors of 0.0012)."""
    like = torch.zeros((), dtype=torch.float64)
    u = uniform_time(100_000, like, torch.Generator().manual_seed(4))
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.005
    t = logit_normal_time(100_000, like, torch.Generator().manual_seed(5))
    assert t.dtype == torch.float64 and 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.005
    phi_1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert abs((t <= torch.sigmoid(torch.tensor(1.0))).double().mean().item() - phi_1) < 0.005


class GaussianNet(torch.nn.Module):
    """A 'network' returning the exact velocity of N(μ, s²) data, with the UNet's time argument."""

    def __init__(self, path, time_scale: float, mu: float = MU, s: float = S):
        super().__init__()
        self.v, self.time_scale = gaussian_velocity(path, mu, s), time_scale
        self.unused = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, t):
        return self.v(x.double(), t.double() / self.time_scale).to(x.dtype)


def test_model_samples_the_data_through_its_solver_and_logs_the_nfe():
    """With the exact field of N(0.2, 0.2²) data the model's samples are (x + 1) / 2 in [0, 1]:
    mean 0.6, std 0.1 (4 std from the clamp at 1), with t scaled into the net by time_scale; each
    sample call records its NFE."""
    model = FlowMatching(GaussianNet(CosinePath(), 1000.0, 0.2, 0.2), HeunSolver(32), 4, 1, path="cosine")
    images = model.sample(500, torch.Generator().manual_seed(6))
    assert images.shape == (500, 1, 4, 4) and model.nfe_log == [64]
    assert abs(images.mean().item() - 0.6) < 4 * 0.1 / math.sqrt(500 * 16)
    assert abs(images.std().item() / 0.1 - 1) < 0.05


def test_model_bits_per_dim_match_the_gaussian_density_of_the_dequantised_images():
    """With the exact field of N(0.2, 0.2²) data, the flow's density is that Gaussian, so the ODE's
    bits/dim of the dequantised images y equal -(log N(y; 0.2, 0.2²) + D log(2/256)) / (D ln 2)
    (``bits_per_dim``) within RK4's error (1e-3 bits/dim). The field's Jacobian is c_t I, so
    Rademacher probes give its trace exactly (eps^T c I eps = c D): the standard error is 0. The
    first draw of the generator is the dequantisation noise, so y is reproduced here."""
    model = FlowMatching(
        GaussianNet(LinearPath(), 1000.0, 0.2, 0.2), EulerSolver(2), 4, 1, bpd_steps=32, bpd_probes=64
    )
    x = torch.randint(80, 180, (3, 1, 4, 4), generator=torch.Generator().manual_seed(7)).double() / 255
    bpd, std_err = model.ode_bpd(x, torch.Generator().manual_seed(8))
    y = dequantize(x, generator=torch.Generator().manual_seed(8))
    exact = -0.5 * (((y - 0.2) / 0.2) ** 2 + math.log(2 * math.pi * 0.2**2)).flatten(1).sum(1)
    reference = bits_per_dim(exact, 16)
    assert bpd.shape == (3,) and torch.equal(std_err, torch.zeros(3, dtype=torch.float64))
    assert ((bpd - reference).abs() < 1e-3).all(), (bpd, reference)
    assert torch.equal(model.nll_bpd(x, torch.Generator().manual_seed(8)), bpd)


def test_model_refuses_bad_arguments_naming_the_key():
    net = GaussianNet(LinearPath(), 1000.0)
    for kwargs, key in [
        ({"path": "straight"}, "path"),
        ({"coupling": "ot"}, "coupling"),
        ({"time_sampling": "beta"}, "time_sampling"),
        ({"sigma_min": 1.0}, "sigma_min"),
        ({"path": "cosine", "sigma_min": 0.1}, "sigma_min"),
        ({"time_scale": 0}, "time_scale"),
        ({"bpd_steps": 0}, "bpd_steps"),
        ({"bpd_stages": ["train"]}, "bpd_stages"),
        ({"bpd_solver": "rk5"}, "bpd_solver"),
        ({"bpd_tol": 0.0}, "bpd_tol"),
    ]:
        with pytest.raises(ConfigError) as err:
            FlowMatching(net, EulerSolver(2), 4, 1, **kwargs)
        assert err.value.key == key


def test_a_tiny_run_trains_with_ot_coupling_logit_normal_times_and_heun(tiny_cfg, tmp_path):
    from genexp.commands.train import train

    metrics = train(
        tiny_cfg(
            "model.coupling=minibatch_ot",
            "model.time_sampling=logit_normal",
            "solver=heun",
            "solver.steps=2",
            model="flow_matching",
        )
    )
    assert metrics["global_step"] == 3 and math.isfinite(metrics["test"]["test/loss"])
    assert metrics["test"]["test/bpd"] > 0  # the ODE likelihood ran under Lightning's inference mode
    # Hutchinson's standard error of the mean beside it (2 probes), small against the value
    assert 0 < metrics["test"]["test/bpd_std_err"] < 0.1 * metrics["test"]["test/bpd"]


def test_sample_swaps_the_solver_and_reports_the_nfe_spent(tiny_cfg, tmp_path):
    """``genexp sample ckpt=<run> solver=heun solver.steps=3``: the run's Euler is replaced, the
    file tag names the solver, the meta holds the NFE spent (Heun: 2 per step); dopri5 reports its
    measured NFE; a family without a solver refuses the option in one line."""
    from test_sample_cli import compose_app, load_npz

    from genexp.commands.sample import sample
    from genexp.commands.train import train
    from genexp.errors import GenexpError

    run = tmp_path / "run"
    train(tiny_cfg("~callbacks.sample_grid", "trainer.limit_train_batches=1", model="flow_matching"))
    heun = sample(compose_app("sample", [f"ckpt={run}", "n=3", "solver=heun", "solver.steps=3"]))
    assert heun.npz.name == "sample_seed0_n3_heun3.npz"
    meta = load_npz(heun.npz)[1]["sampler"]
    assert meta["name"] == "HeunSolver" and meta["steps"] == 3 and meta["nfe"] == 6
    adaptive = sample(compose_app("sample", [f"ckpt={run}", "n=3", "solver=dopri5", "solver.rtol=1e-3"]))
    assert adaptive.npz.name == "sample_seed0_n3_dopri5_rtol0.001.npz"
    assert load_npz(adaptive.npz)[1]["sampler"]["nfe"] >= 6  # dopri5: 6 stages per accepted step
    default = sample(compose_app("sample", [f"ckpt={run}", "n=3"]))
    assert default.npz.name == "sample_seed0_n3.npz" and load_npz(default.npz)[1]["sampler"]["nfe"] == 50
    # genexp evaluate solver=heun solver.steps=3: the evaluation samples with it and records it
    from genexp.commands.evaluate import evaluate

    evaluated, _ = evaluate(
        compose_app(
            "evaluate",
            [f"ckpt={run}", "metrics=[speed]", "eval.speed_batch_size=2", "solver=heun", "solver.steps=3"],
        )
    )
    assert evaluated["provenance"]["sampling"]["sampler"]["name"] == "HeunSolver"
    assert evaluated["provenance"]["sampling"]["sampler"]["nfe"] == 6
    vae = tmp_path / "vae"
    train(compose_cfg([*tiny("vae"), "~callbacks.sample_grid", "trainer.limit_train_batches=1"], vae))
    with pytest.raises(GenexpError, match="^solver: vae has no solver to choose .*flow_matching"):
        sample(compose_app("sample", [f"ckpt={vae}", "solver=heun"]))
