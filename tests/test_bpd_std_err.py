"""The ODE likelihood's standard error is logged beside the value (issue 16: "Report the estimator's
standard error beside the value"): ``{stage}/bpd_std_err`` = sqrt(sum_i se_i^2) / N over the images
that got bits/dim, through a real Lightning test loop."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from genexp.lit.module import GenerativeModule
from genexp.models.base import EstimatedLikelihood, LossOutput


class StubEstimate(nn.Module):
    """A family whose bits/dim for image i is i and whose standard error is (i + 1) / 10."""

    bpd_images = 5  # only the first 5 images of the epoch count
    bpd_stages = ("test",)

    def __init__(self, std_err: bool = True):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.std_err = std_err

    def loss(self, x, y=None):
        return LossOutput(self.w * 0 + x.mean(), {})

    def sample(self, n, generator=None):
        return torch.zeros(n, 1, 2, 2)

    def nll_bpd(self, x):
        return self.nll_bpd_with_error(x)[0]

    def nll_bpd_with_error(self, x, generator=None):
        index = x[:, 0, 0, 0]  # the dataset writes each image's index into its first pixel
        return index, ((index + 1) / 10 if self.std_err else None)


def _test(model: nn.Module) -> dict:
    images = torch.arange(8, dtype=torch.float32).reshape(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous()
    loader = DataLoader(TensorDataset(images, torch.zeros(8)), batch_size=3)
    module = GenerativeModule(model, lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(module, loader, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_the_standard_error_of_the_mean_bpd_is_logged_over_the_images_that_got_bpd():
    assert isinstance(StubEstimate(), EstimatedLikelihood)
    metrics = _test(StubEstimate())
    # images 0..4 (bpd_images = 5, over batches of 3 and 2): mean bpd 2, se_i = 0.1 .. 0.5
    assert metrics["test/bpd"] == 2.0
    expected = math.sqrt(sum(((i + 1) / 10) ** 2 for i in range(5))) / 5  # sqrt(0.55) / 5 = 0.148324
    assert abs(metrics["test/bpd_std_err"] - expected) < 1e-7  # Lightning logs float32
    assert abs(expected - 0.1483239697) < 1e-9


def test_an_exact_or_bound_likelihood_logs_no_standard_error():
    metrics = _test(StubEstimate(std_err=False))
    assert metrics["test/bpd"] == 2.0 and "test/bpd_std_err" not in metrics


def test_genexp_evaluate_s_mean_carries_the_standard_error_of_the_estimate():
    from genexp.metrics.bpd import mean_bpd, mean_bpd_with_error

    images = torch.arange(6, dtype=torch.uint8).reshape(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    cpu = torch.device("cpu")
    out = mean_bpd_with_error(StubEstimate(), images, batch_size=4, device=cpu, seed=0)
    x = torch.arange(6, dtype=torch.float64) / 255  # what the stub sees: the images in [0, 1]
    assert abs(out.value - float(x.mean())) < 1e-7
    assert abs(out.std_err - float(((x + 1) / 10).pow(2).sum().sqrt() / 6)) < 1e-7
    assert mean_bpd(StubEstimate(), images, 4, cpu, 0) == out.value
    assert mean_bpd_with_error(StubEstimate(std_err=False), images, 4, cpu, 0).std_err is None
