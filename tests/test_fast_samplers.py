"""Few-step samplers (genexp.diffusion.fast_samplers) driven by the exact eps of Gaussian data, float64.

Data x0 ~ N(mu, s^2) per dimension and x_t = a x0 + b eps with a = sqrt(abar_t), b = sqrt(1 - abar_t).
(x0, eps, x_t) are jointly Gaussian, Var x_t = a^2 s^2 + b^2 and Cov(eps, x_t) = b, so

    E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t),

the minimiser of the eps-MSE, i.e. what a perfectly trained network outputs. The probability-flow
ODE then has a closed-form solution: its flow is the monotone (affine) map between the Gaussian
marginals N(a mu, a^2 s^2 + b^2), so z = (x_t - a mu) / sqrt(a^2 s^2 + b^2) is constant along a
trajectory. Every sampler here starts at timestep T - 1 from x_T and returns x0_hat = E[x0 | x_t] at
timestep 0 (DDIM's last step; Heun's Euler step into sigma = 0 from sigma_min is the same), so the
exact answer for a start x_T is

    x_0(t=0) = a_0 mu + sqrt(a_0^2 s^2 + b_0^2) z_T,  answer = mu + a_0 s^2 (x_0 - a_0 mu) / (a_0^2 s^2 + b_0^2).

That closed form is the reference the solvers are measured against (no many-step run needed).
"""

from __future__ import annotations

import functools
import math
from functools import partial
from pathlib import Path

import pytest
import torch

from genexp.diffusion import schedules
from genexp.diffusion.fast_samplers import DPMSolverPPSampler, HeunSampler, logsnr_timesteps
from genexp.diffusion.noise_schedule import NoiseSchedule
from genexp.diffusion.samplers import DDIMSampler, DDPMSampler, sample_loop
from genexp.errors import ConfigError, GenexpError

F64 = torch.float64
MU, S = 0.3, 0.5
N = 4096  # draws x 2 dimensions: 8192 values per statistic


@functools.cache
def make_schedule(name: str) -> NoiseSchedule:
    return NoiseSchedule(getattr(schedules, name), timesteps=1000)


@pytest.fixture(scope="module", params=["linear", "cosine"])
def schedule(request) -> NoiseSchedule:
    return make_schedule(request.param)


def abar_at(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """abar at an integer timestep, or at a fractional one (Heun's: 1 / (1 + sigma(t)^2))."""
    if t.dtype.is_floating_point:
        return 1.0 / (1.0 + HeunSampler(schedule, 1).sigma_of_t(t) ** 2)
    return schedule.alphas_cumprod[t]


def exact_eps(schedule: NoiseSchedule):
    """eps_fn(x_t, t) = E[eps | x_t] for x0 ~ N(MU, S^2) (the module docstring's formula)."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar_at(schedule, t).reshape(-1, *[1] * (x.dim() - 1))
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S * S + 1 - a)

    return eps_fn


def start(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def exact_answer(schedule: NoiseSchedule, x_T: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's sample from x_T, in closed form (module docstring)."""
    a_T, a_0 = schedule.alphas_cumprod[-1], schedule.alphas_cumprod[0]
    z = (x_T - a_T.sqrt() * MU) / (a_T * S * S + 1 - a_T).sqrt()
    x_0 = a_0.sqrt() * MU + (a_0 * S * S + 1 - a_0).sqrt() * z
    return MU + a_0.sqrt() * S * S * (x_0 - a_0.sqrt() * MU) / (a_0 * S * S + 1 - a_0)


def rms_error(schedule: NoiseSchedule, sampler, x_T: torch.Tensor) -> float:
    out = sample_loop(sampler, exact_eps(schedule), x_T)
    return float((out - exact_answer(schedule, x_T)).pow(2).mean().sqrt())


def make(kind: str, schedule: NoiseSchedule, steps: int):
    cls = {"ddim": DDIMSampler, "dpm_solver_pp": DPMSolverPPSampler, "heun": HeunSampler}[kind]
    return cls(schedule, steps=steps, clip_denoised=False)


@pytest.mark.parametrize("kind, steps", [("dpm_solver_pp", 10), ("dpm_solver_pp", 20), ("heun", 50)])
def test_samples_have_the_data_marginals(schedule, kind, steps):
    """Mean and variance of 8,192 values land on MU and S^2 within 4 standard errors plus 0.01: the
    standard error of the mean is S / sqrt(8192) = 0.0055, of the variance S^2 sqrt(2 / 8191) =
    0.0039; the 0.01 covers the rest: x_T ~ N(0, I) instead of the exact marginal at T - 1 (a bias
    < sqrt(abar_{T-1}) MU <= 0.002), the solver's own error (RMS < 0.021 here, measured) and
    Var E[x0 | x_0-step] = S^2 a_0^2 S^2 / (a_0^2 S^2 + b_0^2) > 0.9996 S^2. Heun takes 50 steps: on
    the cosine schedule its rho = 7 grid from sigma_max = 2e4 is too coarse at 20 (RMS 0.16)."""
    out = sample_loop(make(kind, schedule, steps), exact_eps(schedule), start(1))
    se_mean, se_var = S / math.sqrt(out.numel()), S * S * math.sqrt(2 / (out.numel() - 1))
    assert abs(float(out.mean()) - MU) < 4 * se_mean + 0.01
    assert abs(float(out.var()) - S * S) < 4 * se_var + 0.01
    # and with a broken eps (scaled by 0.9), the variance misses: the test can fail
    bad = sample_loop(make(kind, schedule, steps), lambda x, t: 0.9 * exact_eps(schedule)(x, t), start(1))
    assert abs(float(bad.var()) - S * S) > 10 * se_var


def test_many_steps_agree_with_ddim_and_the_exact_ode(schedule):
    """The same ODE: at every timestep (DPM-Solver++) or 500 sigma steps (Heun) both land on the
    closed-form answer to 1e-3 and agree with DDIM eta = 0 at T steps to DDIM's own first-order error
    (measured 2.6e-3 linear / 1.4e-3 cosine RMS: bounded by 1e-2)."""
    x_T = start()
    ddim = sample_loop(make("ddim", schedule, 1000), exact_eps(schedule), x_T)
    assert rms_error(schedule, make("ddim", schedule, 1000), x_T) < 1e-2
    for kind, steps in (("dpm_solver_pp", 1000), ("heun", 500)):
        out = sample_loop(make(kind, schedule, steps), exact_eps(schedule), x_T)
        assert float((out - exact_answer(schedule, x_T)).pow(2).mean().sqrt()) < 1e-3, kind
        assert float((out - ddim).pow(2).mean().sqrt()) < 1e-2, kind


@pytest.mark.parametrize(
    "name, steps, factor", [(n, k, f) for n, f in (("linear", 5), ("cosine", 2)) for k in (10, 15, 20)]
)
def test_dpm_solver_pp_beats_ddim_at_few_steps(name, steps, factor):
    """The point of the method: at 10-20 NFE DPM-Solver++(2M) is several times closer to the ODE's
    answer than DDIM at the same NFE. Measured RMS ratios DDIM / DPM-Solver++: linear 8.6, 7.8, 9.4;
    cosine 12.7, 2.8, 2.6 at 10, 15, 20 steps (the cosine schedule's clipped tail, lambda from -4.3 to
    -9.9 over its last 10 timesteps, is over a third of a logSNR-uniform grid). Asserted: 5x and 2x."""
    schedule = make_schedule(name)
    x_T = start()
    ddim = rms_error(schedule, make("ddim", schedule, steps), x_T)
    dpm = rms_error(schedule, make("dpm_solver_pp", schedule, steps), x_T)
    assert dpm * factor < ddim, (dpm, ddim)


def test_heun_is_second_order_in_its_steps():
    """Doubling Heun's steps (from 50) cuts its error about 4x (2nd order; Euler would give 2x)."""
    schedule = NoiseSchedule(schedules.linear, timesteps=1000)
    x_T = start()
    e50, e100 = (rms_error(schedule, make("heun", schedule, n), x_T) for n in (50, 100))
    assert 3.0 < e50 / e100 < 5.0, (e50, e100)


def test_grids_and_nfe(schedule):
    """NFE: DPM-Solver++ one per timestep, Heun 2 steps - 1; grids descend from T - 1 / sigma_max."""
    dpm = DPMSolverPPSampler(schedule, steps=10)
    assert dpm.nfe == dpm.num_steps == 10 and len(set(dpm.timesteps.tolist())) == 10
    assert dpm.timesteps[0] == 999 and dpm.timesteps[-1] == 0 and bool((dpm.timesteps.diff() < 0).all())
    # uniform in lambda: a dense grid hits every timestep exactly once
    assert logsnr_timesteps(schedule, 1000).tolist() == list(range(999, -1, -1))
    heun = HeunSampler(schedule, steps=10)
    assert heun.nfe == heun.num_steps == 19
    sigmas = heun.sigmas()
    sigma = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt()
    assert torch.allclose(sigmas[[0, -2]], sigma[[-1, 0]]) and sigmas[-1] == 0  # sigma_max .. sigma_min, 0
    # rho = 7: sigma_i^(1/7) evenly spaced (Karras et al. 2022, eq. 5)
    assert torch.allclose(sigmas[:-1].pow(1 / 7).diff(), sigmas[:-1].pow(1 / 7).diff()[0].expand(9))
    # t(sigma) interpolates log sigma: exact at the timesteps, the inverse of sigma_of_t between them
    assert torch.allclose(heun.t_of_sigma(sigma[500]), torch.tensor(500.0, dtype=F64))
    for s in sigmas[:-1]:
        assert torch.allclose(heun.sigma_of_t(heun.t_of_sigma(s)), s)
    calls = []
    sample_loop(heun, lambda x, t: calls.append(t) or torch.zeros_like(x), torch.zeros(2, 3, dtype=F64))
    assert len(calls) == 19 and calls[0].dtype == F64


@pytest.mark.parametrize("cls", [DPMSolverPPSampler, HeunSampler])
@pytest.mark.parametrize("steps, message", [(0, "must be >= 1"), (-1, "must be >= 1"), (1001, "must be <= ")])
def test_bad_steps_are_one_line_errors(cls, steps, message):
    schedule = NoiseSchedule(schedules.linear, timesteps=1000)
    with pytest.raises(ConfigError, match=f"steps={steps}: {message}") as err:
        cls(schedule, steps=steps)
    assert "\n" not in str(err.value)


def test_the_step_by_step_samplers_are_unchanged():
    """DDPM/DDIM still run through step(): sample_loop dispatches only samplers that own a loop."""
    schedule = NoiseSchedule(partial(schedules.linear), timesteps=20)
    assert not hasattr(DDIMSampler(schedule, 5), "sample") and not hasattr(DDPMSampler(schedule), "sample")
    assert DDIMSampler(schedule, 5).nfe == 5 and DDPMSampler(schedule).nfe == 20
    with pytest.raises(TypeError, match="runs its own loop"):
        DPMSolverPPSampler(schedule, 5).step(torch.zeros(1), 19, torch.zeros(1))


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory) -> Path:
    """A tiny DDPM run (T = 20, one training step): what ``genexp sample`` reads."""
    from conftest import compose_cfg, tiny

    from genexp.commands.train import train

    root = tmp_path_factory.mktemp("ddpm")
    train(
        compose_cfg(
            [*tiny("ddpm"), "~callbacks.sample_grid", "trainer.limit_train_batches=1", "data.batch_size=8"],
            root,
        )
    )
    return root


def test_genexp_sample_takes_the_new_samplers(ddpm_run, tmp_path):
    """``genexp sample ckpt=<run> sampler=dpm_solver_pp sampler.steps=5`` (and heun) from a model trained
    with the DDPM sampler: the file tag names the sampler and steps, the metadata its NFE."""
    from test_sample_cli import compose_app, load_npz

    from genexp.commands.sample import sample

    for option, tag, nfe in (("dpm_solver_pp", "dpmsolverpp5", 5), ("heun", "heun5", 9)):
        overrides = [f"ckpt={ddpm_run}", "n=3", f"out={tmp_path}", f"sampler={option}", "sampler.steps=5"]
        result = sample(compose_app("sample", overrides))
        assert result.npz.name == f"sample_seed0_n3_{tag}.npz"
        images, meta = load_npz(result.npz)
        assert (
            images.shape == (3, 1, 16, 16) and meta["sampler"]["nfe"] == nfe and meta["sampler"]["steps"] == 5
        )
    for steps, message in ((0, "must be >= 1"), (21, r"must be <= the schedule's timesteps \(20\)")):
        overrides = [f"ckpt={ddpm_run}", "sampler=dpm_solver_pp", f"sampler.steps={steps}"]
        with pytest.raises(GenexpError, match=f"sampler.steps={steps}: {message}") as err:
            sample(compose_app("sample", overrides))
        assert "\n" not in str(err.value)


def test_schedule_buffers_at_a_fractional_timestep_interpolate_between_neighbours():
    """Heun queries the model between timesteps; an x0- or v-objective's conversion to eps reads the
    schedule there: linear between the two neighbours, and exactly the buffer at whole timesteps."""
    from genexp.diffusion.noise_schedule import NoiseSchedule

    a = torch.tensor([1.0, 3.0, 7.0, 15.0], dtype=torch.float64)
    x = torch.zeros(4, 2, dtype=torch.float64)
    whole = NoiseSchedule.extract(a, torch.tensor([0, 1, 2, 3]), x).flatten()
    assert torch.equal(whole, a)
    # t = 0.5 -> (1 + 3) / 2; 1.25 -> 3 + 0.25 * 4; 2.9 -> 7 + 0.9 * 8; 3.0 (the last, as a float) -> 15
    frac = NoiseSchedule.extract(a, torch.tensor([0.5, 1.25, 2.9, 3.0], dtype=torch.float64), x).flatten()
    torch.testing.assert_close(frac, torch.tensor([2.0, 4.0, 14.2, 15.0], dtype=torch.float64))
