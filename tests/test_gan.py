"""The GAN family: its losses on known logits, the penalties against closed forms, the networks'
size plan, sampling, the metrics, and the alternating-update schedule end to end."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from genexp.commands.train import train
from genexp.errors import ConfigError, GenexpError
from genexp.metrics.diversity import diversity_ratio, energy_distance, mean_pairwise_distance
from genexp.models import gan_losses as L
from genexp.models.gan import GAN
from genexp.nets.dcgan import DCGANDiscriminator, DCGANGenerator, dcgan_plan

LN2, LN3 = math.log(2.0), math.log(3.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------- losses on known logits
# logits 0 and ln 3 are probabilities 1/2 and 3/4: softplus(0) = ln 2, softplus(-ln 3) = ln(4/3),
# softplus(ln 3) = ln 4
def test_bce_discriminator_loss_on_known_logits():
    real, fake = t(0.0, LN3), t(0.0, -LN3)
    # -E log sigma(r) - E log(1 - sigma(f)) = (ln 2 + ln 4/3) / 2 twice
    assert L.bce_d_loss(real, fake).item() == pytest.approx(math.log(8 / 3))
    # D* = 1/2 everywhere (P = Q, logits 0): the talk's L(G, D*) = -2 log 2, i.e. a D loss of 2 ln 2
    assert L.bce_d_loss(t(0.0, 0.0), t(0.0, 0.0)).item() == pytest.approx(2 * LN2)


def test_generator_losses_on_known_logits():
    fake = t(0.0, -LN3)  # D(G(z)) = 1/2 and 1/4
    # minimax: E log(1 - D(G(z))) = (ln 1/2 + ln 3/4) / 2
    assert L.minimax_g_loss(fake).item() == pytest.approx((math.log(0.5) + math.log(0.75)) / 2)
    # non-saturating: -E log D(G(z)) = (ln 2 + ln 4) / 2
    assert L.ns_g_loss(fake).item() == pytest.approx(1.5 * LN2)
    # critic losses: -E f
    assert L.critic_g_loss(t(-2.0, 0.25)).item() == pytest.approx(0.875)


def test_hinge_and_wasserstein_losses_on_known_values():
    real, fake = t(2.0, 0.5), t(-2.0, 0.25)
    # E relu(1 - r) = (0 + 0.5) / 2, E relu(1 + f) = (0 + 1.25) / 2
    assert L.hinge_d_loss(real, fake).item() == pytest.approx(0.25 + 0.625)
    # E f - E r = -0.875 - 1.25
    assert L.wasserstein_d_loss(real, fake).item() == pytest.approx(-2.125)


def test_non_saturating_loss_keeps_its_gradient_where_minimax_saturates():
    # D confidently rejects the samples (sigma(f) ~ 0.0025): d/df of minimax = -sigma(f) ~ 0, of ns = sigma(f) - 1 ~ -1
    f = t(-6.0).requires_grad_(True)
    (g_mm,) = torch.autograd.grad(L.minimax_g_loss(f), f)
    (g_ns,) = torch.autograd.grad(L.ns_g_loss(f), f)
    assert abs(g_mm.item()) < 0.01 and g_ns.item() == pytest.approx(torch.sigmoid(f).item() - 1)


def test_every_loss_is_registered_with_its_score():
    assert set(L.LOSSES) == {"minimax", "ns", "hinge", "wgan_gp"}
    assert L.LOSSES["ns"].score(t(0.0)).item() == 0.5  # a probability
    assert L.LOSSES["wgan_gp"].score(t(-3.0)).item() == -3.0  # a critic value
    assert [k for k, v in L.LOSSES.items() if v.gradient_penalty] == ["wgan_gp"]


# ---------------------------------------------------------------------------- penalties, closed forms
class LinearCritic(nn.Module):
    """D(x) = <w, x> + b: grad_x D = w everywhere, so GP = (|w| - 1)^2 and R1 = |w|^2 exactly."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.tensor(0.3, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.flatten() + self.b


def test_gradient_penalty_of_a_linear_critic_is_its_analytic_value():
    w = torch.zeros(1, 2, 2, dtype=torch.float64)
    w[0, 0, 0], w[0, 1, 1] = 2.0, math.sqrt(5.0)  # |w| = 3
    critic = LinearCritic(w)
    real = torch.rand(5, 1, 2, 2, dtype=torch.float64)
    fake = torch.rand(5, 1, 2, 2, dtype=torch.float64)
    gp = L.gradient_penalty(critic, real, fake, torch.Generator().manual_seed(0))
    assert gp.item() == pytest.approx((3.0 - 1.0) ** 2)  # wherever x_hat falls
    # and it trains the critic: d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w|
    (grad_w,) = torch.autograd.grad(gp, critic.w)
    torch.testing.assert_close(grad_w, 2 * (3.0 - 1.0) * w / 3.0)
    assert L.r1_penalty(critic, real).item() == pytest.approx(9.0)
    unit = LinearCritic(torch.full((1, 2, 2), 0.5, dtype=torch.float64))  # |w| = 1: no penalty
    assert L.gradient_penalty(unit, real, fake).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------- networks
@pytest.mark.parametrize(
    "size, widths, final",
    [(16, [8, 16], 4), (28, [8, 16], 7), (32, [8, 16, 32], 4), (64, [8, 16, 32, 64], 4)],
)
def test_dcgan_nets_follow_the_image_size(size, widths, final):
    assert dcgan_plan(size, 8) == (widths, final)
    g = DCGANGenerator(z_dim=5, image_size=size, channels=3, base_channels=8)
    d = DCGANDiscriminator(image_size=size, channels=3, base_channels=8, spectral_norm=True)
    x = g(torch.randn(2, 5))
    assert x.shape == (2, 3, size, size) and x.abs().max() <= 1
    assert d(x).shape == (2,)


def test_dcgan_plan_refuses_sizes_it_cannot_halve():
    with pytest.raises(ConfigError, match="multiple of 4"):
        dcgan_plan(30, 8)
    assert dcgan_plan(64, 64)[0] == [64, 128, 256, 512]  # the paper's D, width capped at 8x


def tiny_gan(**kwargs) -> GAN:
    torch.manual_seed(0)
    args = dict(image_size=16, channels=1, z_dim=4, g_base_channels=4, d_base_channels=4)
    return GAN(**{**args, **kwargs})


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"loss": "wgan_gp", "d_norm": "batch"}, "d_norm"),
        ({"r1_gamma": 1.0, "d_norm": "batch"}, "d_norm"),
        ({"loss": "wgan"}, "loss"),
        ({"d_steps_per_g_step": 0}, "d_steps_per_g_step"),
        ({"ema_decay": 1.0}, "ema_decay"),
    ],
)
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        tiny_gan(**kwargs)
    assert err.value.key == key


# ---------------------------------------------------------------------------- sampling
def test_truncation_redraws_large_noise_deterministically():
    model = tiny_gan()
    z = model.noise(500, torch.Generator().manual_seed(0), truncation=0.5)
    assert z.abs().max() <= 0.5 and z.std() > 0.2
    assert torch.equal(z, model.noise(500, torch.Generator().manual_seed(0), truncation=0.5))
    model.eval()
    assert model.sample(3, truncation=0.5).shape == (3, 1, 16, 16)


def test_fixed_noise_grid_is_identical_across_calls_while_g_is_frozen(tmp_path):
    from genexp.lit.callbacks import SampleGrid

    model = tiny_gan(ema_decay=0.5)
    grid = SampleGrid(str(tmp_path), num_samples=4, seed=7)
    trainer = SimpleNamespace(loggers=[], datamodule=None, global_step=0)
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    grid.write(trainer, module, "epoch_001")
    x = torch.rand(8, 1, 16, 16)
    model.train()
    opt_d = torch.optim.Adam(model.discriminator.parameters())
    for _ in range(2):  # D trains, G does not: the next epoch's grid must not change
        opt_d.zero_grad()
        model.d_loss(x).loss.backward()
        opt_d.step()
    grid.write(trainer, module, "epoch_002")
    first, second = (tmp_path / f"epoch_00{i}_samples.png" for i in (1, 2))
    assert first.read_bytes() == second.read_bytes()
    assert model.training, "the callback restores the training mode"


def test_ema_generator_samples_and_lags_behind():
    model = tiny_gan(ema_decay=0.5)
    model.update_ema()  # the first update copies G
    ema = model.generator_ema.module
    g_first = model.generator.net[0].weight.detach().clone()
    torch.testing.assert_close(ema.net[0].weight, g_first)
    with torch.no_grad():
        model.generator.net[0].weight.add_(1.0)
    model.update_ema()  # beta = min(0.5, (1 + 1) / (10 + 1)): the warm-up follows G closely
    beta = 2 / 11
    torch.testing.assert_close(ema.net[0].weight, g_first + (1 - beta))
    assert model.sampler is ema and not any(p.requires_grad for p in ema.parameters())


# ---------------------------------------------------------------------------- metrics
def test_diversity_and_energy_distance_on_known_sets():
    x = t(0.0, 1.0).view(2, 1)  # 1-pixel images: distances are |a - b|
    assert mean_pairwise_distance(x).item() == 1.0
    assert diversity_ratio(t(5.0, 5.0).view(2, 1), x).item() == 0.0  # collapsed: no spread
    assert diversity_ratio(t(0.0, 2.0).view(2, 1), x).item() == 2.0
    # shifted by 2: E|X - Y| = (2 + 3 + 1 + 2) / 4 = 2, so (2 * 2 - 1 - 1) / 1
    assert energy_distance(t(2.0, 3.0).view(2, 1), x).item() == pytest.approx(2.0)
    # large samples from one distribution: close to 0
    a, b = torch.rand(400, 16, dtype=torch.float64), torch.rand(400, 16, dtype=torch.float64)
    assert abs(energy_distance(a, b).item()) < 0.02 and energy_distance(a + 0.5, b).item() > 0.5


# ---------------------------------------------------------------------------- training end to end
def optimizer_steps(state: dict) -> list[int]:
    """Adam's per-network step counts from a checkpoint: [G, D]."""
    return [int(next(iter(opt["state"].values()))["step"]) for opt in state["optimizer_states"]]


def test_n_critic_schedule_step_counter_and_resume_of_both_optimizers(tiny_cfg, tmp_path):
    overrides = ("model.d_steps_per_g_step=2", "logger=csv")
    first = train(tiny_cfg(*overrides, model="gan"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    # 3 batches: 3 G steps, each after 2 D steps; global_step counts G steps
    assert first["global_step"] == 3 and state["global_step"] == 3 and optimizer_steps(state) == [3, 6]
    # resumed: Adam's step counts continue from 3 and 6, so both optimizers' states were restored
    second = train(tiny_cfg(*overrides, "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'run'}", model="gan"))
    assert second["global_step"] == 6
    assert optimizer_steps(torch.load(ckpt, weights_only=True)) == [6, 12]
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {
        "train/d_loss",
        "train/g_loss",
        "train/d_real",
        "train/d_fake",
        "train/diversity",
        "train/d_grad_norm",
        "train/g_grad_norm",
        "val/energy",
        "val/diversity",
        "test/energy",
    } <= logged
    # the step axis of the logs is G steps too
    assert sorted({int(r["step"]) for r in rows if r.get("train/g_loss")}) == [0, 1, 2, 3, 4, 5]


def test_max_steps_counts_generator_steps(tiny_cfg, tmp_path):
    metrics = train(tiny_cfg("model.d_steps_per_g_step=3", "trainer.max_steps=2", model="gan"))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert metrics["global_step"] == 2 and optimizer_steps(state) == [2, 6]


@pytest.mark.parametrize("loss", ["minimax", "hinge", "wgan_gp"])
def test_each_loss_trains_with_its_stabilisers(loss, tiny_cfg, tmp_path):
    extra = [
        "model.spectral_norm=true",
        "module.clip_grad_norm=1.0",
        "model.ema_decay=0.9",
        "model.truncation=2.0",
    ]
    if loss == "wgan_gp":
        extra += ["model.r1_gamma=1.0", "model.d_norm=none"]
    metrics = train(tiny_cfg(f"model.loss={loss}", *extra, model="gan"))
    assert metrics["global_step"] == 3
    assert all(math.isfinite(v) for v in metrics["test"].values())


def test_optimizer_arguments_per_network(tiny_cfg):
    from conftest import compose_cfg, tiny
    from omegaconf import OmegaConf

    from genexp.build import instantiate
    from genexp.lit.gan_module import GANModule, module_for

    cfg = compose_cfg([*tiny("gan"), "optimizer.lr=3e-4", "module.optimizers.discriminator.lr=4e-4"])
    model = instantiate(cfg.model, "model")
    recipe = OmegaConf.to_container(cfg.module, resolve=True)
    optimizer = instantiate(cfg.optimizer, "optimizer")
    module = module_for(model, recipe, optimizer=optimizer)
    assert type(module) is GANModule and module.clip_grad_norm is None
    assert module.optimizer_args["generator"] == {"lr": 3e-4, "betas": [0.5, 0.999]}
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)  # configure_optimizers reads nothing else
    opt_g, opt_d = (o for o in GANModule.configure_optimizers(module))
    assert opt_g.param_groups[0]["lr"] == 3e-4 and opt_d.param_groups[0]["lr"] == 4e-4
    assert tuple(opt_d.param_groups[0]["betas"]) == (0.5, 0.999)  # DCGAN's Adam, not the group's (0.9, 0.999)
    sgd = instantiate(compose_cfg([*tiny("gan"), "optimizer=sgd"]).optimizer, "optimizer")
    with pytest.raises(GenexpError, match=r"module\.optimizers\.generator=.*betas"):
        GANModule(model, sgd)
    with pytest.raises(ConfigError) as err:
        GANModule(model, optimizer, optimizers={"generator": [1e-4]})
    assert err.value.key == "module.optimizers.generator"
    assert GANModule(model, optimizer).optimizer_args == {  # without a module: node, today's recipe
        "generator": {"betas": [0.5, 0.999]},
        "discriminator": {"betas": [0.5, 0.999]},
    }


def test_a_checkpoint_written_before_the_recipe_moved_rebuilds():
    """Configs stored before ``module:`` held the optimizers and clipping gave them to the GAN."""
    old = tiny_gan(grad_clip=1.0, g_optimizer={"lr": 2e-4}, d_optimizer={"lr": 4e-4, "betas": [0.5, 0.999]})
    assert old.state_dict().keys() == tiny_gan().state_dict().keys()
