"""The family contract of DESIGN.md, checked over every family in model/."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import TINY_MODEL, compose_cfg, group_options

from genexp.build import build_model
from genexp.models.base import (
    Adversarial,
    Autoencoding,
    EstimatedLikelihood,
    Generative,
    Likelihood,
    LossOutput,
    Preparable,
    Reconstructing,
)

FAMILIES = group_options("model")


@pytest.fixture
def build(request, tmp_path):
    def make(option: str, tmp_path=tmp_path):
        if option == "ldm":
            request.getfixturevalue("first_stage_run")  # sets GENEXP_TEST_FIRST_STAGE
        cfg = compose_cfg([f"model={option}", "dataset=synthetic", *TINY_MODEL.get(option, [])], tmp_path)
        torch.manual_seed(0)
        return build_model(cfg), cfg

    return make


def batch(cfg, n: int = 6) -> torch.Tensor:
    s, c = cfg.dataset.image_size, cfg.dataset.channels
    return torch.randint(0, 256, (n, c, s, s), generator=torch.Generator().manual_seed(1)).float() / 255.0


def training_losses(model, x: torch.Tensor, y: torch.Tensor | None = None) -> list:
    """The family's objectives on a batch: ``loss``, or an adversarial family's ``d_loss`` and ``g_loss``."""
    if isinstance(model, Adversarial):
        return [model.d_loss(x, y), model.g_loss(x, y)]
    return [model.loss(x, y)]


@pytest.mark.parametrize("option", FAMILIES)
def test_loss_returns_a_differentiable_scalar_and_detached_logs(option, tmp_path, build):
    model, cfg = build(option, tmp_path)
    outs = training_losses(model, batch(cfg), torch.zeros(6, dtype=torch.long))
    for out in outs:
        assert isinstance(out, LossOutput)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.loss.requires_grad
        assert out.logs and all(v.ndim == 0 and not v.requires_grad for v in out.logs.values())
        assert all("/" not in k for k in out.logs), "the glue adds the stage prefix"
    sum(out.loss for out in outs).backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert not missing, f"no gradient reaches {missing}"
    training_losses(model, batch(cfg))  # y is optional


@pytest.mark.parametrize("option", FAMILIES)
def test_sample_is_in_data_range_and_follows_the_generator(option, tmp_path, build):
    model, cfg = build(option, tmp_path)
    model.train()
    training_losses(model, batch(cfg, 16))  # families that fit a prior on training codes see one batch
    model.eval()
    s, c = cfg.dataset.image_size, cfg.dataset.channels
    a = model.sample(5, generator=torch.Generator().manual_seed(3))
    b = model.sample(5, generator=torch.Generator().manual_seed(3))
    other = model.sample(5, generator=torch.Generator().manual_seed(4))
    assert a.shape == (5, c, s, s)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, other)


@pytest.mark.parametrize("option", FAMILIES)
def test_optional_nll_and_reconstruct(option, tmp_path, build):
    model, cfg = build(option, tmp_path)
    model.eval()
    x = batch(cfg)
    if isinstance(model, Likelihood):
        bpd = model.nll_bpd(x)
        assert bpd.shape == (6,) and torch.isfinite(bpd).all() and (bpd > 0).all()
    if isinstance(model, Reconstructing):
        r = model.reconstruct(x)
        assert r.shape == x.shape and r.min() >= 0 and r.max() <= 1
    if isinstance(model, Autoencoding):  # encode is one Tensor (a VAE's posterior mean), decode inverts it
        z = model.encode(x)
        assert isinstance(z, torch.Tensor) and z.shape == (6, model.latent_dim)
        assert model.decode(z).shape == x.shape


# which protocols each family of the talk implements (models/base.py); a new family adds its row
PROTOCOLS = {
    "ae": {Autoencoding},
    "vae": {Autoencoding, Likelihood},
    "gan": {Adversarial},
    "realnvp": {Likelihood},
    "glow": {Likelihood},
    "ddpm": {Likelihood, EstimatedLikelihood},
    "ldm": {Reconstructing, Preparable},
    "pixelcnn": {Likelihood},
    "pixel_transformer": {Likelihood},
    "flow_matching": {Likelihood, EstimatedLikelihood},
    "ncsn": {Likelihood, EstimatedLikelihood},
    "score_sde": {Likelihood, EstimatedLikelihood},
}


@pytest.mark.parametrize("option", FAMILIES)
def test_each_family_implements_its_protocols(option, tmp_path, build):
    model, _ = build(option, tmp_path)
    assert isinstance(model, Adversarial if Adversarial in PROTOCOLS.get(option, ()) else Generative)
    for protocol in (Likelihood, EstimatedLikelihood, Reconstructing, Autoencoding, Preparable):
        implied = protocol is Reconstructing and Autoencoding in PROTOCOLS.get(option, ())
        expected = protocol in PROTOCOLS.get(option, ()) or implied
        assert isinstance(model, protocol) == expected, f"{option}: {protocol.__name__}"


def test_latent_diffusion_prepares_from_the_datamodule(tmp_path, build):
    """``prepare`` takes its calibration_images (model.calibration_images, 2048 by default) fixed
    training images from the datamodule, once: a resumed run keeps its measured statistics."""
    from types import SimpleNamespace

    model, cfg = build("ldm", tmp_path)
    assert model.calibration_images == 2048 and not model.calibrated
    asked = []

    def fixed_batch(split, n):
        asked.append((split, n))
        return batch(cfg, 8), None

    model.prepare(SimpleNamespace(fixed_batch=fixed_batch))
    shift = model.latent_shift.clone()
    assert model.calibrated and asked == [("train", 2048)]
    model.prepare(SimpleNamespace(fixed_batch=fixed_batch))
    assert asked == [("train", 2048)] and torch.equal(model.latent_shift, shift)


@pytest.mark.parametrize("option", FAMILIES)
def test_state_dict_round_trip_loads_weights_only(option, tmp_path, build):
    model, cfg = build(option, tmp_path)
    model.train()
    training_losses(model, batch(cfg, 16))
    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone, _ = build(option, tmp_path)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    clone.eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(model.sample(4, generator=g()), clone.sample(4, generator=g()))
