"""genexp.models.conditioning: labels, label dropout, classifier-free guidance, the class marginal."""

from __future__ import annotations

import math

import pytest
import torch

from genexp.errors import ConfigError
from genexp.models import conditioning as c


def test_labels_for_one_class_many_or_uniform():
    cpu = torch.device("cpu")
    assert c.labels_for(3, 10, cpu, y=7).tolist() == [7, 7, 7]
    assert c.labels_for(2, 10, cpu, y=torch.tensor([1, 9])).tolist() == [1, 9]
    g = torch.Generator().manual_seed(0)
    drawn = c.labels_for(4000, 4, cpu, generator=g)
    counts = torch.bincount(drawn, minlength=4).double() / 4000
    assert torch.allclose(counts, torch.full((4,), 0.25, dtype=torch.double), atol=0.03)  # uniform
    assert c.labels_for(3, 0, cpu) is None  # unconditional


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: c.labels_for(2, 10, torch.device("cpu"), y=10), "labels must be in [0, 10)"),
        (lambda: c.labels_for(2, 10, torch.device("cpu"), y=[1, 2, 3]), "give one label or one per sample"),
        (lambda: c.labels_for(2, 0, torch.device("cpu"), y=1), "model.num_classes=N"),
        (lambda: c.check_num_classes(1), "one class is no condition"),
        (lambda: c.check_drop_prob(1.5), "cond_drop_prob=1.5"),
        (lambda: c.check_guidance(2.0, 0.0, 10), "model.cond_drop_prob=0.1"),
        (lambda: c.check_guidance(2.0, 0.1, 0), "model.num_classes=N"),
    ],
)
def test_bad_labels_and_options_fail_in_one_line(call, words):
    with pytest.raises(ConfigError) as err:
        call()
    assert words in str(err.value) and "\n" not in str(err.value)


def test_drop_labels_rate_and_extremes():
    y = torch.randint(10, (20000,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(c.drop_labels(y, 0.0, 10), y)
    assert (c.drop_labels(y, 1.0, 10) == 10).all()  # p = 1: every label is the null class
    dropped = c.drop_labels(y, 0.2, 10, torch.Generator().manual_seed(2))
    assert abs((dropped == 10).double().mean().item() - 0.2) < 0.01
    kept = dropped != 10
    assert torch.equal(dropped[kept], y[kept])  # the others are untouched


def test_guidance_mixes_conditional_and_null_passes():
    # a field linear in the label: out(x, t, y) = x * (y + 1); guidance w: (1 + w) cond - w uncond
    def field(x, t, y):
        return x * (y.to(x.dtype)[:, None] + 1) + t[:, None]

    x, t, y = torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), torch.tensor([1, 2])
    w0 = c.guided_call(field, x, t, y, 0.0, 10)
    assert torch.equal(w0, field(x, t, y))  # w = 0 is the conditional model exactly
    w2 = c.guided_call(field, x, t, y, 2.0, 10)
    # rows: 3 * (y + 1) - 2 * (10 + 1) = 3 * 2 - 22 = -16 and 3 * 3 - 22 = -13
    assert torch.equal(w2, torch.tensor([[-16.0] * 3, [-13.0] * 3], dtype=torch.float64))


def test_marginal_log_prob_is_the_uniform_mixture():
    # p(x | y) = N(x; mu_y, 1) in 1-D: log p(x) = log (1/N) sum_y N(x; mu_y, 1), closed form
    mus = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    x = torch.tensor([[0.5], [-2.0]], dtype=torch.float64)

    def log_prob(y):
        return -0.5 * (x[:, 0] - mus[y]) ** 2 - 0.5 * math.log(2 * math.pi)

    got = c.marginal_log_prob(log_prob, x, 3)
    dens = torch.exp(-0.5 * (x - mus) ** 2) / math.sqrt(2 * math.pi)  # (2, 3)
    assert torch.allclose(got, torch.log(dens.mean(1)), atol=1e-12)


def test_label_embedding_has_a_null_row_and_gradients_reach_it():
    emb = c.LabelEmbedding(4, 8)
    out = emb(torch.tensor([0, 4]))  # 4: the null class
    assert out.shape == (2, 8)
    out.sum().backward()
    grad = emb.embedding.weight.grad
    assert grad[0].abs().sum() > 0 and grad[4].abs().sum() > 0 and grad[1].abs().sum() == 0
