"""EMA of the weights through Lightning's own :class:`WeightAveraging` callback.

Lightning keeps the average in an ``AveragedModel``, swaps it in for validation, saves it as the
checkpoint's ``state_dict`` (the raw weights go to ``current_model_state``) and restores both on
resume; so ``trainer.test(ckpt_path=best)``, ``genexp sample`` and ``genexp evaluate`` all use the
averaged weights. This subclass only adds DDPM-style decay warm-up and exposes the average to the
sample-grid callback.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn

from genexp.errors import ConfigError, check_float, check_int
from genexp.models.base import ema_update


class EMA(WeightAveraging):
    """Args:
    decay: the EMA decay (DDPM: 0.9999), reached after a warm-up β_t = min(decay, (1+t)/(10+t)) so
        short runs are not dominated by the random initial weights.
    every_n_steps: update every this many optimizer steps.
    start_step: first optimizer step that updates the average.
    """

    def __init__(self, decay: float = 0.9999, every_n_steps: int = 1, start_step: int = 0):
        decay = check_float("decay", decay, minimum=0.0, maximum=1.0)
        if decay >= 1.0:
            raise ConfigError("decay", decay, "must be < 1")
        super().__init__(multi_avg_fn=ema_update(decay), use_buffers=True)
        self.decay = decay
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        self.start_step = check_int("start_step", start_step, minimum=0)
        self._raw_state: dict | None = None  # the raw weights once training ended (on_train_end)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step and step_idx % self.every_n_steps == 0

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        # only resuming a fit restores the raw weights; test/validate keep the averaged ones that the
        # checkpoint's state_dict holds (Lightning's would swap the raw weights back in while its
        # average from the fit still exists)
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning copies the average into the module here; a last.ckpt that ModelCheckpoint writes
        # after this (its own on_train_end, in a resumed run) must still hold the raw weights as
        # current_model_state, or resuming it would continue training from the average
        self._raw_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_state is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._raw_state

    def averaged_family(self) -> object | None:
        """The family (``pl_module.model``) holding the averaged weights, once training has begun."""
        averaged = self._average_model
        return None if averaged is None else averaged.module.model


def sampling_family(trainer: pl.Trainer, pl_module: pl.LightningModule):
    """What sample grids should draw from: the EMA weights when an :class:`EMA` callback runs."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, EMA):
            family = callback.averaged_family()
            if family is not None:
                return family
    return pl_module.model
