"""The autoregressive family: causality (autograd), exact bits/dim, sampling (cache, temperature,
generator), class conditioning and argument errors. Tiny shapes; float64 where numbers are compared."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genexp.errors import ConfigError
from genexp.models.autoregressive import Categorical, LogisticMixture, to_images
from genexp.models.pixel_transformer import PixelTransformer
from genexp.models.pixelcnn import PixelCNN
from genexp.nets.pixelcnn import GatedPixelCNN, MaskedConv2d


def randomize(model: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    """Random non-zero weights everywhere (masked convs multiply their mask in, so causality must
    hold whatever the weights), so that every allowed dependence shows up in a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def images(b: int, c: int, s: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (b, c, s, s), generator=g).to(dtype)) / 255


def allowed(c: int, s: int, r: int, col: int, group: int | None) -> torch.Tensor:
    """(C, H, W) bool: the inputs that the output at pixel (r, col) may depend on: earlier pixels in
    raster order, and at the pixel itself the channels before ``group`` (None: none of them)."""
    index = torch.arange(s * s).view(s, s)
    mask = (index < r * s + col).expand(c, s, s).clone()
    if group is not None:
        mask[:group, r, col] = True
    return mask


def dependence(f, x: torch.Tensor, r: int, col: int, outputs) -> torch.Tensor:
    """(C, H, W) bool: where the gradient of f(x)[b, outputs, r, col] (randomly weighted) is non-zero
    for some image b of the batch (several inputs, so that a ReLU that happens to be off at one
    input does not hide a connection)."""
    x = x.clone().requires_grad_(True)
    out = f(x)[:, outputs, r, col]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(r * 100 + col), dtype=out.dtype)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return (grad != 0).any(0)


# ---- causality ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head,channels",
    [("categorical", 1), ("logistic_mixture", 1), ("categorical", 3), ("logistic_mixture", 3)],
)
def test_pixelcnn_output_depends_on_exactly_the_earlier_pixels(head, channels):
    """Output i: zero gradient w.r.t. pixels >= i, non-zero w.r.t. every pixel < i (no blind spot:
    4 gated blocks of k = 3 cover a 5x5 image). Categorical on RGB: R -> G -> B inside a pixel."""
    s = 5
    model = randomize(PixelCNN(s, channels, head, n_components=2, hidden_channels=12, n_layers=4).double())
    x = images(3, channels, s)
    per_channel = head == "categorical" and channels > 1
    groups = model.head.param_groups()
    for r in range(s):
        for col in range(s):
            for g in range(channels) if per_channel else [None]:
                outputs = torch.nonzero(groups == g).squeeze(1) if g is not None else slice(None)
                dep = dependence(lambda x: model.params(x, None), x, r, col, outputs)
                want = allowed(channels, s, r, col, g)
                assert not dep[~want].any(), f"pixel ({r},{col}) group {g} sees the future: {dep.nonzero()}"
                assert dep[want].all(), f"pixel ({r},{col}) group {g} misses {(want & ~dep).nonzero()}"


def naive_masked_stack(n_layers: int) -> nn.Module:
    """The first PixelCNN: a single stack of masked 3x3 convolutions (A, then B)."""

    def conv(c_in: int, c_out: int, kind: str) -> MaskedConv2d:
        mask = torch.ones(c_out, c_in, 3, 3)
        mask[:, :, 2, :] = 0  # the row below
        mask[:, :, 1, 2] = 0  # right of the centre
        if kind == "A":
            mask[:, :, 1, 1] = 0
        return MaskedConv2d(c_in, c_out, (3, 3), (1, 1, 1, 1), mask)

    layers: list[nn.Module] = [conv(1, 8, "A")]
    for _ in range(n_layers):
        layers += [nn.Tanh(), conv(8, 8, "B")]
    return nn.Sequential(*layers)


def test_the_two_stacks_have_no_blind_spot_where_a_single_masked_stack_has_one():
    """Pixel (4, 0) of a 5x5 image must see (3, 4), above and to the right: the gated PixelCNN does,
    the single masked stack (as deep) does not (its receptive field misses the upper right), and
    neither sees the pixel itself or anything after it."""
    s, r, col = 5, 4, 0
    x = images(3, 1, s)
    gated = randomize(GatedPixelCNN(1, 4, hidden_channels=8, n_layers=4, kernel_size=3).double())
    naive = randomize(naive_masked_stack(n_layers=4).double())
    dep_gated = dependence(gated, x, r, col, slice(None))[0]
    dep_naive = dependence(naive, x, r, col, slice(None))[0]
    assert dep_gated[3, 4] and not dep_naive[3, 4]
    for dep in (dep_gated, dep_naive):
        assert not dep[r, col:].any() and not dep[r + 1 :].any()


@pytest.mark.parametrize("head,channels", [("categorical", 1), ("logistic_mixture", 3)])
def test_transformer_output_depends_on_exactly_the_earlier_sub_pixels(head, channels):
    """Autograd through the real forward (shift, embeddings, causal attention): the gradient of
    output t w.r.t. the embedded inputs is non-zero exactly at input positions <= t, i.e. the start
    token and the sub-pixels < t in raster order over (row, column, channel)."""
    s = 3
    model = randomize(PixelTransformer(s, channels, head, n_components=2, d_model=8, n_layers=2, n_heads=2))
    model = model.double()
    leaf, outputs = {}, {}

    def as_leaf(module, args, out):
        leaf["emb"] = out.detach().requires_grad_(True)
        return leaf["emb"]

    hooks = [
        model.net.tok_emb.register_forward_hook(as_leaf),
        model.net.out.register_forward_hook(lambda m, a, out: outputs.__setitem__("params", out)),
    ]
    model.log_prob(images(1, channels, s))
    for h in hooks:
        h.remove()
    params, emb = outputs["params"][0], leaf["emb"]  # (L, P), (1, L, d)
    length = channels * s * s
    for t in range(length):
        (grad,) = torch.autograd.grad(params[t].sum(), emb, retain_graph=True)
        seen = (grad[0] != 0).any(-1)  # (L,) input positions
        assert seen[: t + 1].all() and not seen[t + 1 :].any(), f"output {t} sees inputs {seen.nonzero()}"


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_pixelcnn_sampling_window_gives_the_full_image_outputs(kernel_size):
    """The sampler runs the network on rows [r - reach, r] and columns [c - reach, c + reach] only:
    the output at (r, c) must equal the full image's, and the reach must be no larger than needed
    (one row or column less changes it)."""
    s = 9
    model = randomize(PixelCNN(s, 3, "categorical", hidden_channels=6, n_layers=1, kernel_size=kernel_size))
    model = model.double()
    reach = model.net.reach
    assert reach == 2 * (kernel_size // 2)
    x = images(2, 3, s)
    full = model.params(x, None)
    for r in range(s):
        for c in range(s):
            r0, c0 = max(0, r - reach), max(0, c - reach)
            window = model.params(x[:, :, r0 : r + 1, c0 : c + reach + 1], None)
            torch.testing.assert_close(window[:, :, -1, c - c0], full[:, :, r, c])
    r, c = s - 1, s // 2  # the last row: row -1 of every crop below
    one_less = [  # (crop, column of (r, c) in it)
        (x[:, :, r - reach + 1 :], c),
        (x[:, :, :, c - reach + 1 :], reach - 1),
        (x[:, :, :, : c + reach], c),
    ]
    for crop, col in one_less:
        assert not torch.allclose(model.params(crop, None)[:, :, -1, col], full[:, :, r, c])


# ---- exact bits/dim ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [PixelCNN, PixelTransformer])
@pytest.mark.parametrize("channels", [1, 3])
def test_untrained_categorical_model_is_at_exactly_8_bits_per_dim(family, channels):
    """The output layer starts at zero: uniform logits, P = 1/256 per sub-pixel, bpd = log2 256 = 8."""
    model = family(4, channels).double()
    x = images(3, channels, 4)
    bpd = model.nll_bpd(x)
    assert bpd.shape == (3,)
    torch.testing.assert_close(bpd, torch.full_like(bpd, 8.0), rtol=0, atol=1e-12)
    out = model.loss(x)
    assert out.loss.item() == pytest.approx(8.0, abs=1e-12)
    # nll in nats per image = bpd * D ln 2
    assert out.logs["nll"].item() == pytest.approx(8.0 * channels * 16 * math.log(2), rel=1e-12)


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


@pytest.mark.parametrize("family", [PixelCNN, PixelTransformer])
def test_untrained_logistic_mixture_golden_bits_per_dim(family):
    """Zero parameters: equal weights, means 0, scales exp(0) = 1, coefficients tanh(0) = 0, so every
    sub-pixel has the same discretised logistic(0, 1) on [-1, 1], level k in the bin x_k +- 1/255 of
    x_k = 2k/255 - 1:
      level 0 (edge bin to -inf):  P = sigmoid(-1 + 1/255)                      -> bpd = 1.8905...
      level 128 (x = 1/255):       P = sigmoid(2/255) - sigmoid(0) ~ (2/255)/4  -> bpd = 8.9944...
      level 255 (edge bin to +inf): P = 1 - sigmoid(1 - 1/255) = P(level 0)    (symmetric)
    """
    model = family(4, 3, head="logistic_mixture", n_components=3).double()
    p0 = sigmoid(-1 + 1 / 255)
    p128 = sigmoid(2 / 255) - sigmoid(0.0)
    assert -math.log2(p0) == pytest.approx(1.8905, abs=1e-4)
    assert -math.log2(p128) == pytest.approx(8.9944, abs=1e-4)
    for level, p in ((0, p0), (128, p128), (255, p0)):
        x = torch.full((2, 3, 4, 4), level / 255, dtype=torch.float64)
        torch.testing.assert_close(model.nll_bpd(x), torch.full((2,), -math.log2(p), dtype=torch.float64))


def test_logistic_mixture_is_a_distribution_over_the_joint_levels_of_a_pixel():
    """With random parameters and channel coupling (C = 2), P(k_R, k_G) sums to 1 over all 256^2 pairs."""
    head = LogisticMixture(channels=2, n_components=3)
    params = torch.randn(2, head.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params[:, 3:9] *= 0.5  # means well inside [-1, 1]
    params[:, 9:15] = params[:, 9:15] * 0.5 - 3.0  # log-scales around -3 (bins matter)
    k = torch.cartesian_prod(torch.arange(256), torch.arange(256))  # (65536, 2)
    for row in params:
        total = head.log_prob(row.expand(len(k), -1), k).exp().sum()
        assert total.item() == pytest.approx(1.0, abs=1e-6)


def test_categorical_log_prob_picks_the_level_of_each_channel():
    head = Categorical(channels=2)
    params = torch.randn(1, 512, dtype=torch.float64)
    k = torch.tensor([[7, 200]])
    want = torch.log_softmax(params[0, :256], 0)[7] + torch.log_softmax(params[0, 256:], 0)[200]
    torch.testing.assert_close(head.log_prob(params, k), want[None])


# ---- sampling ---------------------------------------------------------------------------------------


def sharpen(out: nn.Module) -> None:
    """Outputs driven by the features, not by the output bias, so that samples vary with the prefix
    (a greedy sample is then not a constant image)."""
    with torch.no_grad():
        out.weight.mul_(10)
        out.bias.zero_()


def tiny_transformer(head="categorical", channels=1, **kw):
    model = PixelTransformer(3, channels, head, n_components=2, d_model=8, n_layers=2, n_heads=2, **kw)
    return randomize(model, std=0.5).eval()


@pytest.mark.parametrize("head,channels", [("categorical", 1), ("logistic_mixture", 3)])
def test_cached_and_uncached_transformer_sampling_draw_identical_samples(head, channels):
    model = tiny_transformer(head, channels)
    for dtype in (torch.float64, torch.float32):
        model = model.to(dtype)
        a = model.sample(6, generator=torch.Generator().manual_seed(5), use_cache=True)
        b = model.sample(6, generator=torch.Generator().manual_seed(5), use_cache=False)
        assert torch.equal(a, b)
        assert a.dtype == dtype and len(a.unique()) > 3  # not a degenerate constant image


def test_cached_forward_equals_the_full_forward():
    net = tiny_transformer().net.double()
    tokens = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(0))
    full = net(tokens)
    cache = net.new_cache()
    steps = torch.cat([net(tokens[:, t : t + 1], cache) for t in range(9)], dim=1)
    torch.testing.assert_close(steps, full)


def pixelcnn(head="categorical", channels=1, **kw):
    model = PixelCNN(4, channels, head, n_components=2, hidden_channels=12, n_layers=2, **kw)
    if head == "categorical":
        randomize(model, std=0.8)
        sharpen(model.net.out[-1])
    else:
        randomize(model, std=0.3)  # moderate log-scales: T = 1e-6 must make the noise negligible
    return model.eval()


SAMPLERS = {
    "pixelcnn categorical RGB": lambda: pixelcnn("categorical", 3),
    "pixelcnn mixture RGB": lambda: pixelcnn("logistic_mixture", 3),
    "transformer categorical": lambda: tiny_transformer("categorical", 1),
    "transformer mixture RGB": lambda: tiny_transformer("logistic_mixture", 3),
}


@pytest.mark.parametrize("case", list(SAMPLERS))
def test_sample_follows_the_generator_and_the_temperature(case):
    model = SAMPLERS[case]()
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    a = model.sample(4, generator=g(0))
    assert a.shape[0] == 4 and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a * 255, torch.round(a * 255)), "8-bit values"
    assert torch.equal(a, model.sample(4, generator=g(0)))
    assert not torch.equal(a, model.sample(4, generator=g(1)))
    assert not torch.equal(a, model.sample(4, generator=g(0), temperature=0.5))
    # T -> 0: the most likely level at every step, whatever the noise
    mode = model.sample(4, generator=g(0), temperature=0.0)
    assert torch.equal(mode, model.sample(4, generator=g(1), temperature=1e-6))
    assert torch.equal(mode, model.sample(4, generator=g(2), temperature=0.0))


@pytest.mark.parametrize("case", ["pixelcnn categorical RGB", "transformer categorical"])
def test_greedy_samples_are_the_argmax_of_the_training_conditionals(case):
    """Sampling and log_prob use the same order: at T = 0 every sampled sub-pixel is the argmax of
    the logits that log_prob computes for it from the sample itself (channel order included)."""
    model = SAMPLERS[case]().double()
    x = model.sample(3, temperature=0.0)
    assert len(x.unique()) >= 3, "a constant image would not test the order"
    if isinstance(model, PixelCNN):
        logits = model.head.logits(model.params(x, None).permute(0, 2, 3, 1).flatten(0, 2))  # (BHW, C, 256)
        levels = torch.round(x * 255).long().permute(0, 2, 3, 1).flatten(0, 2)
    else:
        outs = {}
        hook = model.net.out.register_forward_hook(lambda m, a, out: outs.__setitem__("p", out))
        model.log_prob(x)
        hook.remove()
        logits = model.head.logits(outs["p"].flatten(0, 1))  # (B*L, 1, 256)
        levels = model.to_sequence(torch.round(x * 255).long()).reshape(-1, 1)
    assert torch.equal(logits.argmax(-1), levels)


def test_sample_refuses_a_bad_temperature_or_cache_flag():
    model = tiny_transformer()
    with pytest.raises(ConfigError, match="temperature"):
        model.sample(2, temperature=-1.0)
    with pytest.raises(ConfigError, match="use_cache"):
        model.sample(2, use_cache="yes")
    with pytest.raises(ConfigError, match="temperature"):
        pixelcnn().sample(2, temperature=-0.5)


# ---- class conditioning -----------------------------------------------------------------------------


def test_class_conditioning_changes_the_output_and_the_marginal_is_exact():
    model = pixelcnn(num_classes=3).double()
    with torch.no_grad():  # class biases as large as the other pre-activations
        for block in model.net.blocks:
            block.class_bias.weight.mul_(10)
    x = images(2, 1, 4)
    y0, y1 = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    assert not torch.allclose(model.params(x, y0), model.params(x, y1))
    per_class = torch.stack([model.log_prob(x, torch.full((2,), c)) for c in range(3)], 1)
    assert not torch.allclose(per_class[:, 0], per_class[:, 1])
    # without labels: log P(x) = log (1/3) sum_y P(x | y), the marginal under a uniform class prior
    marginal = torch.logsumexp(per_class, 1) - math.log(3)
    torch.testing.assert_close(model.log_prob(x), marginal)
    bpd = -marginal / (16 * math.log(2))
    torch.testing.assert_close(model.nll_bpd(x), bpd)
    # the loss uses the labels
    assert model.loss(x, y1).loss.item() == pytest.approx(
        (-per_class[:, 1] / (16 * math.log(2))).mean().item()
    )
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert not torch.equal(
        model.sample(4, g(), y=torch.zeros(4, dtype=torch.long)),
        model.sample(4, g(), y=torch.ones(4, dtype=torch.long)),
    )
    assert torch.equal(model.sample(4, g()), model.sample(4, g()))  # y ~ U{0..K-1} from the generator


def test_class_labels_out_of_range_name_num_classes():
    model = pixelcnn(num_classes=3)
    x = images(2, 1, 4, dtype=torch.float32)
    with pytest.raises(ConfigError, match="num_classes"):
        model.loss(x, torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match="num_classes"):
        model.loss(x, torch.tensor([-1, -1]))  # a dataset without labels


# ---- arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,kwargs,key",
    [
        (PixelCNN, {"head": "softmax"}, "head"),
        (PixelCNN, {"head": "logistic_mixture", "n_components": 0}, "n_components"),
        (PixelCNN, {"hidden_channels": 0}, "hidden_channels"),
        (PixelCNN, {"n_layers": -1}, "n_layers"),
        (PixelCNN, {"kernel_size": 4}, "kernel_size"),
        (PixelCNN, {"kernel_size": 1}, "kernel_size"),
        (PixelCNN, {"num_classes": -1}, "num_classes"),
        (PixelCNN, {"channels": 3, "hidden_channels": 2}, "hidden_channels"),
        (PixelCNN, {"image_size": 0}, "image_size"),
        (PixelTransformer, {"head": "gaussian"}, "head"),
        (PixelTransformer, {"d_model": 0}, "d_model"),
        (PixelTransformer, {"d_model": 10, "n_heads": 4}, "n_heads"),
        (PixelTransformer, {"n_layers": 0}, "n_layers"),
        (PixelTransformer, {"mlp_ratio": 0}, "mlp_ratio"),
        (PixelTransformer, {"dropout": 1.5}, "dropout"),
    ],
)
def test_bad_arguments_raise_config_errors_naming_the_key(family, kwargs, key):
    args = {"image_size": 4, "channels": 1, **kwargs}
    with pytest.raises(ConfigError) as err:
        family(**args)
    assert err.value.key == key


def test_images_hold_8_bit_levels():
    k = torch.arange(256)
    assert torch.equal(torch.round(to_images(k) * 255).long(), k)
