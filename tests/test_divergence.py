"""Divergence: a non-finite loss or gradient stops the run naming family, step and term (or skips
up to ``divergence.skip_steps`` steps); non-finite weights are never checkpointed; the last good
checkpoint stays the resume point."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import compose_cfg, group_options

from genexp.build import instantiate
from genexp.commands.train import train
from genexp.errors import GenexpError
from genexp.lit.callbacks import EpochSummary
from genexp.lit.divergence import DivergenceGuard
from genexp.models.base import LossOutput
from genexp.models.gan import GAN
from genexp.models.vae import VAE

NAN = float("nan")


@pytest.fixture
def poison(monkeypatch):
    """``poison(cls, calls, method="loss", term="recon", grad=False)``: on those training calls of
    ``cls.<method>`` the loss and the term become NaN, or (grad=True) the loss stays finite and
    one parameter's gradient becomes NaN."""

    def install(cls, calls, method="loss", term="recon", grad=False):
        original, seen = getattr(cls, method), {"n": 0}

        def patched(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if not self.training:
                return out
            seen["n"] += 1
            if seen["n"] not in calls:
                return out
            if grad:  # d/dp sqrt(0 * p) = inf * 0 = nan, while the value stays 0
                p = next(q for q in self.parameters() if q.requires_grad)
                return LossOutput(out.loss + torch.sqrt((p * 0).sum()), out.logs)
            logs = {**out.logs, term: out.logs[term] * NAN}
            return LossOutput(out.loss * NAN, logs)

        monkeypatch.setattr(cls, method, patched)

    return install


@pytest.fixture
def weights_per_step(monkeypatch):
    """Parameters and Adam step counts before and after every training step: {step: (before, after)}."""
    record: dict[int, list] = {}

    def snapshot(trainer, pl_module):
        params = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        counts = [int(s["step"]) for opt in trainer.optimizers for s in opt.state.values() if "step" in s]
        return params, counts

    class Recorder(EpochSummary):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            record[trainer.global_step] = [snapshot(trainer, pl_module)]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            record[trainer.global_step - 1].append(snapshot(trainer, pl_module))

    monkeypatch.setattr("genexp.commands.train.EpochSummary", Recorder)
    return record


def unchanged(before_after) -> bool:
    (params0, counts0), (params1, counts1) = before_after
    return all(torch.equal(params0[k], params1[k]) for k in params0) and counts0 == counts1


def test_a_nan_loss_stops_naming_family_step_and_term_and_the_last_checkpoint_resumes(
    poison, tiny_cfg, tmp_path
):
    poison(VAE, {5})  # epoch 2, its second batch (3 batches per epoch)
    with pytest.raises(GenexpError) as err:
        train(tiny_cfg("trainer.max_epochs=2", "checkpoint.every_n_steps=1"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "VAE: non-finite train loss (nan) at global step 4 (epoch 2, batch 1): non-finite terms recon=nan;"
    )
    assert "divergence.skip_steps=N" in message
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4  # step 4 was the last good one (the bad step is the fifth)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    poison(VAE, set())  # the fault is gone: the last good checkpoint is the resume point
    metrics = train(tiny_cfg("trainer.max_epochs=2", f"ckpt_path={last}"))
    assert metrics["global_step"] == 6


def test_skip_steps_skips_bad_steps_without_any_update_then_stops(
    poison, weights_per_step, tiny_cfg, tmp_path
):
    poison(VAE, {2, 4, 6}, term="kl")
    with pytest.raises(GenexpError) as err:
        train(tiny_cfg("trainer.max_epochs=3", "divergence.skip_steps=2"))
    message = str(err.value)
    assert message.startswith("VAE: non-finite train loss (nan) at global step 5 (epoch 2, batch 2)")
    assert "non-finite terms kl=nan" in message
    assert "2 bad step(s) were skipped already (divergence.skip_steps=2)" in message
    # steps 1 and 3 were skipped: no weight moved, Adam's counts stayed; the others trained
    assert unchanged(weights_per_step[1]) and unchanged(weights_per_step[3])
    assert not unchanged(weights_per_step[0]) and not unchanged(weights_per_step[2])
    assert not unchanged(weights_per_step[4])


def test_skipped_steps_are_counted_in_the_checkpoint(poison, tiny_cfg, tmp_path):
    poison(VAE, {2})
    metrics = train(tiny_cfg("divergence.skip_steps=2"))
    assert metrics["global_step"] == 3  # the skipped batch still counts as a step
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    states = [s for k, s in ckpt["callbacks"].items() if k.startswith("DivergenceGuard")]
    assert states == [{"skipped": 1}]


def test_a_nan_gradient_stops_naming_the_parameter(poison, tiny_cfg):
    poison(VAE, {2}, grad=True)
    with pytest.raises(GenexpError) as err:
        train(tiny_cfg())
    message = str(err.value)
    assert message.startswith(
        "VAE: non-finite gradient at global step 1 (epoch 1) in encoder.features.0.weight (the loss was finite)"
    ), message


def test_a_nan_gradient_is_skipped_like_a_nan_loss(poison, weights_per_step, tiny_cfg):
    poison(VAE, {2}, grad=True)
    assert train(tiny_cfg("divergence.skip_steps=1"))["global_step"] == 3
    assert unchanged(weights_per_step[1]) and not unchanged(weights_per_step[2])


def test_gan_names_the_network_and_skips_only_its_update(poison, weights_per_step, tiny_cfg):
    poison(GAN, {2}, method="d_loss", term="d_real")
    with pytest.raises(GenexpError) as err:
        train(tiny_cfg(model="gan"))
    assert str(err.value).startswith(
        "GAN: non-finite train loss (nan) of the discriminator at global step 1 (epoch 1, batch 1): "
        "non-finite terms d_real=nan"
    )
    weights_per_step.clear()
    poison(GAN, {2}, method="d_loss", term="d_real")
    assert train(tiny_cfg("divergence.skip_steps=1", model="gan"))["global_step"] == 3
    (before, _), (after, _) = weights_per_step[1]
    d = [k for k in before if ".discriminator." in k]
    g = [k for k in before if ".generator." in k]
    assert d and g
    assert all(torch.equal(before[k], after[k]) for k in d)  # D skipped its update
    assert not all(torch.equal(before[k], after[k]) for k in g)  # G still trained


def test_non_finite_weights_are_never_checkpointed(monkeypatch, tiny_cfg, tmp_path):
    original, calls = torch.optim.Adam.step, {"n": 0}

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # an update that leaves a NaN weight behind, with finite loss and gradients
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = NAN
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with pytest.raises(GenexpError) as err:
        train(tiny_cfg("trainer.max_epochs=2", "checkpoint.every_n_steps=1"))
    assert str(err.value).startswith("VAE: non-finite weights (encoder.features.0.weight) at global step 3")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_divergence_group_builds_and_its_keys_are_constructor_arguments(tmp_path):
    for option in group_options("divergence"):
        node = compose_cfg([f"divergence={option}"], tmp_path).divergence
        assert set(node) - {"_target_"} <= set(inspect.signature(DivergenceGuard).parameters)
        guard = instantiate(node, "divergence")
        assert isinstance(guard, DivergenceGuard) and guard.skip_steps == 0
    with pytest.raises(GenexpError, match=r"divergence.skip_steps=-1: must be >= 0"):
        instantiate(compose_cfg(["divergence.skip_steps=-1"], tmp_path).divergence, "divergence")
