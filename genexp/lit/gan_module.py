"""The LightningModule for adversarial families: manual optimization of G and D, alternately.

Each training batch is one G step: D first takes ``model.d_steps_per_g_step`` steps (n_critic) on
that real batch, each with fresh noise, then G takes one (the talk's alternating updates, 3.2).
Reusing the real batch for the k D steps (WGAN-GP's Algorithm 1 draws new real images each time)
keeps one batch = one step, so ``trainer.max_steps``, ``log_every_n_steps``, the logged step axis,
epoch lengths, checkpoints and LR schedules (``estimated_stepping_batches``) all count G steps.

Lightning's ``global_step`` counts every ``LightningOptimizer.step()``; D's steps are therefore
taken through the strategy (precision plugin, AMP scaler, hooks: the same path) without that
wrapper, and ``global_step`` counts G steps only. ``metrics.json``'s ``global_step`` is G steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from genexp.errors import GenexpError
from genexp.lit.divergence import DivergenceGuard

log = logging.getLogger("genexp")


def grad_norm(parameters) -> torch.Tensor:
    """The L2 norm of all gradients together (the norm that norm clipping clips)."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


class GANModule(pl.LightningModule):
    """Args:
    model: an adversarial family: ``d_loss``, ``g_loss``, ``sample``, ``evaluate``, ``update_ema``,
        ``generator``/``discriminator`` modules and its recipe (``d_steps_per_g_step``,
        ``grad_clip``, ``g_optimizer``/``d_optimizer`` arguments).
    optimizer: ``params -> Optimizer`` (a ``_partial_`` from ``optimizer/``), called once per
        network with the model's per-network arguments on top.
    scheduler: ``(optimizer, total_steps=...) -> LRScheduler`` or None, one per network, stepped
        once per G step.
    config: the resolved run config as plain containers, stored in every checkpoint.
    divergence: what a non-finite D or G loss does (stop, or skip that network's update);
        run.py also registers it as a callback, which checks both networks' gradients.
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
        self.automatic_optimization = False
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.config = config or {}
        self.divergence = divergence or DivergenceGuard()
        self.wandb_id: str | None = None
        self._log_grad_norms = False
        self._grad_norms: dict[str, torch.Tensor] = {}
        for key in ("g_optimizer", "d_optimizer"):  # a bad argument fails now, not at fit start
            try:
                self._build_optimizer(key, [nn.Parameter(torch.zeros(1))])
            except (TypeError, ValueError) as err:
                raise GenexpError(f"model.{key}={getattr(model, key)}: {err}") from None

    def _build_optimizer(self, key: str, params) -> torch.optim.Optimizer:
        return self.optimizer_factory(params, **getattr(self.model, key))

    # ---------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        # D's loss does not reach G's parameters and G's step freezes D's: under DDP some parameters
        # get no gradient in each backward, which DDP only allows when told to look for them
        strategy = self.trainer.strategy
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if isinstance(strategy, pl.strategies.DDPStrategy) and isinstance(ddp_kwargs, dict):
            ddp_kwargs["find_unused_parameters"] = True

    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:
            # seed_everything gives every rank the same seed, hence the same z: offset it per rank
            torch.manual_seed(torch.initial_seed() + self.global_rank)

    def configure_optimizers(self) -> Any:
        opt_g = self._build_optimizer("g_optimizer", self.model.generator.parameters())
        opt_d = self._build_optimizer("d_optimizer", self.model.discriminator.parameters())
        if self.scheduler_factory is None:
            return [opt_g, opt_d]
        total = int(self.trainer.estimated_stepping_batches)  # batches = G steps
        return [opt_g, opt_d], [self.scheduler_factory(opt, total_steps=total) for opt in (opt_g, opt_d)]

    # ---------------------------------------------------------------- training
    def _writes_logs(self) -> bool:
        """Whether Lightning writes step logs after this step (see GenerativeModule._writes_logs)."""
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        n = x.shape[0]
        opt_g, opt_d = self.optimizers()
        writes_logs = self._writes_logs()
        self._log_grad_norms = writes_logs
        for _ in range(self.model.d_steps_per_g_step):
            with self.toggled_optimizer(opt_d):
                d_out = self.model.d_loss(x, y)
                opt_d.zero_grad(set_to_none=True)
                d_loss = d_out.loss
                if self.divergence.check_loss(self, d_out, "train", batch_idx, network="discriminator"):
                    d_loss = self.divergence.zero_loss(self.model.discriminator.parameters())  # no update
                self.manual_backward(d_loss)
                # not opt_d.step(): LightningOptimizer.step would count this step in global_step
                self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None)
        with self.toggled_optimizer(opt_g):  # D frozen: no gradients computed for it
            g_out = self.model.g_loss(x, y)
            opt_g.zero_grad(set_to_none=True)
            g_loss = g_out.loss
            if self.divergence.check_loss(self, g_out, "train", batch_idx, network="generator"):
                g_loss = self.divergence.zero_loss(self.model.generator.parameters())
            self.manual_backward(g_loss)
            opt_g.step()  # also when skipped (no gradients, no update): global_step counts the batch
        self.model.update_ema()
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()

        self.log(
            "train/d_loss", d_out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=n
        )
        self.log(
            "train/g_loss", g_out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=n
        )
        if writes_logs:
            values = {**d_out.logs, **g_out.logs, **self._grad_norms}
            values["g_lr"] = opt_g.param_groups[0]["lr"]
            values["d_lr"] = opt_d.param_groups[0]["lr"]
            for name, value in values.items():
                self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=n)
        return g_out.loss.detach()  # what the epoch summary prints as train/loss: G's loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # after AMP's unscaling and before the step, for both networks: measure, then clip
        is_g = optimizer is self.optimizers()[0].optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._log_grad_norms:
            self._grad_norms["g_grad_norm" if is_g else "d_grad_norm"] = grad_norm(params)
        if self.model.grad_clip is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.model.grad_clip, gradient_clip_algorithm="norm"
            )

    # ---------------------------------------------------------------- evaluation
    def _eval_step(self, batch, batch_idx: int, stage: str) -> None:
        x, _ = batch
        # fixed noise per batch (and rank), so epochs' numbers differ by the model, not by the draw
        seed = batch_idx * self.trainer.world_size + self.global_rank
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for name, value in self.model.evaluate(x, generator=generator).items():
            self.log(
                f"{stage}/{name}",
                value,
                sync_dist=True,
                batch_size=x.shape[0],
                prog_bar=stage == "val" and name == "energy",
            )

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # plain containers only, so the checkpoint loads with weights_only=True and rebuilds the run
        checkpoint["genexp"] = {"config": self.config, "wandb_id": self.wandb_id}
