"""The diffusion families through the runner: EMA, the bits/dim bound, samplers by config, latent
diffusion's first stage and the two-stage recipe."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_cfg, tiny
from PIL import Image

from genexp.build import build_model
from genexp.checkpoints import load_model, model_state
from genexp.commands.train import train
from genexp.diffusion.fast_samplers import DPMSolverPPSampler
from genexp.diffusion.samplers import DDIMSampler
from genexp.errors import GenexpError


def ckpt(run, name="last.ckpt"):
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    """A tiny DDPM trained for 6 steps with a short EMA (decay 0.5 makes the average visibly lag)."""
    run = tmp_path_factory.mktemp("ddpm") / "run"
    train(
        compose_cfg(
            [*tiny("ddpm"), "trainer.limit_train_batches=6", "callbacks.ema.decay=0.5", "optimizer.lr=1e-2"],
            run,
        )
    )
    return run


def test_ema_weights_differ_from_raw_and_are_what_checkpoints_load(ddpm_run):
    state = ckpt(ddpm_run)
    assert "current_model_state" in state and "averaging_state" in state
    ema, raw = model_state(state["state_dict"]), model_state(state["current_model_state"])
    weight = (
        "diffusion.net.out.weight"
        if "diffusion.net.out.weight" in ema
        else next(k for k in ema if k.startswith("diffusion.net.") and ema[k].is_floating_point())
    )
    assert ema.keys() == raw.keys()
    differ = [k for k in ema if ema[k].is_floating_point() and not torch.equal(ema[k], raw[k])]
    assert differ, "the EMA weights equal the raw weights"
    assert weight  # a net weight exists
    # the averaging counted every optimizer step
    assert int(state["averaging_state"]["n_averaged"]) == state["global_step"] == 6
    # genexp sample/evaluate rebuild from the EMA weights
    model = load_model(str(ddpm_run)).model
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k]), k


def test_sample_grids_are_drawn_from_the_ema_weights(ddpm_run):
    """The epoch's grid equals sampling the checkpoint's EMA weights with the grid's seed, not the raw ones."""
    grid = torch.from_numpy(
        __import__("numpy").asarray(Image.open(ddpm_run / "samples" / "epoch_001_samples.png").convert("L"))
    )
    loaded = load_model(str(ddpm_run))

    def as_grid(model):
        from torchvision.utils import make_grid

        x = model.sample(4, generator=torch.Generator().manual_seed(0)).float().clamp(0, 1)
        g = make_grid(x, nrow=2).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
        return g[0]

    assert torch.equal(as_grid(loaded.model), grid)
    raw = build_model(loaded.config)
    raw.load_state_dict(model_state(ckpt(ddpm_run)["current_model_state"]))
    raw.eval()
    assert not torch.equal(as_grid(raw), grid)


def test_resume_restores_the_average(ddpm_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ddpm_run, run)
    before = ckpt(run)
    cfg = compose_cfg(
        [
            *tiny("ddpm"),
            "trainer.limit_train_batches=6",
            "callbacks.ema.decay=0.5",
            "optimizer.lr=1e-2",
            "trainer.max_epochs=2",
            f"ckpt_path={run}/checkpoints/last.ckpt",
        ],
        run,
    )
    train(cfg)
    after = ckpt(run)
    assert after["global_step"] == 12
    # the average continued (12 updates), it did not restart from the raw weights
    assert int(after["averaging_state"]["n_averaged"]) == 12
    assert int(before["averaging_state"]["n_averaged"]) == 6


def test_test_bpd_is_the_bound_on_at_most_bpd_images(tmp_path, monkeypatch):
    from genexp.models.ddpm import DDPM

    seen = []
    original = DDPM.nll_bpd

    def counting(self, x, generator=None):
        seen.append(len(x))
        return original(self, x, generator)

    monkeypatch.setattr(DDPM, "nll_bpd", counting)
    metrics = train(
        compose_cfg([*tiny("ddpm"), "model.bpd_images=5", "trainer.limit_test_batches=2"], tmp_path)
    )
    assert sum(seen) == 5  # validation does not compute it (bpd_stages: [test]); test stops at 5 images
    assert metrics["test"]["test/bpd"] > 0


def test_bound_with_all_timesteps_is_the_exact_sum_and_fewer_estimate_it(tmp_path):
    torch.manual_seed(0)
    model = build_model(compose_cfg([*tiny("ddpm"), "model.net.base_channels=8"], tmp_path)).eval()
    for p in model.parameters():  # a non-trivial denoiser (the zero-init output layer predicts 0)
        p.data.add_(0.01 * torch.randn_like(p))
    x = torch.randint(0, 256, (3, 1, 16, 16), generator=torch.Generator().manual_seed(0)).float() / 255
    T = model.diffusion.timesteps  # 20 in the tiny config
    torch.manual_seed(1)
    exact = model.diffusion.bound_bpd(x * 2 - 1, T)
    torch.manual_seed(1)
    again = model.diffusion.bound_bpd(x * 2 - 1, None)
    assert torch.allclose(exact, again)
    assert exact.shape == (3,) and (exact > 0).all()
    # K = 5: L_0 and L_T exact, the 19 KL terms of t = 1..19 from one timestep per item in each of
    # the 4 blocks linspace(1, 20, 5).round() = [1, 6, 10, 15, 20] cuts them into: [1,6) [6,10) [10,15) [15,20)
    calls = []
    net = model.diffusion.net
    hook = net.register_forward_hook(lambda m, i, o: calls.append(i[1].tolist()))
    estimate = model.diffusion.bound_bpd(x * 2 - 1, 5)
    hook.remove()
    assert calls[0] == [0, 0, 0] and len(calls) == 5
    for (start, stop), ts in zip([(1, 6), (6, 10), (10, 15), (15, 20)], calls[1:]):
        assert all(start <= t < stop for t in ts), (start, stop, ts)
    assert torch.isfinite(estimate).all() and not torch.equal(estimate, exact)
    # unbiased: over repeats its mean is the exact bound's (both random only through x_t and t);
    # an evenly spaced grid [1, 7, 13, 19] weighted 19/4 was biased upwards (the KL peaks at t = 1)
    repeats = 16  # the grid was 80-100 standard errors off at 30 repeats; this is 0.7-1.3 there
    exact = torch.stack([model.diffusion.bound_bpd(x * 2 - 1, T) for _ in range(repeats)]).double()
    estimate = torch.stack([model.diffusion.bound_bpd(x * 2 - 1, 5) for _ in range(repeats)]).double()
    diff = estimate.mean(0) - exact.mean(0)  # (3,) per image
    se = (estimate.var(0) / repeats + exact.var(0) / repeats).sqrt()
    assert (diff.abs() < 4 * se + 1e-9).all(), (diff, se)


def test_the_sampler_is_chosen_by_config_and_swapped_at_sampling(ddpm_run):
    loaded = load_model(str(ddpm_run))
    assert isinstance(loaded.model.diffusion.sampler, DPMSolverPPSampler)  # model=ddpm's default
    ddim = load_model(
        str(ddpm_run),
        {
            "model.sampler": {
                "_target_": "genexp.diffusion.samplers.DDIMSampler",
                "_partial_": True,
                "steps": 5,
            }
        },
    )
    sampler = ddim.model.diffusion.sampler
    assert isinstance(sampler, DDIMSampler) and sampler.num_steps == 5
    a = ddim.model.sample(2, generator=torch.Generator().manual_seed(0))
    b = ddim.model.sample(2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 1, 16, 16)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["simple", "min_snr"])
def test_every_objective_and_weighting_trains(objective, weighting, tmp_path):
    metrics = train(
        compose_cfg(
            [*tiny("ddpm"), f"model.objective={objective}", f"model.loss_weighting={weighting}"],
            tmp_path,
        )
    )
    assert torch.isfinite(torch.tensor(metrics["test"]["test/loss"]))


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid", "quadratic"])
def test_every_schedule_trains_and_samples(schedule, tmp_path):
    cfg = compose_cfg([*tiny("ddpm"), f"schedule={schedule}"], tmp_path)
    model = build_model(cfg)
    assert model.diffusion.schedule.timesteps == 20
    out = model.loss(torch.rand(4, 1, 16, 16))
    out.loss.backward()
    assert model.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 1, 16, 16)


def test_net_that_does_not_fit_the_data_is_refused(tmp_path):
    cfg = compose_cfg([*tiny("ddpm"), "model.net.image_size=32"], tmp_path)
    with pytest.raises(
        GenexpError, match=r"model\.net=.*set model\.net\.in_channels and model\.net\.image_size"
    ):
        build_model(cfg)


# --- latent diffusion --------------------------------------------------------------------------


def test_ldm_rejects_a_missing_or_wrong_first_stage(tmp_path):
    with pytest.raises(
        GenexpError, match=r"model\.first_stage=null: latent diffusion needs a trained AE/VAE"
    ):
        build_model(compose_cfg(["model=ldm", "dataset=synthetic"], tmp_path))
    missing = tmp_path / "nope"
    with pytest.raises(GenexpError, match=rf"model\.first_stage={missing}: .*no such file or folder"):
        build_model(compose_cfg(["model=ldm", "dataset=synthetic", f"model.first_stage={missing}"], tmp_path))
    flow = tmp_path / "flow"
    train(compose_cfg(tiny("realnvp"), flow))
    with pytest.raises(GenexpError, match=r"a RealNVP checkpoint; latent diffusion needs an AE or VAE run"):
        build_model(compose_cfg(["model=ldm", "dataset=synthetic", f"model.first_stage={flow}"], tmp_path))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(GenexpError, match=r"model\.first_stage=.*a text file, not a PyTorch checkpoint"):
        build_model(compose_cfg(["model=ldm", "dataset=synthetic", f"model.first_stage={junk}"], tmp_path))


def test_ldm_scales_latents_to_unit_variance_and_keeps_the_first_stage_frozen(first_stage_run, tmp_path):
    cfg = compose_cfg(["model=ldm", *tiny("ldm")], tmp_path)
    model = build_model(cfg)
    assert not model.calibrated
    x = torch.rand(64, 1, 16, 16)
    model.calibrate(x)
    z = (model.encode_latents(x) - model.latent_shift) * model.latent_scale
    assert z.std().item() == pytest.approx(1.0, abs=1e-4) and z.mean().item() == pytest.approx(0.0, abs=1e-4)
    model.train()
    assert not model.first_stage.training
    before = {k: v.clone() for k, v in model.first_stage.state_dict().items()}
    out = model.loss(x)
    out.loss.backward()
    assert all(p.grad is None for p in model.first_stage.parameters())
    assert all(torch.equal(v, model.first_stage.state_dict()[k]) for k, v in before.items())


def test_ldm_run_calibrates_on_training_data_and_samples_through_the_decoder(first_stage_run, tmp_path):
    run = tmp_path / "run"
    metrics = train(compose_cfg(tiny("ldm"), run))
    state = ckpt(run)
    assert float(state["state_dict"]["model.latent_scale"]) > 0
    assert (run / "samples" / "epoch_001_samples.png").is_file()
    assert (run / "samples" / "epoch_001_reconstructions.png").is_file()
    assert "test/loss" in metrics["test"]
    sample = load_model(str(run)).model.sample(3, generator=torch.Generator().manual_seed(0))
    assert sample.shape == (3, 1, 16, 16) and 0 <= sample.min() and sample.max() <= 1


def test_two_stage_recipe_trains_the_first_stage_then_reuses_it(tmp_path, caplog):
    first = [
        "model=vae",
        "model.base_channels=8",
        "model.latent_dim=4",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "callbacks.sample_grid.num_samples=4",
    ]
    overrides = [
        "experiment=ldm_two_stage",
        *[o for o in tiny("ldm") if not o.startswith(("model=", "model.first_stage"))],
        "first_stage_train=[" + ",".join(f"'{o}'" for o in first) + "]",
    ]
    run = tmp_path / "run"
    train(compose_cfg(overrides, run))
    stage1 = run / "first_stage"
    assert json.loads((stage1 / "metrics.json").read_text())["model"] == "VAE"
    assert json.loads((run / "metrics.json").read_text())["model"] == "LDM"
    # the checkpoint names the first stage's run and stores its config (it rebuilds without that run)
    stored = ckpt(run)["genexp"]["config"]["model"]["first_stage"]
    assert stored["source"].startswith(str(stage1)) and stored["config"]["model"]["_target_"].endswith(".VAE")
    stamp = (stage1 / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    caplog.set_level("INFO", logger="genexp")
    train(compose_cfg(overrides, run))
    assert (stage1 / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp
    assert "first stage: reusing the finished run" in caplog.text
