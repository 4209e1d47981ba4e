"""Preemption: what a stopped run tells the outside world. The wandb run is marked preempted (not
failed, so the resumed run continues it), a SLURM job is requeued, and Lightning's own SLURM
handling (a mid-step ``hpc_ckpt`` inside the signal handler) is turned off in favour of genexp's
step-boundary save (:class:`genexp.lit.checkpointing.StepCheckpoint`)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from genexp.signals import Interrupted

log = logging.getLogger("genexp")


class Preempted(Interrupted):
    """The run saved ``last.ckpt`` after a stop signal and stops; ``genexp train`` exits with
    :data:`PREEMPTED_EXIT_CODE` (130 after SIGINT), a SystemExit, so nothing on the way reports it
    as a failure."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(signum, message)


def tell_wandb_preempted(trainer: pl.Trainer) -> None:
    """Mark the wandb run as preempted (not failed): the resumed run continues it (same id)."""
    for logger in trainer.loggers if trainer.is_global_zero else []:
        if isinstance(logger, WandbLogger):
            mark = getattr(logger.experiment, "mark_preempting", None)
            if callable(mark):
                try:
                    mark()
                except Exception as err:  # noqa: BLE001 - offline or disabled runs may refuse; not fatal
                    log.debug("wandb mark_preempting: %s", err)


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this SLURM job (an array job's task by its array id), as Lightning's
    own SLURM handling would; the requeued job resumes from ``last.ckpt``."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    if not job:
        return
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not requeue SLURM job %s: %s", job, err)
        return
    if done.returncode == 0:
        log.info("requeued SLURM job %s", job)
    else:
        log.warning("scontrol requeue %s failed: %s", job, done.stderr.strip()[:200])


def slurm_plugins(preemption: bool) -> list:
    """Under SLURM, Lightning's SLURM environment would save its own ``hpc_ckpt`` inside the
    SIGUSR1 handler (mid-step) and requeue; with ``preemption`` genexp does both at a step boundary
    instead, so Lightning's auto-requeue is turned off."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    # the environment Lightning would pick itself (torchrun inside a SLURM job is TorchElastic)
    if not preemption or TorchElasticEnvironment.detect() or not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=False)]
