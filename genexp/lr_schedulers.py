"""Learning-rate schedules with linear warm-up (pure torch; config group ``scheduler/``).

Stepped once per optimizer step. ``total_steps`` is filled in by the Lightning module from the
trainer's estimate when the config leaves it null (infinite for a run under a time budget, which
only a schedule that needs the run's length refuses).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from genexp.errors import GenexpError, check_float, check_int


class WarmupConstant(LRScheduler):
    """Linear warm-up from 0 to the base LR over ``warmup_steps``, then constant."""

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 500,
        total_steps: int | None = None,
        last_epoch: int = -1,
    ):
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        # an infinite estimate (a run under a time budget) is no length: kept as unknown
        self.total_steps = total_steps if total_steps is None or math.isfinite(total_steps) else None
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


class WarmupCosine(WarmupConstant):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` x base LR at ``total_steps``."""

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 500,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ):
        self.min_lr_ratio = check_float("min_lr_ratio", min_lr_ratio, minimum=0.0, maximum=1.0)
        if total_steps is not None and not math.isfinite(total_steps):  # the trainer's estimate: no end
            raise GenexpError(
                "lr_scheduler=warmup_cosine: the cosine decay needs the run's length, and this run has "
                "none (trainer.max_epochs=-1 and no trainer.max_steps: a time budget); pass "
                "trainer.max_steps=<N>, or use lr_scheduler=warmup_constant"
            )
        if total_steps is not None:
            check_int("total_steps", total_steps, minimum=1)
        super().__init__(optimizer, warmup_steps, total_steps, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        total = max(self.total_steps or 1, self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / (total - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
