"""The diffusion denoisers: the sinusoidal time embedding against closed forms, the DDPM UNet (its
shapes, size, time conditioning, gradients, bf16 and channels_last) and the latent TimeMLP.

The nets zero-initialise their output layers (DDPM's init), so a fresh net outputs 0 for every
input and only the output layers get gradients; tests of t-dependence and gradient flow first
perturb every parameter with small noise.
"""

from __future__ import annotations

import math

import pytest
import torch

from genexp.errors import ConfigError
from genexp.nets.embeddings import timestep_embedding
from genexp.nets.time_mlp import TimeMLP
from genexp.nets.unet import UNet

# the two presets the configs ship (model/net/unet_tiny.yaml, unet_ddpm_cifar10.yaml)
UNET_TINY = dict(
    in_channels=1,
    image_size=28,
    base_channels=32,
    channel_mults=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(7,),
    dropout=0.0,
    num_groups=8,
)
UNET_DDPM_CIFAR10 = dict(
    in_channels=3,
    image_size=32,
    base_channels=128,
    channel_mults=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(16,),
    dropout=0.1,
)
# smaller still, for the float64 and gradient checks: 8 -> 4, attention at both levels
UNET_MICRO = dict(
    in_channels=2,
    image_size=8,
    base_channels=8,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8, 4),
    dropout=0.0,
    num_heads=2,
    num_groups=4,
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def perturbed(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """``module`` with noise added to every parameter, so the zero-initialised layers pass signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# ---------------------------------------------------------------------------- timestep embedding
def test_timestep_embedding_golden_values():
    t = torch.tensor([0, 1, 7])
    emb = timestep_embedding(t, 6)
    assert emb.shape == (3, 6) and emb.dtype == torch.float32
    # t = 0: every sine is 0, every cosine is 1
    assert torch.equal(emb[0], torch.tensor([0.0, 0, 0, 1, 1, 1]))
    # dim 6: half = 3 frequencies 10000^(-i/3) = 1, 10000^(-1/3), 10000^(-2/3)
    f = [1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)]
    expected = [math.sin(f_i) for f_i in f] + [math.cos(f_i) for f_i in f]
    assert emb[1].tolist() == pytest.approx(expected, abs=1e-6)
    # a float t gives the same as the integer
    assert torch.allclose(timestep_embedding(t.float(), 6), emb)
    # max_period sets the lowest frequency: 100^(-1/2) = 0.1 at dim 4
    assert timestep_embedding(torch.tensor([10]), 4, max_period=100.0)[0, 1].item() == pytest.approx(
        math.sin(1.0)
    )


def test_timestep_embedding_separates_steps_and_pads_odd_dims():
    t = torch.arange(1000)
    emb = timestep_embedding(t, 128)
    # every pair of the 1,000 DDPM steps gets a distinct embedding
    dist = torch.cdist(emb, emb) + torch.eye(1000) * 1e9
    assert dist.min() > 0.1
    odd = timestep_embedding(t[:5], 7)
    assert odd.shape == (5, 7)
    assert torch.equal(odd[:, -1], torch.zeros(5))
    assert torch.allclose(odd[:, :6], timestep_embedding(t[:5], 6))
    with pytest.raises(ConfigError, match="dim"):
        timestep_embedding(t, 1)


# ---------------------------------------------------------------------------- UNet
def test_unet_ddpm_cifar10_has_the_papers_parameter_count():
    # the official diffusion_tf CIFAR-10 model: 35,746,307 parameters ("35.7M" in Ho et al. 2020)
    net = UNet(**UNET_DDPM_CIFAR10)
    assert n_params(net) == 35_746_307
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 32, 32), torch.tensor([999]))
    assert out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    "overrides, shape",
    [
        ({}, (2, 1, 28, 28)),
        (dict(in_channels=3, image_size=32, attention_resolutions=(8,)), (2, 3, 32, 32)),
        (dict(out_channels=2), (2, 2, 28, 28)),
    ],
    ids=["mnist", "rgb32", "out_channels"],
)
def test_unet_tiny_preserves_shape_and_starts_at_zero(overrides, shape):
    net = UNet(**{**UNET_TINY, **overrides})
    in_shape = (shape[0], net.in_channels, *shape[2:])
    out = net(torch.randn(in_shape), torch.tensor([0, 999]))
    assert out.shape == shape
    # DDPM's zero-initialised final conv: a fresh net predicts ε = 0
    assert torch.equal(out, torch.zeros(shape))


def test_unet_tiny_preset_size():
    assert n_params(UNet(**UNET_TINY)) == 1_112_801


def test_unet_output_depends_on_t_and_not_across_the_batch():
    torch.manual_seed(0)
    net = perturbed(UNet(**UNET_MICRO).double().eval())
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    out = net(x, torch.tensor([0, 500, 999]))
    out_t = net(x, torch.tensor([0, 501, 3]))
    assert torch.equal(out[0], out_t[0])  # same (x, t), same output: GroupNorm does not mix samples
    assert (out[1:] - out_t[1:]).abs().amax(dim=(1, 2, 3)).min() > 1e-6
    # a sample's output does not depend on the rest of the batch
    assert torch.allclose(net(x[:1], torch.tensor([0])), out[:1])


def test_unet_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = perturbed(UNet(**UNET_MICRO).double())
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    net(x, torch.tensor([3, 700])).square().sum().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing


def test_unet_bf16_autocast_gives_finite_output_close_to_fp32():
    torch.manual_seed(0)
    net = perturbed(UNet(**UNET_TINY).eval())
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 900])
    with torch.no_grad():
        ref = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, t)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    # bf16 keeps ~3 significant digits: agree to a few percent of the output's scale
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


def test_unet_channels_last_matches_contiguous():
    torch.manual_seed(0)
    net = perturbed(
        UNet(**{**UNET_TINY, "in_channels": 3, "image_size": 32, "attention_resolutions": (8, 16)})
    )
    net.eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 600])
    with torch.no_grad():
        ref = net(x, t)
        net = net.to(memory_format=torch.channels_last)
        out = net(x.to(memory_format=torch.channels_last), t)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


BAD_UNET_ARGS = [
    ("image_size", 30, "multiple of 4"),  # 3 levels halve twice: 30 -> 15 -> 7.5
    ("image_size", 0, ">= 1"),
    ("channel_mults", (), "at least one"),
    ("channel_mults", (1, 0), ">= 1"),
    ("channel_mults", "12", "list"),
    ("attention_resolutions", (16,), "28, 14, 7"),
    ("num_groups", 12, "must divide"),  # 32 % 12 != 0
    ("dropout", 1.0, "[0, 1)"),
    ("dropout", -0.1, ">= 0"),
    ("num_heads", 3, "must divide"),  # the 7x7 attention has 64 channels
    ("num_res_blocks", 0, ">= 1"),
    ("base_channels", 32.0, "integer"),
    ("out_channels", 0, ">= 1"),
]


@pytest.mark.parametrize(
    "key, value, message", BAD_UNET_ARGS, ids=[f"{k}={v!r}" for k, v, _ in BAD_UNET_ARGS]
)
def test_unet_bad_args_raise_config_error_naming_the_key(key, value, message):
    with pytest.raises(ConfigError) as info:
        UNet(**{**UNET_TINY, key: value})
    assert info.value.key == key
    assert message in str(info.value)


def test_unet_compiles_without_graph_breaks():
    # dynamo traces the whole forward as one graph (no data-dependent Python control flow);
    # the "eager" backend skips code generation so this stays fast on CPU
    torch.manual_seed(0)
    net = perturbed(UNet(**UNET_MICRO).eval())
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([4, 9])
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x, t), net(x, t))


# ---------------------------------------------------------------------------- TimeMLP
def test_time_mlp_shape_zero_start_and_t_dependence():
    net = TimeMLP(6, hidden_dim=16, n_blocks=2, time_dim=8)
    x = torch.randn(4, 6)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.equal(net(x, t), torch.zeros(4, 6))  # zero-initialised output layer
    perturbed(net.double())
    x = x.double()
    out = net(x, t)
    assert out.shape == (4, 6)
    other = net(x, torch.tensor([1, 11, 501, 0]))
    assert (out - other).abs().amax(dim=1).min() > 1e-6


def test_time_mlp_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = perturbed(TimeMLP(5, hidden_dim=12, n_blocks=3, dropout=0.1, time_dim=7).double())
    net(torch.randn(3, 5, dtype=torch.float64), torch.tensor([1, 2, 3])).square().sum().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing


@pytest.mark.parametrize(
    "key, value",
    [("dim", 0), ("hidden_dim", 0), ("n_blocks", 0), ("dropout", 1.0), ("time_dim", 1), ("dim", 2.5)],
)
def test_time_mlp_bad_args_raise_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        TimeMLP(**{"dim": 4, key: value})
    assert info.value.key == key
