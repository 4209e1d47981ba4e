"""Warm-up LR schedules: golden LRs at known steps, config errors, and a weights-only state_dict round trip."""

from __future__ import annotations

import math

import pytest
import torch

from genexp.errors import ConfigError
from genexp.lr_schedulers import WarmupConstant, WarmupCosine

BASE_LR = 0.1


def make_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)


def lrs_over(scheduler, steps: int) -> list[float]:
    """The LR in force at optimizer steps 0 .. steps-1 (the scheduler is stepped after each)."""
    opt = scheduler.optimizer
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


def test_warmup_constant_golden():
    # lr_t = base * min(1, (t + 1) / W), W = 4: 0.1 * (1/4, 2/4, 3/4, 1, 1, 1)
    got = lrs_over(WarmupConstant(make_optimizer(), warmup_steps=4), 6)
    assert got == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1], abs=1e-15)


def test_warmup_constant_without_warmup_is_constant():
    assert lrs_over(WarmupConstant(make_optimizer(), warmup_steps=0), 3) == [BASE_LR] * 3


def test_warmup_cosine_golden():
    # W = 4, T = 10, r = min_lr_ratio = 0.1. Warm-up: lr_t = base (t + 1) / W for t < W. Then with
    # p = (t - W) / (T - W) (capped at 1): lr_t = base (r + (1 - r) (1 + cos(pi p)) / 2):
    #   t = 4: p = 0    -> 0.1 * 1                                    = 0.1
    #   t = 5: p = 1/6  -> 0.1 * (0.1 + 0.45 (1 + cos(pi/6)))          = 0.09397114317029974
    #   t = 7: p = 1/2  -> 0.1 * (0.1 + 0.45)                          = 0.055
    #   t = 10: p = 1   -> 0.1 * 0.1                                   = 0.01, and it stays there
    got = lrs_over(WarmupCosine(make_optimizer(), warmup_steps=4, total_steps=10, min_lr_ratio=0.1), 13)
    assert got[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1], abs=1e-15)
    assert got[4] == pytest.approx(0.1, abs=1e-15)
    assert got[5] == pytest.approx(0.1 * (0.1 + 0.45 * (1 + math.cos(math.pi / 6))), abs=1e-15)
    assert got[5] == pytest.approx(0.09397114317029974, abs=1e-15)
    assert got[7] == pytest.approx(0.055, abs=1e-15)
    assert got[10:] == pytest.approx([0.01, 0.01, 0.01], abs=1e-15)
    assert all(a >= b for a, b in zip(got[4:], got[5:], strict=False))  # monotone decay after the warm-up


def test_warmup_cosine_decays_to_zero_by_default():
    # r = 0, W = 0, T = 4: lr_t = base (1 + cos(pi t / 4)) / 2 -> 0.1, 0.0853553, 0.05, 0.0146447, 0
    got = lrs_over(WarmupCosine(make_optimizer(), warmup_steps=0, total_steps=4), 5)
    want = [BASE_LR * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)]
    assert got == pytest.approx(want, abs=1e-15)
    assert got[1] == pytest.approx(0.08535533905932738, abs=1e-15) and got[4] == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize(
    ("cls", "kwargs", "key"),
    [
        (WarmupConstant, {"warmup_steps": -1}, "warmup_steps"),
        (WarmupCosine, {"min_lr_ratio": 1.5}, "min_lr_ratio"),
        (WarmupCosine, {"total_steps": 0}, "total_steps"),
    ],
)
def test_bad_arguments_are_config_errors(cls, kwargs, key):
    with pytest.raises(ConfigError) as err:
        cls(make_optimizer(), **kwargs)
    assert err.value.key == key


@pytest.mark.parametrize("cls", [WarmupConstant, WarmupCosine])
def test_state_dict_round_trip_through_weights_only_load(cls, tmp_path):
    kwargs = {"warmup_steps": 3, "total_steps": 12}
    if cls is WarmupCosine:
        kwargs["min_lr_ratio"] = 0.2
    scheduler = cls(make_optimizer(), **kwargs)
    lrs_over(scheduler, 5)
    torch.save(scheduler.state_dict(), tmp_path / "sched.pt")
    state = torch.load(tmp_path / "sched.pt", weights_only=True)  # plain containers only: no pickled objects
    assert state["last_epoch"] == 5 and state["warmup_steps"] == 3

    # a scheduler built with other arguments takes the saved ones and continues exactly where the first was
    resumed = cls(make_optimizer(), warmup_steps=100)
    resumed.load_state_dict(state)
    resumed.optimizer.param_groups[0]["lr"] = scheduler.optimizer.param_groups[0]["lr"]
    assert lrs_over(resumed, 8) == lrs_over(scheduler, 8)
    assert resumed.get_last_lr() == scheduler.get_last_lr()


def test_a_run_with_no_end_takes_a_constant_schedule_and_refuses_a_cosine_one(tiny_cfg):
    """Under a time budget (``trainer.max_epochs=-1``, no ``max_steps``: what genexp compare runs)
    the trainer's step estimate is infinite: the warm-up schedule trains on; a cosine decay, which
    needs the run's length, is refused in one line instead of a float-infinity traceback."""
    from genexp.commands.train import train
    from genexp.errors import GenexpError

    budget = ["trainer.max_epochs=-1", "trainer.min_epochs=0", "trainer.max_time=00:00:00:02"]
    metrics = train(tiny_cfg(*budget, "lr_scheduler=warmup_constant", "~callbacks.sample_grid"))
    assert metrics["global_step"] > 0
    with pytest.raises(GenexpError) as err:
        train(tiny_cfg(*budget, "lr_scheduler=warmup_cosine", "~callbacks.sample_grid"))
    assert str(err.value).startswith("lr_scheduler=warmup_cosine: the cosine decay needs the run's length")
    assert "\n" not in str(err.value)
