"""Every private Lightning (and torch) API genexp relies on, in one place.

Lightning offers no public hook for these; each function names the internal it reads, and what
genexp does on a Lightning without it, so an upgrade that moves one breaks here, visibly, and
nowhere else (pytorch-lightning 2.6).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer


def find_unused_parameters(strategy: pl.strategies.Strategy) -> None:
    """Let DDP tolerate parameters without a gradient in a backward (``DDPStrategy._ddp_kwargs``:
    the keyword arguments it gives ``DistributedDataParallel``); no-op for other strategies."""
    ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
    if isinstance(strategy, pl.strategies.DDPStrategy) and isinstance(ddp_kwargs, dict):
        ddp_kwargs["find_unused_parameters"] = True


def take_over_sigterm(trainer: pl.Trainer) -> bool:
    """Whether Lightning's own SIGTERM handler saw a SIGTERM (``Trainer._signal_connector``);
    clears its flag, so Lightning does not stop after the next step without a checkpoint."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None or not connector.received_sigterm:
        return False
    connector.received_sigterm = False
    return True


def accumulating(trainer: pl.Trainer) -> bool:
    """Whether this batch is inside a gradient-accumulation window (``fit_loop._should_accumulate``)."""
    return bool(trainer.fit_loop._should_accumulate())


def dump_checkpoint(trainer: pl.Trainer) -> dict:
    """The full training state Lightning would save now (``Trainer._checkpoint_connector``)."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def max_time_is_up(timer: Timer | None) -> bool:
    """Whether a ``trainer.max_time`` timer has run out (``Timer._duration``: None without a limit)."""
    return timer is not None and timer._duration is not None and (timer.time_remaining("train") or 0) <= 0


def validation_follows(trainer: pl.Trainer) -> bool:
    """Lightning's own test for validating after this batch (``epoch_loop._should_check_val_fx``
    on the fit loop's ``_data_fetcher``); another Lightning: validate at epoch ends only."""
    try:
        epoch_loop = trainer.fit_loop.epoch_loop
        return bool(epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except AttributeError:
        return False


def fused_devices() -> tuple[str, ...]:
    """The devices with fused Adam/AdamW/SGD kernels (torch's private
    ``_get_fused_kernels_supported_devices``; without it, CUDA and CPU)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:
        return ("cuda", "cpu")


def cpu_has_amx() -> bool:
    """A CPU with AMX tiles (native bf16 matrix units: Sapphire Rapids and later), by torch's private
    ``torch.cpu._is_amx_tile_supported``; False where torch lacks it."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False
