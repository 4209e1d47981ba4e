"""Checkpoints that survive being killed: atomic writes, step/time checkpoints, graceful preemption.

- :class:`AtomicCheckpointIO` writes every checkpoint (``last.ckpt``, ``best.ckpt``) to a temporary
  file in the same folder, fsyncs it and renames it over the old one, so a kill or a full disk
  during the write leaves the previous checkpoint as it was; it refuses non-finite weights.
- :class:`StepCheckpoint` writes ``last.ckpt`` at step boundaries every ``every_n_steps`` steps
  and/or ``every_minutes`` minutes, and on SIGTERM/SIGUSR1 (a scheduler's preemption notice) at the
  next step boundary, then stops the run with :data:`PREEMPTED_EXIT_CODE`.

Fault injection for tests (environment variables, read when set): ``GENEXP_FAULT_SLOW_WRITE=<s>``
sleeps s seconds in the middle of every checkpoint write, ``GENEXP_FAULT_SLOW_STEP=<s>`` before
every training step, so a test can kill a process at those points.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only

from genexp.atomic import fsync_dir, temp_path
from genexp.errors import ConfigError, GenexpError, check_float, check_int

log = logging.getLogger("genexp")

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry" - resume the run
PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(SystemExit):
    """The run saved ``last.ckpt`` after a preemption signal and stops; ``genexp train`` exits with
    :data:`PREEMPTED_EXIT_CODE` (a SystemExit, so nothing on the way reports it as a failure)."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _fault_seconds(name: str) -> float:
    value = os.environ.get(name)
    return float(value) if value else 0.0


def nonfinite_tensors(checkpoint: dict) -> list[str]:
    """Names of the weights (``state_dict``, and the raw weights next to an EMA) that hold NaN/Inf."""
    bad = []
    for section in ("state_dict", "current_model_state"):
        for name, value in (checkpoint.get(section) or {}).items():
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                bad.append(name)
    return bad


class _SlowFile:
    """A file whose first write pauses half-way (fault injection: a kill lands inside the write)."""

    def __init__(self, file, seconds: float):
        self._file, self._seconds, self._paused = file, seconds, False

    def write(self, data) -> int:
        if self._paused or len(data) < 2:
            return self._file.write(data)
        half = len(data) // 2
        written = self._file.write(memoryview(data)[:half])
        self._file.flush()
        time.sleep(self._seconds)
        self._paused = True
        return written + self._file.write(memoryview(data)[half:])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file, flush, fsync, ``os.replace`` over the target, fsync the
    folder. Any failure removes the temporary file and keeps the previous checkpoint; a file
    system refusal (full disk, permissions) is one :class:`GenexpError` line naming the path.
    Paths with a URL scheme (``s3://``) go through Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        bad = nonfinite_tensors(checkpoint)
        if bad:
            raise GenexpError(
                f"refusing to write {path}: non-finite weights ({', '.join(bad[:3])}"
                f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}); the previous checkpoint is kept "
                "as the resume point. Try a lower optimizer.lr or trainer.gradient_clip_val=1.0"
            )
        tmp = temp_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as file:
                slow = _fault_seconds("GENEXP_FAULT_SLOW_WRITE")
                torch.save(checkpoint, _SlowFile(file, slow) if slow else file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException as err:  # also KeyboardInterrupt: never a half-written file left
            tmp.unlink(missing_ok=True)
            refused = _os_error(err)
            if refused is None:
                raise
            raise GenexpError(
                f"cannot write checkpoint {path}: {refused.strerror or refused}; the previous checkpoint is "
                "kept. Free space there or write elsewhere with paths.log_dir=<folder>"
            ) from None


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err``: torch.save's zip writer reports a failed write (a full disk)
    as its own RuntimeError, with the OSError as its context."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


class StepCheckpoint(pl.Callback):
    """``last.ckpt`` at step boundaries: periodic, and on preemption.

    Args:
        dirpath: the run's checkpoint folder (``last.ckpt`` is written there).
        every_n_steps: also save every this many training steps (null: only at epoch ends, by
            ``callbacks.model_checkpoint``).
        every_minutes: also save when this many minutes have passed since the last save (null: off).
        preemption: on SIGTERM or SIGUSR1, save at the next step boundary and exit with status 75.
        slurm_requeue: after a preemption save inside a SLURM job, requeue it (``scontrol requeue``),
            as Lightning's own SLURM handling would; the requeued job resumes from ``last.ckpt``.
    """

    FILENAME = "last.ckpt"
    clock = staticmethod(time.monotonic)  # seconds; tests replace it

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int | None = None,
        every_minutes: float | None = None,
        preemption: bool = True,
        slurm_requeue: bool = True,
    ):
        self.dirpath = Path(dirpath)
        self.every_n_steps = (
            None if every_n_steps is None else check_int("every_n_steps", every_n_steps, minimum=1)
        )
        self.every_minutes = (
            None if every_minutes is None else check_float("every_minutes", every_minutes, positive=True)
        )
        if not isinstance(preemption, bool):
            raise ConfigError("preemption", preemption, "must be true or false")
        self.preemption = preemption
        self.slurm_requeue = bool(slurm_requeue)
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._last_save = self.clock()
        self._saved_step = -1
        self._slow_step = 0.0  # fault injection (GENEXP_FAULT_SLOW_STEP), read once per fit
        self.saves = 0

    @property
    def path(self) -> Path:
        return self.dirpath / self.FILENAME

    # ------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame) -> None:
        # only a flag: the save happens at the next step boundary, where the state is consistent
        self._signal = signum

    def _install(self) -> None:
        if not self.preemption or threading.current_thread() is not threading.main_thread():
            return
        for name in PREEMPTION_SIGNALS:
            signum = getattr(signal, name)
            # replaces Lightning's SIGTERM handler for the fit (it would stop after the step without
            # a checkpoint, or mid-validation); Lightning restores the original ones at teardown
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _uninstall(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning registered its own handlers (Trainer._run), before the first step
        self._remove_stale_temp_files(trainer)
        self._signal = None
        connector = getattr(trainer, "_signal_connector", None)
        if self.preemption and connector is not None and connector.received_sigterm:
            # SIGTERM reached Lightning's handler before ours was in place: take it over, or Lightning
            # would stop after the first step without a checkpoint, with status 0
            connector.received_sigterm = False
            self._signal = signal.SIGTERM
        self._install()
        self._last_save = self.clock()
        self._slow_step = _fault_seconds("GENEXP_FAULT_SLOW_STEP")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._uninstall()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._uninstall()

    @rank_zero_only
    def _remove_stale_temp_files(self, trainer: pl.Trainer) -> None:
        # a process killed while writing leaves its temporary file behind; never a checkpoint
        for stale in self.dirpath.glob(".*.ckpt.tmp-*"):
            stale.unlink(missing_ok=True)

    # ------------------------------------------------------------ saving
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._slow_step:
            time.sleep(self._slow_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop._should_accumulate():
            return  # inside a gradient-accumulation window: its partial gradients are not saved
        step = trainer.global_step
        periodic = self.every_n_steps is not None and step % self.every_n_steps == 0
        timed = self.every_minutes is not None and self.clock() - self._last_save >= 60 * self.every_minutes
        signalled = self._signal is not None
        if trainer.world_size > 1:
            # one decision for all ranks: a signal or a clock seen by any rank (the step is the same)
            flags = torch.tensor([float(signalled), float(timed)], device=pl_module.device)
            flags = trainer.strategy.reduce(flags, reduce_op="max")
            signalled, timed = bool(flags[0] > 0), bool(flags[1] > 0)
        if (periodic or timed or signalled) and step != self._saved_step:
            self.save(trainer)
        if signalled:
            self._preempted(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` now (every rank calls it; rank 0 writes)."""
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step
        self._last_save = self.clock()
        self.saves += 1

    def _preempted(self, trainer: pl.Trainer) -> None:
        name = signal.Signals(self._signal).name if self._signal is not None else "a signal from another rank"
        message = (
            f"preempted by {name}: saved {self.path} at global step {trainer.global_step}; exiting with "
            f"status {PREEMPTED_EXIT_CODE}. Resume with: genexp train ckpt_path={self.dirpath.parent}"
        )
        log.warning(message)
        _tell_wandb_preempted(trainer)
        if self.slurm_requeue and self._signal == signal.SIGUSR1 and trainer.is_global_zero:
            _requeue_slurm_job()
        raise Preempted(message)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"saves": self.saves}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saves = int(state_dict.get("saves", 0))


def _tell_wandb_preempted(trainer: pl.Trainer) -> None:
    """Mark the wandb run as preempted (not failed): the resumed run continues it (same id)."""
    for logger in trainer.loggers if trainer.is_global_zero else []:
        if type(logger).__name__ == "WandbLogger":
            mark = getattr(logger.experiment, "mark_preempting", None)
            if callable(mark):
                try:
                    mark()
                except Exception as err:  # noqa: BLE001 - offline or disabled runs may refuse; not fatal
                    log.debug("wandb mark_preempting: %s", err)


def _requeue_slurm_job() -> None:
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
