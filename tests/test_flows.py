"""Flow layers and whole flow models as bijections: one parametrised test per property.

Every case runs in float64 on tiny shapes with random, non-identity parameters (the couplings'
zero-initialised heads and ActNorm's zeros would otherwise make most layers the identity).
"""

from __future__ import annotations

import io

import pytest
import torch

from genexp.flows import (
    ActNorm,
    AffineCoupling,
    FlowSequence,
    InvConv1x1,
    Logit,
    MultiScaleFlow,
    Squeeze,
)
from genexp.models.glow import Glow
from genexp.models.realnvp import RealNVP


def _multiscale():
    return MultiScaleFlow(
        (2, 4, 4),
        [
            FlowSequence([AffineCoupling(2, 6, 1, "checkerboard", 0), Squeeze(), InvConv1x1(8)]),
            FlowSequence([ActNorm(4), AffineCoupling(4, 6, 1, "channel", 1)]),
        ],
    )


# name -> (builder, input shape (B, C, H, W), input domain: "real" or "unit" for (0, 1))
CASES = {
    "actnorm": (lambda: ActNorm(3), (2, 3, 4, 4), "real"),
    "invconv_dense": (lambda: InvConv1x1(4, lu=False), (2, 4, 3, 3), "real"),
    "invconv_lu": (lambda: InvConv1x1(4, lu=True), (2, 4, 3, 3), "real"),
    "coupling_checkerboard_0": (lambda: AffineCoupling(2, 8, 1, "checkerboard", 0), (2, 2, 4, 4), "real"),
    "coupling_checkerboard_1": (lambda: AffineCoupling(2, 8, 2, "checkerboard", 1), (2, 2, 4, 4), "real"),
    "coupling_channel_0": (lambda: AffineCoupling(4, 8, 1, "channel", 0), (2, 4, 3, 3), "real"),
    "coupling_channel_1_odd": (lambda: AffineCoupling(3, 8, 0, "channel", 1), (2, 3, 3, 3), "real"),
    "squeeze": (lambda: Squeeze(), (2, 2, 4, 4), "real"),
    "logit": (lambda: Logit(0.05), (2, 2, 3, 3), "unit"),
    "multiscale": (_multiscale, (2, 2, 4, 4), "real"),
    # whole models: u in [0, 1) -> z, the logit pre-transform included
    "realnvp_checkerboard": (
        lambda: RealNVP(4, 1, n_scales=2, n_blocks=2, hidden_channels=8, n_res_blocks=1),
        (2, 1, 4, 4),
        "unit",
    ),
    "realnvp_channel": (
        lambda: RealNVP(4, 1, n_scales=2, n_blocks=2, mask="channel", hidden_channels=8, n_res_blocks=1),
        (2, 1, 4, 4),
        "unit",
    ),
    "glow_lu": (lambda: Glow(4, 1, n_scales=2, n_steps=2, hidden_channels=8), (2, 1, 4, 4), "unit"),
    "glow_dense": (
        lambda: Glow(4, 2, n_scales=1, n_steps=2, hidden_channels=8, n_res_blocks=0, lu=False),
        (2, 2, 4, 4),
        "unit",
    ),
}


def make(name: str):
    """The layer in float64 with every parameter perturbed away from its (often identity) init."""
    builder, shape, domain = CASES[name]
    torch.manual_seed(0)
    layer = builder().double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    if domain == "unit":
        x = torch.rand(shape, generator=g, dtype=torch.float64) * 0.98 + 0.01
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    return layer, x


@pytest.mark.parametrize("name", CASES)
def test_inverse_undoes_forward(name):
    layer, x = make(name)
    y, log_det = layer(x)
    assert log_det.shape == (x.shape[0],)
    assert not torch.allclose(y.reshape(x.shape), x), "the random init should not be the identity"
    assert torch.allclose(layer.inverse(y), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_log_det_equals_slogdet_of_the_autograd_jacobian(name):
    layer, x = make(name)
    _, log_det = layer(x)
    for i in range(x.shape[0]):  # one example at a time: the Jacobian is (D, D)
        xi = x[i : i + 1]
        jac = torch.autograd.functional.jacobian(
            lambda v, xi=xi: layer(v.view_as(xi))[0].flatten(), xi.flatten()
        )
        assert jac.shape == (xi.numel(), xi.numel())
        expected = torch.linalg.slogdet(jac).logabsdet
        # slogdet's LU of a badly conditioned coupling Jacobian carries ~1e-8 of float64 rounding that
        # depends on the CPU's BLAS kernels; a wrong log-det formula is off by far more than 1e-6
        assert log_det[i].item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("name", [n for n in CASES if n not in ("squeeze", "logit")])
def test_gradients_reach_every_parameter(name):
    layer, x = make(name)
    y, log_det = layer(x)
    (0.5 * y.pow(2).sum() - log_det.sum()).backward()  # a Gaussian negative log-likelihood
    names = [n for n, _ in layer.named_parameters()]
    assert names
    dead = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("name", CASES)
def test_state_dict_round_trip_gives_the_same_map(name):
    layer, x = make(name)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # a different random init (e.g. the 1x1 convolutions' rotations)
    clone = CASES[name][0]().double().eval()
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    (y, ld), (y2, ld2) = layer(x), clone(x)
    assert torch.equal(y, y2) and torch.equal(ld, ld2)


def test_couplings_change_only_their_half():
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    for parity in (0, 1):
        layer, _ = make(f"coupling_checkerboard_{parity}")
        y, _ = layer(x[:, :2])
        keep = (torch.arange(4)[:, None] + torch.arange(4)[None, :] + parity) % 2 == 0
        assert torch.equal(y[..., keep], x[:, :2][..., keep])
        assert not torch.allclose(y[..., ~keep], x[:, :2][..., ~keep])
    layer, _ = make("coupling_channel_0")
    y, _ = layer(x[..., :3, :3])
    assert torch.equal(y[:, :2], x[:, :2, :3, :3]) and not torch.allclose(y[:, 2:], x[:, 2:, :3, :3])


def test_coupling_scale_is_bounded():
    layer = AffineCoupling(2, 8, 1, "channel", 0, max_scale=1.5).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 10.0)  # huge raw scales
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    _, log_det = layer(x)
    assert (log_det.abs() <= 1.5 * 16 + 1e-9).all()  # |s| <= max_scale on each of the 16 transformed dims


def test_actnorm_initialises_from_the_first_training_batch_only():
    torch.manual_seed(0)
    layer = ActNorm(3)
    x = 5.0 + 3.0 * torch.randn(16, 3, 4, 4)
    y, _ = layer(x)
    assert bool(layer.initialized)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    bias = layer.bias.detach().clone()
    layer(x + 100.0)  # a second batch does not re-initialise
    assert torch.equal(layer.bias, bias)
    fresh = ActNorm(3).eval()
    fresh(x)  # evaluation does not initialise
    assert not bool(fresh.initialized)
    restored = ActNorm(3)
    restored.load_state_dict(layer.state_dict())
    restored(x + 100.0)  # a restored (or resumed) model keeps its parameters
    assert torch.equal(restored.bias, bias)


def _ddp_actnorm_rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    x = 2.0 + torch.randn(8, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    layer = ActNorm(3)
    layer(x[rank * 4 : (rank + 1) * 4])  # each rank sees half of the batch
    torch.save(layer.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_actnorm_initialisation_is_the_same_on_every_ddp_rank(tmp_path):
    """Two gloo ranks with different first batches end up with the single-process init on both."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_actnorm_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    x = 2.0 + torch.randn(8, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    single = ActNorm(3)
    single(x)
    for state in states:
        assert torch.allclose(state["bias"], single.bias, atol=1e-6)
        assert torch.allclose(state["logs"], single.logs, atol=1e-6)


def test_lu_parameterisation_matches_the_dense_determinant():
    torch.manual_seed(0)
    layer = InvConv1x1(6, lu=True).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    w, log_abs_det = layer._weight()
    assert log_abs_det.item() == pytest.approx(torch.linalg.slogdet(w).logabsdet.item(), abs=1e-10)
