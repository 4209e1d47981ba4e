"""Divergence: a non-finite loss or gradient stops the run, or skips the step a set number of times.

The loss is checked before backward (by the LightningModules, which call :meth:`check_loss`), the
gradients after backward and before every optimizer step (both networks of a GAN), and the
weights before every checkpoint, so non-finite weights never reach a checkpoint and the last good
``last.ckpt`` stays the resume point.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from genexp.errors import GenexpError, check_int
from genexp.models.base import LossOutput

log = logging.getLogger("genexp")

ADVICE = "Try a lower optimizer.lr or trainer.gradient_clip_val=1.0"


def _value(value: Any) -> float:
    return float(value.detach().float().mean()) if torch.is_tensor(value) else float(value)


def nonfinite_terms(logs: dict[str, Any]) -> list[str]:
    """``name=value`` of the logged loss terms that are NaN/Inf."""
    bad = []
    for name, value in logs.items():
        try:
            v = _value(value)
        except (TypeError, ValueError, RuntimeError):  # a non-numeric log entry
            continue
        if not math.isfinite(v):
            bad.append(f"{name}={v}")
    return bad


class DivergenceGuard(pl.Callback):
    """Args:
    skip_steps: how many bad training steps may be skipped in all (the batch is consumed and
        counts as a step, the weights and optimizer state stay as they were), each logged; the
        next bad step stops the run. 0 (default): the first bad step stops it.
    check_gradients: also check every gradient before each optimizer step (one host sync a step).
        Skipped under fp16 mixed precision, whose loss scaler already skips steps with
        overflowing gradients.
    """

    def __init__(self, skip_steps: int = 0, check_gradients: bool = True):
        self.skip_steps = check_int("skip_steps", skip_steps, minimum=0)
        self.check_gradients = bool(check_gradients)
        self.skipped = 0
        self._skipped_at: int | None = None  # the global step already counted as skipped
        self._drop: set[int] = set()  # ids of parameters whose gradients the next step discards

    # ------------------------------------------------------------ messages
    @staticmethod
    def _where(pl_module: pl.LightningModule, batch_idx: int | None) -> str:
        trainer = pl_module.trainer
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch + 1}"
        return where + (f", batch {batch_idx})" if batch_idx is not None else ")")

    @staticmethod
    def _family(pl_module: pl.LightningModule) -> str:
        return type(pl_module.model).__name__

    def _stop(self, message: str) -> None:
        if self.skip_steps:
            message += (
                f"; {self.skipped} bad step(s) were skipped already (divergence.skip_steps={self.skip_steps})"
            )
        raise GenexpError(
            f"{message}; stopped before any weight update or checkpoint with it. {ADVICE}, "
            "or divergence.skip_steps=N to skip up to N bad steps"
        )

    def _skip(self, pl_module: pl.LightningModule, message: str) -> None:
        step = pl_module.trainer.global_step
        if self._skipped_at != step:  # once per step, though a GAN may skip both networks
            self.skipped += 1
            self._skipped_at = step
        log.warning(
            "%s; skipped the step without updating the weights (%d of divergence.skip_steps=%d)",
            message,
            self.skipped,
            self.skip_steps,
        )

    def _may_skip(self, pl_module: pl.LightningModule) -> bool:
        return self._skipped_at == pl_module.trainer.global_step or self.skipped < self.skip_steps

    # ------------------------------------------------------------ the loss (called by the modules)
    def check_loss(
        self,
        pl_module: pl.LightningModule,
        out: LossOutput,
        stage: str,
        batch_idx: int | None = None,
        network: str | None = None,
    ) -> bool:
        """False when ``out.loss`` is finite. Else True when this training step is to be skipped
        (the caller backpropagates :meth:`zero_loss` instead), or raises GenexpError to stop.
        Ranks decide together (a sum over the process group), so under DDP they all skip or all
        stop instead of the others waiting in all-reduce. Costs one host-device sync."""
        trainer = pl_module.trainer
        bad = (~torch.isfinite(out.loss.detach())).to(torch.float32)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        if not bad.item() > 0:
            return False
        which = f" of the {network}" if network else ""
        message = (
            f"{self._family(pl_module)}: non-finite {stage} loss ({_value(out.loss)}){which} at "
            f"{self._where(pl_module, batch_idx)}"
        )
        terms = nonfinite_terms(out.logs)
        message += f": non-finite terms {', '.join(terms)}" if terms else ": its logged terms are finite"
        if stage == "train" and self._may_skip(pl_module):
            self._skip(pl_module, message)
            return True
        self._stop(message)
        return False  # not reached

    def zero_loss(self, parameters: Iterable[nn.Parameter]) -> torch.Tensor:
        """A loss with zero gradient for every parameter (so DDP's all-reduce still runs on every
        rank), whose gradients the coming optimizer step then discards: no update at all."""
        params = [p for p in parameters if p.requires_grad]
        self._drop.update(id(p) for p in params)
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    # ------------------------------------------------------------ gradients
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._drop and any(id(p) in self._drop for p in params):
            for p in params:
                p.grad = None  # the optimizer skips parameters without a gradient
            self._drop.difference_update(id(p) for p in params)
            return
        if not self.check_gradients or _scaler_handles_overflow(trainer):
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        # the largest |g| of each tensor: inf or nan only if the tensor holds one (a 2-norm could
        # overflow on large finite gradients); one sync for all of them
        peaks = torch.stack([n.float() for n in torch._foreach_norm(grads, math.inf)])
        if bool(torch.isfinite(peaks).all()):
            return
        names = {id(p): name for name, p in pl_module.named_parameters()}
        bad = [names.get(id(p), "?").removeprefix("model.") for p in params if _nonfinite(p.grad)]
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        message = (
            f"{self._family(pl_module)}: non-finite gradient at {self._where(pl_module, None)} in {shown} "
            "(the loss was finite)"
        )
        if self._may_skip(pl_module):
            self._skip(pl_module, message)
            for p in params:
                p.grad = None
            return
        self._stop(message)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        # every rank dumps the checkpoint, so every rank stops here (rank 0 alone would leave the
        # others waiting at the save's barrier); AtomicCheckpointIO checks the written dict again
        for name, p in pl_module.named_parameters():
            if not torch.isfinite(p.detach()).all():
                raise GenexpError(
                    f"{self._family(pl_module)}: non-finite weights ({name.removeprefix('model.')}) at "
                    f"{self._where(pl_module, None)}; not checkpointed, the previous checkpoint stays the "
                    f"resume point. {ADVICE}"
                )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def _nonfinite(grad: torch.Tensor | None) -> bool:
    return grad is not None and not bool(torch.isfinite(grad).all())


def _scaler_handles_overflow(trainer: pl.Trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None
