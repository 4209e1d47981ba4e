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
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from genexp.errors import ConfigError, GenexpError, check_float
from genexp.lit.compat import find_unused_parameters
from genexp.lit.module import GenerativeModule
from genexp.models.base import Adversarial

log = logging.getLogger("genexp")

# DCGAN's Adam betas for both networks (Radford et al. 2016): today's recipe, also in configs/model/gan.yaml
DCGAN_OPTIMIZERS = {"generator": {"betas": [0.5, 0.999]}, "discriminator": {"betas": [0.5, 0.999]}}
NETWORKS = ("generator", "discriminator")


def grad_norm(parameters) -> torch.Tensor:
    """The L2 norm of all gradients together (the norm that norm clipping clips)."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def network_optimizer_args(optimizers) -> dict[str, dict]:
    """``{"generator": {...}, "discriminator": {...}}`` as plain dicts (lists for tuples), both
    networks present (a missing one takes the optimizer group's arguments as they are)."""
    if not isinstance(optimizers, Mapping) or set(optimizers) - set(NETWORKS):
        raise ConfigError(
            "module.optimizers", optimizers, f"must be a mapping with keys among {list(NETWORKS)}"
        )
    args = {}
    for network in NETWORKS:
        value = optimizers.get(network) or {}
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"module.optimizers.{network}",
                value,
                "must be a mapping of optimizer arguments, e.g. {lr: 2e-4}",
            )
        args[network] = {
            k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in value.items()
        }
    return args


class GANModule(GenerativeModule):
    """Args (see :class:`GenerativeModule` for the shared ones):
    model: an adversarial family (:class:`genexp.models.base.Adversarial`): ``d_loss``, ``g_loss``,
        ``sample``, ``evaluate``, ``update_ema``, ``generator``/``discriminator`` modules and
        ``d_steps_per_g_step``.
    optimizer: ``params -> Optimizer`` (a ``_partial_`` from ``optimizer/``), called once per
        network with that network's arguments from ``optimizers`` on top.
    scheduler: ``(optimizer, total_steps=...) -> LRScheduler`` or None, one per network, stepped
        once per G step.
    optimizers: ``{"generator": {...}, "discriminator": {...}}``, each network's optimizer
        arguments that replace the optimizer group's (config: ``module.optimizers``; e.g. a larger
        D learning rate for TTUR). Default: DCGAN's betas (0.5, 0.999) for both.
    clip_grad_norm: clip each network's gradient norm to this before its step (None: off;
        ``trainer.gradient_clip_val`` cannot: manual optimization).
    divergence: what a non-finite D or G loss does (stop, or skip that network's update).
    """

    def __init__(
        self,
        *args: Any,
        optimizers: Mapping | None = None,
        clip_grad_norm: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)  # model, optimizer, scheduler, config, divergence
        self.automatic_optimization = False
        self.optimizer_args = network_optimizer_args(DCGAN_OPTIMIZERS if optimizers is None else optimizers)
        self.clip_grad_norm = (
            None
            if clip_grad_norm is None
            else check_float("module.clip_grad_norm", clip_grad_norm, positive=True)
        )
        self._log_grad_norms = False
        self._grad_norms: dict[str, torch.Tensor] = {}
        for network in NETWORKS:  # a bad argument fails now, not at fit start
            try:
                self._build_optimizer(network, [nn.Parameter(torch.zeros(1))])
            except (TypeError, ValueError) as err:
                raise GenexpError(
                    f"module.optimizers.{network}={self.optimizer_args[network]}: {err}"
                ) from None

    def _build_optimizer(self, network: str, params) -> torch.optim.Optimizer:
        return self.optimizer_factory(params, **self.optimizer_args[network])

    # ---------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        # D's loss does not reach G's parameters and G's step freezes D's: under DDP some parameters
        # get no gradient in each backward, which DDP only allows when told to look for them
        find_unused_parameters(self.trainer.strategy)

    def configure_optimizers(self) -> Any:
        opt_g = self._build_optimizer("generator", self.model.generator.parameters())
        opt_d = self._build_optimizer("discriminator", self.model.discriminator.parameters())
        if self.scheduler_factory is None:
            return [opt_g, opt_d]
        total = int(self.trainer.estimated_stepping_batches)  # batches = G steps
        return [opt_g, opt_d], [self.scheduler_factory(opt, total_steps=total) for opt in (opt_g, opt_d)]

    # ---------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        opt_g, opt_d = self.optimizers()
        writes_logs = self._writes_logs()
        self._log_grad_norms = writes_logs
        for _ in range(self.model.d_steps_per_g_step):
            d_out = self._d_step(opt_d, x, y, batch_idx)
        g_out = self._g_step(opt_g, x, y, batch_idx)
        self.model.update_ema()
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()
        self._log_step(d_out, g_out, x.shape[0], writes_logs)
        return g_out.loss.detach()  # what the epoch summary prints as train/loss: G's loss

    def _d_step(self, opt_d, x: torch.Tensor, y, batch_idx: int):
        with self.toggled_optimizer(opt_d):
            d_out = self.model.d_loss(x, y)
            opt_d.zero_grad(set_to_none=True)
            d_loss = d_out.loss
            if self.divergence.check_loss(self, d_out, "train", batch_idx, network="discriminator"):
                d_loss = self.divergence.zero_loss(self.model.discriminator.parameters())  # no update
            self.manual_backward(d_loss)
            # not opt_d.step(): LightningOptimizer.step would count this step in global_step
            self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None)
        return d_out

    def _g_step(self, opt_g, x: torch.Tensor, y, batch_idx: int):
        with self.toggled_optimizer(opt_g):  # D frozen: no gradients computed for it
            g_out = self.model.g_loss(x, y)
            opt_g.zero_grad(set_to_none=True)
            g_loss = g_out.loss
            if self.divergence.check_loss(self, g_out, "train", batch_idx, network="generator"):
                g_loss = self.divergence.zero_loss(self.model.generator.parameters())
            self.manual_backward(g_loss)
            opt_g.step()  # also when skipped (no gradients, no update): global_step counts the batch
        return g_out

    def _log_step(self, d_out, g_out, n: int, writes_logs: bool) -> None:
        for name, out in (("d_loss", d_out), ("g_loss", g_out)):
            self.log(
                f"train/{name}", out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=n
            )
        if writes_logs:
            opt_g, opt_d = self.optimizers()
            values = {**d_out.logs, **g_out.logs, **self._grad_norms}
            values["g_lr"] = opt_g.param_groups[0]["lr"]
            values["d_lr"] = opt_d.param_groups[0]["lr"]
            for name, value in values.items():
                self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=n)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # after AMP's unscaling and before the step, for both networks: measure, then clip
        is_g = optimizer is self.optimizers()[0].optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._log_grad_norms:
            self._grad_norms["g_grad_norm" if is_g else "d_grad_norm"] = grad_norm(params)
        if self.clip_grad_norm is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.clip_grad_norm, gradient_clip_algorithm="norm"
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


def module_for(model: nn.Module, recipe: Mapping | None = None, **shared: Any) -> GenerativeModule:
    """The LightningModule that trains ``model``, chosen by its contract: :class:`GANModule` for
    an adversarial family (two networks), :class:`GenerativeModule` otherwise.

    Args:
        recipe: the family's extra module arguments (the config's ``module:`` node, plain
            containers; ``configs/model/gan.yaml``), or None.
        shared: ``optimizer``, ``scheduler``, ``config``, ``divergence``.
    """
    cls = GANModule if isinstance(model, Adversarial) else GenerativeModule
    return cls(model=model, **shared, **dict(recipe or {}))
