"""The generic LightningModule for every family trained with one optimizer.

A family plugs in through its contract (``loss``, optional ``nll_bpd``); this module only routes
batches, logs ``{stage}/{name}`` metrics and builds the optimizer and LR schedule it was given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn


class GenerativeModule(pl.LightningModule):
    """Args:
    model: a family (pure torch ``nn.Module`` implementing the contract).
    optimizer: ``params -> Optimizer`` (a ``_partial_`` from ``optimizer/``).
    scheduler: ``(optimizer, total_steps=...) -> LRScheduler`` or None (``scheduler/``).
    config: the resolved run config as plain containers, stored in every checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        config: dict | None = None,
    ):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.config = config or {}
        self.wandb_id: str | None = None

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        out = self.model.loss(x, y)
        # train: per-step curves under plain keys (train/loss); val/test: epoch means over all ranks
        on_step = stage == "train"
        sync = stage != "train"
        self.log(
            f"{stage}/loss",
            out.loss.detach(),
            prog_bar=True,
            on_step=on_step,
            on_epoch=not on_step,
            sync_dist=sync,
            batch_size=x.shape[0],
        )
        has_nll = stage != "train" and hasattr(self.model, "nll_bpd")
        for name, value in out.logs.items():
            if has_nll and name == "bpd":  # the family's own bound below replaces the training estimate
                continue
            self.log(
                f"{stage}/{name}",
                value,
                on_step=on_step,
                on_epoch=not on_step,
                sync_dist=sync,
                batch_size=x.shape[0],
            )
        if has_nll:
            self.log(
                f"{stage}/bpd",
                self.model.nll_bpd(x).mean(),
                on_epoch=True,
                sync_dist=True,
                batch_size=x.shape[0],
                prog_bar=stage == "val",
            )
        return out.loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.model.parameters())
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # plain containers only, so the checkpoint loads with weights_only=True and rebuilds the run
        checkpoint["genexp"] = {"config": self.config, "wandb_id": self.wandb_id}
