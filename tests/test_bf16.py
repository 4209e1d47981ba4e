"""Every family trains a few steps under bf16 mixed precision on the CPU: a cheap stand-in for the GPU,
where ``performance.precision=auto`` means bf16-mixed, so dtype bugs (a bf16 tensor meeting a float32
buffer, a loss or statistic computed in bf16) show without one. The AE's bf16 crash was one."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import group_options

from genexp import families
from genexp.commands.train import train


@pytest.fixture
def training_dtypes():
    """The dtypes of every tensor a module returns while training (a global forward hook)."""
    seen: set[torch.dtype] = set()

    def record(module, args, output):
        if module.training and isinstance(output, torch.Tensor):
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    yield seen
    handle.remove()


@pytest.mark.parametrize("family", group_options("model"))
def test_every_family_trains_under_bf16_mixed_on_the_cpu(
    family, tiny_cfg, tmp_path, request, training_dtypes
):
    if families.get(family).needs_first_stage:
        request.getfixturevalue("first_stage_run")  # sets GENEXP_TEST_FIRST_STAGE for tiny()
    cfg = tiny_cfg(
        "performance.precision=bf16-mixed", "trainer.limit_train_batches=2", "logger=csv", model=family
    )
    metrics = train(cfg)

    assert torch.bfloat16 in training_dtypes  # autocast ran: the networks computed in bf16
    run = tmp_path / "run"
    assert metrics["global_step"] == 2 and metrics["test"]
    assert all(math.isfinite(v) for v in metrics["test"].values()), metrics["test"]
    # every loss logged while training was finite (the divergence guard would also have stopped it)
    with (run / "csv" / "metrics.csv").open() as f:
        losses = [float(v) for row in csv.DictReader(f) for k, v in row.items() if "loss" in k and v]
    assert losses and all(math.isfinite(v) for v in losses), losses
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 2
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    assert (run / "samples" / "epoch_001_samples.png").is_file()
