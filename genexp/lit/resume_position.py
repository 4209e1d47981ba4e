"""Loop-state surgery on a checkpoint before Lightning restores its loops from it: a run stopped
inside an epoch resumes that epoch (docs/reliability.md, "Exact resume")."""

from __future__ import annotations

import logging

import pytorch_lightning as pl

log = logging.getLogger("genexp")


def reopen_stopped_epoch(checkpoint: dict) -> bool:
    """Make a checkpoint of a run stopped inside an epoch (``trainer.max_steps``, ``max_time``)
    resume that epoch. Lightning counts the stopped epoch as processed, so a resumed run would
    start the next epoch's order at the old batch index (training on fewer batches that epoch, and
    validating at another point) instead of continuing as the run would have; un-counting the
    epoch makes it a mid-epoch restart, which continues the same order (genexp.data.order).
    Returns whether it changed the checkpoint."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches:
        return False
    current = epochs["current"]
    stopped_inside = batches.get("is_last_batch") is False and batches["current"]["processed"] > 0
    if not (stopped_inside and current["processed"] == current["started"] > 0):
        return False
    for counts in (epochs["current"], epochs["total"]):
        counts["processed"] -= 1
        counts["completed"] = min(counts["completed"], counts["processed"])
    checkpoint["epoch"] = current["completed"]
    return True


class ResumePosition(pl.Callback):
    """Applies :func:`reopen_stopped_epoch` to the checkpoint a run resumes from (before Lightning
    restores its loops from it)."""

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        if reopen_stopped_epoch(checkpoint):
            log.info("resuming inside epoch %d, where the run stopped", checkpoint["epoch"] + 1)
