"""The flow families (realnvp, glow): exact bits/dim, sampling, config errors, the NaN guard."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import TINY_MODEL, compose_cfg

from genexp.build import instantiate
from genexp.commands.train import train
from genexp.errors import GenexpError
from genexp.models.base import LossOutput
from genexp.models.glow import Glow
from genexp.models.realnvp import RealNVP

FLOWS = ["realnvp", "glow"]


def build(option: str, tmp_path, *overrides: str):
    cfg = compose_cfg([f"model={option}", "dataset=synthetic", *TINY_MODEL[option], *overrides], tmp_path)
    torch.manual_seed(0)
    return instantiate(cfg.model, "model")


def images(n: int = 8, c: int = 1, s: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, s, s), generator=g).double() / 255.0


@pytest.mark.parametrize(
    "model",
    [
        RealNVP(8, 1, n_scales=2, n_blocks=2, hidden_channels=8, n_res_blocks=1),
        RealNVP(8, 1, n_scales=2, n_blocks=2, mask="channel", hidden_channels=8),
        Glow(8, 1, n_scales=2, n_steps=2, hidden_channels=8),
        Glow(8, 1, n_scales=2, n_steps=2, hidden_channels=8, lu=False),
    ],
    ids=["realnvp_checkerboard", "realnvp_channel", "glow_lu", "glow_dense"],
)
def test_bpd_of_a_constant_image_through_an_identity_flow_is_hand_derived(model):
    """A freshly built flow is volume-preserving with z a rotation of y: zero-initialised coupling
    heads give s = t = 0, ActNorm is the identity before its data-dependent initialisation (and in
    eval mode), squeeze and factor-out permute, the 1x1 convolutions start as rotations
    (log |det| = 0, |z| = |y|). So for every dimension

        v = k + 1/2 (the noise fixed at the bin centre),  u = v / 256,  p = alpha + (1 - 2 alpha) u
        y = logit(p),  -log p(v) = 1/2 log(2 pi) + 1/2 y^2 - [log(1 - 2 alpha) - log p - log(1 - p)] + log 256

    and bpd = that / ln 2 (every dimension alike). For k = 127, alpha = 0.05:
    u = 127.5 / 256 = 0.498046875, p = 0.4982421875, y = -0.0070313..., -log p(v) = 5.1832 nats,
    bpd = 7.4778.
    """
    model = model.double().eval()
    alpha, k = 0.05, 127
    u = (k + 0.5) / 256
    p = alpha + (1 - 2 * alpha) * u
    y = math.log(p / (1 - p))
    nats = 0.5 * math.log(2 * math.pi) + 0.5 * y**2 - (math.log(1 - 2 * alpha) - math.log(p * (1 - p)))
    expected = (nats + math.log(256)) / math.log(2)
    assert expected == pytest.approx(7.47776, abs=1e-5)  # the golden number above
    x = torch.full((3, 1, 8, 8), k / 255.0, dtype=torch.float64)
    bpd = model.nll_bpd(x, noise=torch.full_like(x, 0.5))
    # Glow's rotations are drawn in float32: orthogonal, so log |det| = 0, only to ~1e-7
    atol = 1e-6 if isinstance(model, Glow) else 1e-10
    assert torch.allclose(bpd, torch.full((3,), expected, dtype=torch.float64), atol=atol, rtol=0)


def test_a_trained_flow_changes_the_bpd_by_exactly_its_log_det():
    """bpd = (-log N(z) - log |det dz/du| + D log 256) / (D ln 2), checked term by term."""
    model = RealNVP(8, 1, n_scales=2, n_blocks=2, hidden_channels=8).double()
    x = images(4, s=8)
    model.loss(x)  # ActNorm initialises from this batch
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    noise = torch.rand_like(x)
    z, log_det = model((torch.round(x * 255) + noise) / 256)
    d = x[0].numel()
    nats = 0.5 * z.pow(2).sum(1) + 0.5 * d * math.log(2 * math.pi) - log_det + d * math.log(256)
    assert torch.allclose(model.nll_bpd(x, noise=noise), nats / (d * math.log(2)), atol=1e-10, rtol=0)


@pytest.mark.parametrize("option", FLOWS)
def test_save_load_gives_identical_log_likelihoods(option, tmp_path):
    model = build(option, tmp_path)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = images(16).float()
    for _ in range(3):  # ActNorm initialised, weights moved away from the identity
        opt.zero_grad()
        model.loss(x).loss.backward()
        opt.step()
    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = build(option, tmp_path)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    clone.eval()
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))
    a, b = model.log_prob(x, noise=noise), clone.log_prob(x, noise=noise)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    clone.train()
    clone.loss(x + 0.0)  # the restored ActNorm does not re-initialise on the next training batch
    clone.eval()
    assert torch.equal(clone.log_prob(x, noise=noise), a)


@pytest.mark.parametrize("option", FLOWS)
def test_temperature_samples_are_8_bit_and_shrink_towards_the_mode(option, tmp_path):
    model = build(option, tmp_path)
    model.train()
    model.loss(images(16).float())
    model.eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    hot, cold = model.sample(16, generator=g()), model.sample(16, generator=g(), temperature=0.7)
    for s in (hot, cold):
        assert s.shape == (16, 1, 16, 16) and s.min() >= 0 and s.max() <= 1
        assert torch.equal(s * 255, torch.round(s * 255)), "samples hold 8-bit levels like the data"
    mode = model.sample(3, generator=g(), temperature=0.0)
    assert torch.equal(mode[0], mode[1]) and torch.equal(mode[0], mode[2])
    assert (cold - mode[:1]).abs().mean() < (hot - mode[:1]).abs().mean()
    with pytest.raises(GenexpError, match="temperature=-1"):
        model.sample(2, temperature=-1.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model=realnvp", "dataset.image_size=18", "model.n_scales=3"],
            r"model\.image_size=18: realnvp with n_scales=3 squeezes 2 time\(s\), so image_size must be a multiple of 4",
        ),
        (
            ["model=realnvp", "model.mask=channel", "model.n_scales=3", "dataset.image_size=28"],
            r"model\.image_size=28: realnvp with n_scales=3 squeezes 3 time\(s\), so image_size must be a multiple of 8",
        ),
        (
            ["model=glow", "dataset.image_size=28", "model.n_scales=3"],
            r"model\.image_size=28: glow with n_scales=3 squeezes 3 time\(s\).*multiple of 8",
        ),
        (
            ["model=realnvp", "model.mask=stripes"],
            r"model\.mask='stripes': must be one of checkerboard, channel",
        ),
        (["model=realnvp", "model.n_scales=0"], r"model\.n_scales=0: must be >= 1"),
        (["model=realnvp", "model.n_blocks=0"], r"model\.n_blocks=0: must be >= 1"),
        (["model=realnvp", "model.actnorm=maybe"], r"model\.actnorm='maybe': must be one of True, False"),
        (["model=glow", "model.alpha=0.5"], r"model\.alpha=0\.5: must be in \(0, 0\.5\)"),
        (["model=glow", "model.alpha=0"], r"model\.alpha=0\.0: must be in \(0, 0\.5\)"),
        (["model=glow", "model.n_steps=0"], r"model\.n_steps=0: must be >= 1"),
        (["model=glow", "model.hidden_channels=0"], r"model\.hidden_channels=0: must be >= 1"),
        (["model=glow", "model.max_scale=0"], r"model\.max_scale=0: must be > 0"),
        (["model=glow", "model.lu=yes"], r"model\.lu='yes': must be one of True, False"),
    ],
)
def test_bad_values_name_the_key(overrides, message, tmp_path):
    cfg = compose_cfg(["dataset=synthetic", *overrides], tmp_path)
    with pytest.raises(GenexpError, match=message) as err:
        instantiate(cfg.model, "model")
    assert "\n" not in str(err.value)


def test_the_issue_commands_build(tmp_path):
    """genexp train model=realnvp model.n_scales=2 model.n_blocks=4 model.mask=checkerboard (mnist5k)."""
    cfg = compose_cfg(
        ["model=realnvp", "model.n_scales=2", "model.n_blocks=4", "model.mask=checkerboard"], tmp_path
    )
    model = instantiate(cfg.model, "model")
    assert model.flow.latent_shapes == [(2, 14, 14), (2, 14, 14)]
    assert model.num_dims == 28 * 28
    # genexp train experiment=glow_cifar10 accelerator=gpu
    cfg = compose_cfg(["experiment=glow_cifar10", "accelerator=gpu"], tmp_path)
    assert cfg.trainer.accelerator == "gpu" and (cfg.model.image_size, cfg.model.channels) == (32, 3)
    assert (cfg.model.n_scales, cfg.model._target_) == (3, "genexp.models.glow.Glow")


@pytest.mark.parametrize("option", FLOWS)
def test_a_tiny_run_reports_bpd_and_writes_the_temperature_grid(option, tiny_cfg, tmp_path):
    metrics = train(tiny_cfg(model=option))
    assert 0 < metrics["test"]["test/bpd"] < 16
    assert {"test/prior_bpd", "test/log_det_bpd"} <= set(metrics["test"])
    for name in ("epoch_001_samples.png", "epoch_001_samples_t0.7.png"):
        png = tmp_path / "run" / "samples" / name
        assert png.is_file() and png.stat().st_size > 100, png


@pytest.fixture
def nan_on_training_call(monkeypatch):
    """RealNVP.loss returns NaN on the given training call (1-based), otherwise the real loss."""

    def install(when: int):
        original, calls = RealNVP.loss, {"n": 0}

        def loss(self, x, y=None):
            out = original(self, x, y)
            if self.training:
                calls["n"] += 1
                if calls["n"] == when:
                    return LossOutput(out.loss * float("nan"), out.logs)
            return out

        monkeypatch.setattr(RealNVP, "loss", loss)

    return install


def test_a_nan_loss_stops_the_run_naming_the_step_and_writes_no_nan_checkpoint(
    nan_on_training_call, tiny_cfg, tmp_path
):
    nan_on_training_call(5)  # epoch 2, its second batch (3 batches per epoch)
    with pytest.raises(GenexpError) as err:
        train(tiny_cfg("trainer.max_epochs=2", model="realnvp"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("RealNVP: non-finite train loss (nan) at global step 4 (epoch 2, batch 1)")
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["best.ckpt", "last.ckpt"]  # from epoch 1 only
    for name in ckpts:
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / name, weights_only=True)
        assert ckpt["global_step"] == 3
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_nan_loss_is_one_line_on_the_command_line(nan_on_training_call, tiny_cfg, capsys, monkeypatch):
    from genexp.cli import _guard

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # CI sets it; users see one line
    nan_on_training_call(1)
    with pytest.raises(SystemExit) as exit_info:
        _guard(train, tiny_cfg(model="realnvp"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("genexp: error: RealNVP: non-finite train loss (nan) at global step 0")
