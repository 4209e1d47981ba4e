"""Step checkpoints and stop signals: :class:`StepCheckpoint` writes ``last.ckpt`` at step
boundaries every ``every_n_steps`` steps and/or ``every_minutes`` minutes, and on
SIGTERM/SIGUSR1/SIGINT (docs/reliability.md, "Signals"): inside a training step at the next step
boundary; in validation, sample grids and other epoch-end work at once, writing the state of the
last training step (kept in memory from that step's end). The run then exits with 75 (SIGTERM,
SIGUSR1) or 130 (SIGINT).

The neighbours: :mod:`genexp.lit.checkpoint_io` (atomic files), :mod:`genexp.lit.preemption`
(wandb marks, SLURM requeue), :mod:`genexp.lit.resume_position` (loop-state surgery).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_only

from genexp.errors import ConfigError, GenexpError, check_float, check_int
from genexp.layout import LAST_CKPT
from genexp.lit import compat
from genexp.lit.preemption import Preempted, requeue_slurm_job, tell_wandb_preempted
from genexp.signals import PREEMPTED_EXIT_CODE, STOP_SIGNALS, Interrupted, exit_status, signal_name

log = logging.getLogger("genexp")

PREEMPTION_SIGNALS = STOP_SIGNALS


class StepCheckpoint(pl.Callback):
    """``last.ckpt`` at step boundaries: periodic, and on preemption.

    Args:
        dirpath: the run's checkpoint folder (``last.ckpt`` is written there).
        every_n_steps: also save every this many training steps (null: only at epoch ends, by
            ``callbacks.model_checkpoint``).
        every_minutes: also save when this many minutes have passed since the last save (null: off).
        preemption: on SIGTERM, SIGUSR1 or SIGINT save ``last.ckpt`` (at the next step boundary, or at
            once outside a training step) and exit with status 75 (130 for SIGINT).
        slurm_requeue: after a preemption save inside a SLURM job, requeue it (``scontrol requeue``),
            as Lightning's own SLURM handling would; the requeued job resumes from ``last.ckpt``.
    """

    FILENAME = LAST_CKPT
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
        self._stop_now = False  # no step boundary before the next signal-free stretch: stop at once
        self._snapshot: dict | None = None  # the last step's checkpoint, while _stop_now
        self._world_size = 1
        self._previous_handlers: dict[int, Any] = {}
        self._last_save = self.clock()
        self._saved_step = -1
        self.saves = 0

    @property
    def path(self) -> Path:
        return self.dirpath / self.FILENAME

    # ------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame) -> None:
        if self._signal is None and not self._stop_now:
            # inside a training step: only a flag; the save happens at the step boundary, where the
            # state is consistent (and every rank takes the same decision there)
            self._signal = signum
            return
        first = self._signal is None
        self._signal = signum if first else self._signal
        if first and self._world_size > 1:
            return  # ranks decide together at the end of validation or of the epoch
        # no step boundary is coming soon (validation, sample grids, epoch end), or a second signal:
        # stop now; on_exception writes the last step's state if it is not on disk yet
        raise Interrupted(signum)

    def _install(self) -> None:
        if not self.preemption or threading.current_thread() is not threading.main_thread():
            return
        for name in PREEMPTION_SIGNALS:
            signum = getattr(signal, name)
            # replaces Lightning's SIGTERM handler (and genexp.signals') for the fit: Lightning's
            # would stop after the step without a checkpoint, or mid-validation, with status 0;
            # _uninstall (or Lightning's teardown) restores them
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _uninstall(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning registered its own handlers (Trainer._run), before the first step
        self._remove_stale_temp_files(trainer)
        self._signal, self._stop_now, self._snapshot = None, False, None
        self._world_size = trainer.world_size
        if self.preemption and compat.take_over_sigterm(trainer):
            # SIGTERM reached Lightning's handler before ours was in place: take it over, or Lightning
            # would stop after the first step without a checkpoint, with status 0
            self._signal = signal.SIGTERM
        self._install()
        self._last_save = self.clock()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._act_on_flag(trainer)
        self._uninstall()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._act_on_flag(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._act_on_flag(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._uninstall()
        snapshot, self._snapshot = self._snapshot, None
        if not isinstance(exception, Interrupted) or isinstance(exception, Preempted):
            return
        name, run = signal_name(exception.signum), self.dirpath.parent
        if trainer.state.fn != TrainerFn.FITTING:
            exception.message = (
                f"stopped by {name} during the {trainer.state.fn.value}: the checkpoints are complete, "
                f"metrics.json is not written; resume with: genexp train ckpt_path={run}"
            )
        elif not self._stop_now:  # a second signal inside a training step
            exception.message = (
                f"stopped by a second signal ({name}) inside a training step: nothing new saved, the last "
                f"complete checkpoint is the resume point; resume with: genexp train ckpt_path={run}"
            )
        elif self._write_snapshot(trainer, snapshot):
            exception.message = self._message(
                exception.signum,
                trainer.global_step,
                " (the state after that step: the signal came outside a step)",
            )
            tell_wandb_preempted(trainer)

    def _write_snapshot(self, trainer: pl.Trainer, snapshot: dict | None) -> bool:
        """Write the last step's state, unless ``last.ckpt`` holds that step already (an epoch-end
        checkpoint, which also has the validation's results)."""
        if snapshot is None or _saved_step(self.path) == snapshot.get("global_step"):
            return True
        try:
            trainer.strategy.save_checkpoint(snapshot, self.path)
        except GenexpError as err:  # a full disk: the previous last.ckpt stays the resume point
            log.warning("%s", err)
            return False
        self.saves += 1
        return True

    @rank_zero_only
    def _remove_stale_temp_files(self, trainer: pl.Trainer) -> None:
        # a process killed while writing leaves its temporary file behind; never a checkpoint
        for stale in self.dirpath.glob(".*.ckpt.tmp-*"):
            stale.unlink(missing_ok=True)

    # ------------------------------------------------------------ saving
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stop_now, self._snapshot = False, None  # a step boundary is coming again

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if compat.accumulating(trainer):
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
        if self.preemption and _epoch_work_follows(trainer):
            # validation, sample grids or the epoch end come before the next step boundary: a signal
            # there stops at once and writes this step's state, taken now (where a step-boundary
            # save would take it), unless last.ckpt already holds this step
            self._snapshot = None if step == self._saved_step else _detached(self._dump(trainer))
            self._stop_now = True

    def _dump(self, trainer: pl.Trainer) -> dict:
        return compat.dump_checkpoint(trainer)

    def _act_on_flag(self, trainer: pl.Trainer) -> None:
        """A signal that is still a flag here (under DDP, where ranks decide together; or one that
        came in after the last step of a run stopped by ``max_time``) stops the run now."""
        signalled = self._signal is not None
        if trainer.world_size > 1:
            flag = torch.tensor([float(signalled)], device=trainer.strategy.root_device)
            signalled = float(trainer.strategy.reduce(flag, reduce_op="max")) > 0
        if not signalled:
            return
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is not None:
            self._write_snapshot(trainer, snapshot)
            trainer.strategy.barrier("StepCheckpoint.preempted")
        elif trainer.global_step != self._saved_step:
            self.save(trainer)  # a consistent point: where ModelCheckpoint saves too
        self._preempted(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` now (every rank calls it; rank 0 writes)."""
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step
        self._last_save = self.clock()
        self.saves += 1

    def _message(self, signum: int | None, step: int, note: str = "") -> str:
        name = signal_name(signum) if signum is not None else "a signal from another rank"
        status = exit_status(signum) if signum is not None else PREEMPTED_EXIT_CODE
        return (
            f"preempted by {name}: saved {self.path} at global step {step}; exiting with status {status}"
            f"{note}. Resume with: genexp train ckpt_path={self.dirpath.parent}"
        )

    def _preempted(self, trainer: pl.Trainer) -> None:
        message = self._message(self._signal, trainer.global_step)
        log.warning(message)
        tell_wandb_preempted(trainer)
        if self.slurm_requeue and self._signal == signal.SIGUSR1 and trainer.is_global_zero:
            requeue_slurm_job()
        raise Preempted(message, self._signal if self._signal is not None else signal.SIGTERM)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"saves": self.saves}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saves = int(state_dict.get("saves", 0))


def _saved_step(path: Path) -> int | None:
    """The global step of the checkpoint at ``path`` (memory-mapped: only that number is read)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # noqa: BLE001 - missing or unreadable: it holds no step
        return None


def _epoch_work_follows(trainer: pl.Trainer) -> bool:
    """Whether validation, the epoch end or the end of training follows this batch (Lightning's
    own test for validation, so both agree)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    if epoch_loop.batch_progress.is_last_batch:
        return True
    if 0 < (trainer.max_steps or -1) <= trainer.global_step or trainer.should_stop:
        return True
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    if compat.max_time_is_up(timer):
        return True  # max_time is up: validation and the end of training follow
    return compat.validation_follows(trainer)


def _detached(checkpoint: dict) -> dict:
    """A copy of ``checkpoint`` that later steps cannot change: tensors copied to the CPU, except
    the optimizer states, which only the next optimizer step changes (the copy is dropped there)."""

    def copy(value: Any) -> Any:
        if torch.is_tensor(value):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v) for v in value]
        if type(value) is tuple:
            return tuple(copy(v) for v in value)
        return value

    return {k: (v if k == "optimizer_states" else copy(v)) for k, v in checkpoint.items()}
