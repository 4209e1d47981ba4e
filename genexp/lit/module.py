"""The one LightningModule: every family trains through it (adversarial families through its
subclass :class:`genexp.lit.gan_module.GANModule`).

A family plugs in through its contract (``genexp.models.base``: ``loss``, optional ``nll_bpd``
and ``prepare``); this module only routes batches, logs ``{stage}/{name}`` metrics and builds the
optimizer and LR schedule it was given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from genexp.lit.divergence import DivergenceGuard
from genexp.models.base import EstimatedLikelihood, Likelihood, Preparable

log = logging.getLogger("genexp")


class GenerativeModule(pl.LightningModule):
    """Args:
    model: a family (pure torch ``nn.Module`` implementing the contract).
    optimizer: ``params -> Optimizer`` (a ``_partial_`` from ``optimizer/``).
    scheduler: ``(optimizer, total_steps=...) -> LRScheduler`` or None (``scheduler/``).
    config: the resolved run config as plain containers, stored in every checkpoint.
    divergence: what a non-finite loss does (stop, or skip the step); run.py also registers it
        as a callback, which checks gradients and weights.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        config: dict | None = None,
        divergence: DivergenceGuard | None = None,
    ):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.config = config or {}
        self.divergence = divergence or DivergenceGuard()
        self.wandb_id: str | None = None
        self._reset_bpd()

    def _writes_logs(self) -> bool:
        """Whether Lightning writes step logs after this training step (every log_every_n_steps).

        Each ``self.log`` call costs ~0.4 ms on CPU; a step-only value logged on other steps is
        never written, so only the progress-bar loss is logged every step.
        """
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def _step(self, batch, stage: str, batch_idx: int = 0) -> torch.Tensor:
        x, y = batch
        out = self.model.loss(x, y)
        n = x.shape[0]
        # a non-finite loss stops the run before backward, or skips the step (divergence.skip_steps)
        if self.divergence.check_loss(self, out, stage, batch_idx):
            return self.divergence.zero_loss(self.model.parameters())
        if stage == "train":  # per-step curves under plain keys (train/loss)
            self.log(
                "train/loss", out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=n
            )
            if self._writes_logs():
                for name, value in out.logs.items():
                    self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=n)
                self.log(
                    "train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False
                )
            return out.loss
        # val/test: epoch means over all ranks; a family's own likelihood bound replaces the estimate
        has_nll = isinstance(self.model, Likelihood)
        self.log(f"{stage}/loss", out.loss, prog_bar=stage == "val", sync_dist=True, batch_size=n)
        for name, value in out.logs.items():
            if not (has_nll and name == "bpd"):
                self.log(f"{stage}/{name}", value, sync_dist=True, batch_size=n)
        if has_nll and stage in getattr(self.model, "bpd_stages", ("val", "test")):
            self._log_bpd(x, stage)
        return out.loss

    def _log_bpd(self, x: torch.Tensor, stage: str) -> None:
        """The family's bits/dim (exact, a bound or an estimate), on at most ``model.bpd_images``
        images per epoch (a diffusion bound costs many forward passes per image); an estimate's
        standard errors are summed for :meth:`_log_bpd_std_err`."""
        limit = getattr(self.model, "bpd_images", None)
        if limit is not None:
            x = x[: max(0, limit - self._bpd_seen)]
            if len(x) == 0:
                return
            self._bpd_seen += len(x)
        std_err = None
        if isinstance(self.model, EstimatedLikelihood):
            bpd, std_err = self.model.nll_bpd_with_error(x)
        else:
            bpd = self.model.nll_bpd(x)
        if std_err is not None:
            self._bpd_var += std_err.detach().double().pow(2).sum()
            self._bpd_var_count += len(x)
        self.log(f"{stage}/bpd", bpd.mean(), sync_dist=True, batch_size=len(x), prog_bar=stage == "val")

    def _log_bpd_std_err(self, stage: str) -> None:
        """``{stage}/bpd_std_err``: the standard error of the epoch's mean bits/dim due to the
        estimator (sqrt(sum_i se_i^2) / N over every rank's images; the images' own spread is not
        in it), where the family's bits/dim is an estimate with 2 or more probes."""
        if not isinstance(self.model, EstimatedLikelihood):
            return
        sums = torch.tensor([float(self._bpd_var), float(self._bpd_var_count)], dtype=torch.float64)
        if self.trainer.world_size > 1:
            sums = self.all_gather(sums.to(self.device)).reshape(-1, 2).sum(0).cpu()
        var, count = (float(v) for v in sums)
        if count > 0 and math.isfinite(var):
            self.log(f"{stage}/bpd_std_err", math.sqrt(var) / count, rank_zero_only=True)

    def _reset_bpd(self) -> None:
        self._bpd_seen, self._bpd_var, self._bpd_var_count = 0, 0.0, 0

    def on_validation_epoch_start(self) -> None:
        self._reset_bpd()

    def on_test_epoch_start(self) -> None:
        self._reset_bpd()
        cost = getattr(self.model, "bpd_cost", None)  # optional: the families whose bits/dim is costly
        if (
            callable(cost)
            and "test" in getattr(self.model, "bpd_stages", ("test",))
            and self.trainer.is_global_zero
        ):
            limit = getattr(self.model, "bpd_images", None)
            images = "all test images" if limit is None else f"up to {limit} test images"
            log.info("test bits/dim of %s by %s (model.bpd_images sets how many)", images, cost())

    def on_validation_epoch_end(self) -> None:
        self._log_bpd_std_err("val")

    def on_test_epoch_end(self) -> None:
        self._log_bpd_std_err("test")

    def on_fit_start(self) -> None:
        """The family's fit-time set-up (``prepare``: latent diffusion measures its latents on
        fixed training images, the same on every rank); then each rank gets its own noise stream."""
        if isinstance(self.model, Preparable) and self.trainer.datamodule is not None:
            self.model.prepare(self.trainer.datamodule)
        if self.trainer.world_size > 1:
            # seed_everything gives every rank the same seed, hence the same noise (reparameterisation,
            # dequantisation, diffusion's t and eps, G's z) on every rank: offset it per rank
            torch.manual_seed(torch.initial_seed() + self.global_rank)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test", batch_idx)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.model.parameters())
        if self.scheduler_factory is None:
            return optimizer
        estimate = self.trainer.estimated_stepping_batches
        # infinite: no end to count to (trainer.max_epochs=-1 under a time budget, as genexp compare runs)
        total = int(estimate) if math.isfinite(estimate) else estimate
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # plain containers only, so the checkpoint loads with weights_only=True and rebuilds the run
        checkpoint["genexp"] = {"config": self.config, "wandb_id": self.wandb_id}
