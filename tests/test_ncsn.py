"""NCSN's math in float64 against closed forms, and one tiny run through the real config.

Gaussian data makes every score exact. Data x ~ N(μ, s² I) (in the [−1, 1] coordinates) blurred by
N(0, σ² I) is q_σ = N(μ, (s² + σ²) I), whose score is

    ∇ log q_σ(x̃) = −(x̃ − μ) / (s² + σ²).

Denoising score matching at one σ regresses the target −(x̃ − x)/σ² = −z/σ on x̃ = x + σ z; the
least-squares linear regressor a x̃ + b has a = Cov(−z/σ, x̃) / Var(x̃) = −1 / (s² + σ²) and
b = −a μ: the exact score (Vincent 2011). At the exact score the residual σ s + z has variance
σ² s² / v² + s⁴ / v² = s² / v per dimension (v = s² + σ²: x̃ − μ = s ε + σ z), so the loss
E ½ ‖σ s + z‖² is ½ D · mean_i s² / (s² + σ_i²).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from genexp.diffusion.langevin import LangevinSampler, SigmaLadder
from genexp.diffusion.ode_likelihood import bits_per_dim, dequantize
from genexp.diffusion.samplers import DDIMSampler
from genexp.errors import ConfigError
from genexp.models.ncsn import NCSN

MU, S = 0.5, 0.3  # data N(μ, s² I) in the [-1, 1] coordinates


def exact_score(mu: float = MU, s: float = S):
    """∇ log q_σ for N(μ, s² I) data: (x, σ (B,)) -> −(x − μ) / (s² + σ²)."""

    def score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x).reshape(-1, *([1] * (x.dim() - 1)))
        return -(x - mu) / (s**2 + sigma**2)

    return score


class GaussianScoreNet(torch.nn.Module):
    """The 'net' whose NCSN score net(x, c(σ)) / σ is the exact one, scaled by (1 + δ_a) and with
    the mean shifted by δ_b: c = time_scale · log(σ/σ_min) / log(σ_max/σ_min) is inverted to σ."""

    def __init__(self, ladder: SigmaLadder, time_scale: float = 999.0, mu: float = MU, s: float = S):
        super().__init__()
        self.ladder, self.time_scale, self.mu, self.s = ladder, time_scale, mu, s
        self.delta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))  # (δ_a, δ_b)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sigma = self.ladder.sigma_at(c.double() / self.time_scale).to(x.device)
        score = exact_score(self.mu * (1 + self.delta[1]), self.s)(x.double(), sigma) * (1 + self.delta[0])
        return (sigma.reshape(-1, *([1] * (x.dim() - 1))) * score).to(x.dtype)


def langevin(**kwargs):
    return functools.partial(LangevinSampler, **kwargs)


def gaussian_model(sigma_min=0.01, sigma_max=50.0, num_scales=10, **kwargs) -> NCSN:
    ladder = SigmaLadder(sigma_min, sigma_max, num_scales)
    net = GaussianScoreNet(ladder)
    return NCSN(net, langevin(steps_per_scale=1), 4, 1, sigma_min, sigma_max, num_scales, **kwargs)


def test_dsm_regressor_per_sigma_is_the_exact_score():
    """At each σ of a ladder, least squares of −z/σ on [x̃ − μ, 1] over 200,000 draws gives the slope
    −1/(s² + σ²) and the intercept 0 (b = μ/(s² + σ²) once uncentred) within 4 standard errors:
    the target's spread given x̃ is Var(−z/σ | x̃) = s² / (σ² v), so the slope's standard error is
    √(s² / (σ² v² N)) and the intercept's √(s² / (σ² v N)) (v = s² + σ²)."""
    g, n = torch.Generator().manual_seed(0), 200_000
    for sigma in SigmaLadder(0.05, 5.0, 5).sigmas.tolist():
        x = MU + S * torch.randn(n, generator=g, dtype=torch.float64)
        z = torch.randn(n, generator=g, dtype=torch.float64)
        x_tilde = x + sigma * z
        design = torch.stack([x_tilde - MU, torch.ones_like(x_tilde)], 1)
        a, b = torch.linalg.lstsq(design, (-z / sigma)[:, None]).solution[:, 0].tolist()
        v = S**2 + sigma**2
        spread = S**2 / (sigma**2 * v)
        assert abs(a + 1 / v) < 4 * math.sqrt(spread / (v * n)), (sigma, a, -1 / v)
        assert abs(b) < 4 * math.sqrt(spread / n), (sigma, b)


def test_the_models_dsm_loss_is_minimal_at_the_exact_score():
    """With the exact score the model's loss (on images (x + 1)/2) is ½ D mean_b s²/(s² + σ_b²) over the
    σ it drew (the module docstring's minimum, D = 16; within 2 %: over 20,000 images the χ² noise is
    0.6 %) and its gradient in (δ_a, δ_b) vanishes (under 2 % of the gradient at δ_a = 0.3)."""
    model = gaussian_model(num_scales=8)
    torch.manual_seed(1)
    x0 = MU + S * torch.randn(20_000, 1, 4, 4, dtype=torch.float64)
    drawn = model.ladder.sigmas[torch.randint(0, 8, (20_000,))]  # the loss's first draw, replayed
    torch.manual_seed(1)
    x0 = MU + S * torch.randn(20_000, 1, 4, 4, dtype=torch.float64)
    out = model.loss((x0 + 1) / 2)
    minimum = 0.5 * 16 * (S**2 / (S**2 + drawn**2)).mean().item()
    assert out.loss.item() == pytest.approx(minimum, rel=0.02)
    assert set(out.logs) == {"mse", "mse_low_noise", "mse_high_noise"}
    (grad_at_exact,) = torch.autograd.grad(out.loss, model.net.delta)
    with torch.no_grad():
        model.net.delta[0] = 0.3
    torch.manual_seed(1)
    x0 = MU + S * torch.randn(20_000, 1, 4, 4, dtype=torch.float64)
    (grad_off,) = torch.autograd.grad(model.loss((x0 + 1) / 2).loss, model.net.delta)
    assert grad_off[0] > 0 and grad_at_exact.abs().max() < 0.02 * grad_off[0]


LADDER = (0.2, 3.0, 4)  # σ_L, σ_1, L: σ_L near s, so the last level mixes within T = 150 steps
CHAIN = {"steps_per_scale": 150, "step_lr": 5.2e-3}  # a = α/(2v) = 0.02 at σ_L, 0.065 at σ_1


def test_annealed_langevin_with_the_exact_score_reaches_the_blurred_data():
    """Annealed Langevin (4 levels 3 -> 0.2, T = 150, ε = 5.2e-3) from N(0, 9 I) under the exact score
    ends on q_σL = N(μ, s² + σ_L²): 10,000 2-d draws have mean μ within 0.01 (4 standard errors) and
    variance within 4 % (its standard error 1 %; the linear-Gaussian recursion m ← (1 − a) m + a μ,
    V ← (1 − a)² V + α, a = α/(2v), predicts V = 1.014 (s² + σ_L²): Euler's stationary excess
    1/(1 − a/2) = 1.010 and 0.4 % unmixed). The denoising step is x + σ_L² s(x, σ_L) on the same
    chain (Tweedie's E[x | x̃])."""
    ladder = SigmaLadder(*LADDER)
    x_T = 3.0 * torch.randn(10_000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    chain = LangevinSampler(ladder, **CHAIN, denoise=False)
    x = chain.sample(exact_score(), x_T, torch.Generator().manual_seed(3))
    assert chain.nfe == 4 * 150
    assert abs(x.mean().item() - MU) < 0.01
    assert x.var().item() == pytest.approx(S**2 + 0.2**2, rel=0.04)
    denoised = LangevinSampler(ladder, **CHAIN, denoise=True)
    y = denoised.sample(exact_score(), x_T, torch.Generator().manual_seed(3))
    sigma_l = torch.full((10_000,), 0.2, dtype=torch.float64)
    torch.testing.assert_close(y, x + 0.2**2 * exact_score()(x, sigma_l))
    assert denoised.nfe == 4 * 150 + 1


def test_the_step_sizes_follow_algorithm_1():
    """α_i = ε σ_i² / σ_L²: ε at the last level, ε γ^(2(L − i)) above it."""
    ladder = SigmaLadder(0.01, 1.0, 3)  # σ = 1, 0.1, 0.01
    alphas = LangevinSampler(ladder, step_lr=1e-5).step_sizes()
    torch.testing.assert_close(alphas, torch.tensor([1e-1, 1e-3, 1e-5], dtype=torch.float64))


def blurred_gaussian_log_prob(y: torch.Tensor, mu: float, var: float) -> torch.Tensor:
    """log N(y; μ, var I) in nats per item, (B, ...) -> (B,)."""
    return -0.5 * ((y - mu) ** 2 / var + math.log(2 * math.pi * var)).flatten(1).sum(1)


def test_ode_likelihood_under_the_exact_score_is_the_blurred_gaussian_density():
    """The VE probability-flow ODE maps q_σmin = N(μ, (s² + σ_min²) I) to q_σmax exactly. With the
    exact q_σmax = N(μ, s² + σ_max²) as the prior, the model's bits/dim of the dequantised images y
    equal those of log N(y; μ, s² + σ_min²) within 1e-4 bits/dim at 64 RK4 steps (measured, fourth
    order: 16 steps 1e-2, 32 steps 7e-4, 64 steps 5e-5, 128 steps 3e-6 bits/dim).

    Under the model's own prior N(0, σ_max² I) the pointwise error per dimension is about
    μ (y − μ) / (σ_max s) (the prior's mean is off by μ where the flow has stretched y − μ by
    σ_max / s; its mean over the data is O(μ² / σ_max²)): centred data (μ = 0) leave O(s² / σ_max²),
    and the model's default 32 steps agree within 1e-3 nats/dim. The score's Jacobian is a multiple
    of I, so Rademacher probes give its trace exactly (standard error 0). The generator's first draw
    is the dequantisation, so y is reproduced here."""
    x = torch.randint(60, 200, (3, 1, 4, 4), generator=torch.Generator().manual_seed(4)).double() / 255
    y = dequantize(x, generator=torch.Generator().manual_seed(5))
    var = S**2 + 0.01**2
    model = gaussian_model(bpd_steps=64, bpd_probes=4)
    model.prior_log_prob = functools.partial(blurred_gaussian_log_prob, mu=MU, var=S**2 + 50.0**2)
    bpd, std_err = model.ode_bpd(x, torch.Generator().manual_seed(5))
    exact = bits_per_dim(blurred_gaussian_log_prob(y, MU, var), 16)
    assert bpd.shape == (3,) and torch.equal(std_err, torch.zeros(3, dtype=torch.float64))
    assert ((bpd - exact).abs() < 1e-4).all(), bpd - exact
    model = gaussian_model(bpd_probes=4)  # bpd_steps=32, the prior N(0, σ_max² I)
    model.net.mu = 0.0
    bpd, std_err = model.ode_bpd(x, torch.Generator().manual_seed(5))
    nats_per_dim = (bpd - bits_per_dim(blurred_gaussian_log_prob(y, 0.0, var), 16)) * math.log(2)
    assert (nats_per_dim.abs() < 1e-3).all(), nats_per_dim
    assert torch.equal(model.nll_bpd(x, torch.Generator().manual_seed(5)), bpd)


def test_the_ladder_is_geometric_and_its_time_inverts_it():
    """σ_1 = σ_max, σ_L = σ_min, a constant ratio γ; σ(t) interpolates it (t = 1 − (i − 1)/(L − 1)
    at level i) and t(σ) inverts σ(t); the net's time input c(σ) spans DDPM's 0..999."""
    ladder = SigmaLadder(0.01, 50.0, 100)
    s = ladder.sigmas
    assert s.dtype == torch.float64 and s.shape == (100,)
    assert s[0].item() == pytest.approx(50.0) and s[-1].item() == pytest.approx(0.01)
    torch.testing.assert_close(s[:-1] / s[1:], torch.full((99,), ladder.gamma, dtype=torch.float64))
    assert ladder.gamma == pytest.approx(5000 ** (1 / 99))
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    torch.testing.assert_close(ladder.time_of(ladder.sigma_at(t)), t)
    torch.testing.assert_close(ladder.sigma_at(torch.linspace(1, 0, 100, dtype=torch.float64)), s)
    model = gaussian_model(num_scales=5)
    ends = model.time_scale * model.ladder.time_of(model.ladder.sigmas[[0, -1]])
    torch.testing.assert_close(ends, torch.tensor([999.0, 0.0], dtype=torch.float64))
    assert "sigmas" not in model.state_dict() and model.nfe == 5 * 1 + 1


def test_the_nfe_and_steps_for_nfe():
    """NFE = L · T + denoise; steps_for_nfe is the most T within a budget, given the model's L."""
    assert LangevinSampler(SigmaLadder(0.01, 1.0, 10), steps_per_scale=3).nfe == 31
    assert LangevinSampler(SigmaLadder(0.01, 1.0, 10), steps_per_scale=3, denoise=False).nfe == 30
    assert LangevinSampler.steps_for_nfe(31, num_scales=10) == 3
    assert LangevinSampler.steps_for_nfe(40, num_scales=10, denoise=True, step_lr=1e-5) == 3
    assert LangevinSampler.steps_for_nfe(40, num_scales=10, denoise=False) == 4
    assert LangevinSampler.steps_for_nfe(5, num_scales=10) == 0  # below one step per level
    assert LangevinSampler.steps_key == "steps_per_scale"
    with pytest.raises(ConfigError, match="num_scales"):
        LangevinSampler.steps_for_nfe(31)


def test_bad_values_are_refused_naming_the_key():
    ladder = SigmaLadder(0.01, 1.0, 3)
    net = GaussianScoreNet(ladder)
    for kwargs, key in [
        ({"sigma_min": 1.0, "sigma_max": 1.0}, "sigma_min"),
        ({"sigma_min": 2.0}, "sigma_min"),
        ({"sigma_min": 0.0}, "sigma_min"),
        ({"num_scales": 1}, "num_scales"),
        ({"sampler": langevin(step_lr=0.0)}, "sampler.step_lr"),
        ({"sampler": langevin(step_lr=-1e-5)}, "sampler.step_lr"),
        ({"sampler": langevin(steps_per_scale=0)}, "sampler.steps_per_scale"),
        ({"sampler": langevin(denoise=1)}, "sampler.denoise"),
        ({"sampler": functools.partial(DDIMSampler, steps=10)}, "sampler"),
        ({"bpd_steps": 0}, "bpd_steps"),
        ({"bpd_stages": ["train"]}, "bpd_stages"),
    ]:
        args = {"net": net, "sampler": langevin(), "image_size": 4, "channels": 1, "sigma_max": 1.0, **kwargs}
        with pytest.raises(ConfigError) as err:
            NCSN(**args)
        assert err.value.key == key, kwargs
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="sampler=langevin"):
        NCSN(net, functools.partial(DDIMSampler), 4, 1, sigma_max=1.0)


def test_langevin_refuses_a_noise_schedule():
    """``sampler=langevin`` on a model with a noise schedule: the constructor refuses it in one line."""
    from genexp.diffusion.noise_schedule import NoiseSchedule
    from genexp.diffusion.schedules import linear

    with pytest.raises(ConfigError, match="NoiseSchedule; pick one of this model's samplers") as err:
        LangevinSampler(NoiseSchedule(linear, timesteps=10))
    assert err.value.key == "_target_"


def test_model_samples_from_the_prior_through_langevin_and_logs_the_nfe():
    """With the exact score and the chain above, images are (x + 1)/2 with x from N(0, σ_max² I)
    through Langevin: mean (μ + 1)/2 = 0.75 within 0.01 over 500 4x4 images (4 standard errors
    of 0.0025; the clamp at 1, 1.5 std away, lowers it by 0.004); each sample call records its NFE."""
    model = NCSN(GaussianScoreNet(SigmaLadder(*LADDER)), langevin(**CHAIN), 4, 1, *LADDER)
    images = model.sample(500, torch.Generator().manual_seed(6))
    assert images.shape == (500, 1, 4, 4) and images.dtype == torch.float32
    assert model.nfe_log == [4 * 150 + 1]
    assert abs(images.mean().item() - 0.75) < 0.01


def test_a_tiny_run_trains_samples_and_reports_test_bpd(tiny_cfg, tmp_path):
    """``genexp train model=ncsn`` (tiny) checkpoints and reports test/bpd; ``genexp sample`` draws
    from it (NFE 4 levels x 5 steps + denoise = 21 in the meta) and swaps steps_per_scale; a sampler
    built for a noise schedule is refused in one line naming ``sampler``."""
    from test_sample_cli import compose_app, load_npz

    from genexp.commands.sample import sample
    from genexp.commands.train import train
    from genexp.errors import GenexpError

    run = tmp_path / "run"
    metrics = train(tiny_cfg("~callbacks.sample_grid", model="ncsn"))
    assert metrics["global_step"] == 3 and math.isfinite(metrics["test"]["test/loss"])
    assert metrics["test"]["test/bpd"] > 0 and (run / "checkpoints" / "last.ckpt").exists()
    drawn = sample(compose_app("sample", [f"ckpt={run}", "n=3"]))
    images, meta = load_npz(drawn.npz)
    assert images.shape == (3, 1, 16, 16) and meta["sampler"]["nfe"] == 21
    assert meta["sampler"]["name"] == "LangevinSampler"
    swapped = sample(
        compose_app("sample", [f"ckpt={run}", "n=3", "sampler=langevin", "sampler.steps_per_scale=2"])
    )
    assert load_npz(swapped.npz)[1]["sampler"]["nfe"] == 4 * 2 + 1
    with pytest.raises(GenexpError, match=r"^model\.sampler='DDIMSampler': .*use sampler=langevin"):
        sample(compose_app("sample", [f"ckpt={run}", "n=3", "sampler=ddim"]))
    # the file tag names the steps per level, so another T does not overwrite the first grid
    assert swapped.png.name.endswith("_langevin2.png") and swapped.png != drawn.png
    # the NFE sweep sets steps_per_scale from the model's 4 levels: NFE 4 T + 1 (10 -> T = 2)
    from genexp.commands.evaluate import evaluate

    fast = ["metrics=[fid]", "eval.num_samples=8", "eval.kid_subset_size=4", "eval.classifier_epochs=1"]
    fast += ["eval.speed_repeats=1", "eval.speed_batch_size=2", f"out={tmp_path}/e.json"]
    evaluation, _ = evaluate(compose_app("evaluate", [f"ckpt={run}", "nfe=[5,10]", *fast]))
    rows = evaluation["nfe_sweep"]["rows"]
    assert [(r["nfe_requested"], r["steps"], r["nfe"]) for r in rows] == [(5, 1, 5), (10, 2, 9)]
    with pytest.raises(GenexpError, match=r"cannot take one step within 4 network evaluations .* >= 5"):
        evaluate(compose_app("evaluate", [f"ckpt={run}", "nfe=[4]", *fast]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["sampler=ddim"],
            "model.sampler='DDIMSampler': ncsn samples by annealed Langevin dynamics only; use sampler=langevin",
        ),
        (["model.sigma_min=60"], "model.sigma_min=60: must be < model.sigma_max (50.0)"),
        (["model.num_scales=1"], "model.num_scales=1: must be >= 2"),
        (["sampler.step_lr=0"], "model.sampler.step_lr=0: must be > 0"),
        (["sampler.steps_per_scale=0"], "model.sampler.steps_per_scale=0: must be >= 1"),
    ],
    ids=["ddim", "sigma_min", "num_scales", "step_lr", "steps_per_scale"],
)
def test_bad_values_fail_in_one_line_when_the_model_is_built(overrides, message, tiny_cfg):
    """What ``genexp train model=ncsn <override>`` prints (docs/errors.md), raised while building,
    before any training; ``sampler=langevin`` on a noise-schedule model likewise."""
    from genexp.build import build_model
    from genexp.errors import GenexpError

    with pytest.raises(GenexpError) as err:
        build_model(tiny_cfg(*overrides, model="ncsn"))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_langevin_on_a_noise_schedule_model_fails_in_one_line(tiny_cfg):
    from genexp.build import build_model
    from genexp.errors import GenexpError

    with pytest.raises(GenexpError) as err:
        build_model(tiny_cfg("sampler=langevin", model="ddpm"))
    assert str(err.value).startswith(
        "model.sampler._target_='genexp.diffusion.langevin.LangevinSampler': annealed Langevin samples a "
        "noise-conditional score model"
    ) and "\n" not in str(err.value)
