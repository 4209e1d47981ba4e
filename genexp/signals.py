"""Stop signals honoured in every phase: SIGTERM, SIGUSR1 (a scheduler's preemption notice) and
SIGINT (Ctrl-C).

SLURM sends SIGKILL about 30 s after SIGTERM, so a signal must act within seconds wherever the
process is (loading, validating, testing, drawing a sample grid, a bits/dim bound, ``genexp sample``,
``genexp evaluate``). :func:`install` puts a handler on the three signals that raises
:class:`Interrupted` in the main thread at once; the exception unwinds every ``with`` and
``finally`` (so :mod:`genexp.atomic` removes a half-written file) and the process exits with
:func:`exit_status`. Inside a training step, :class:`genexp.lit.checkpointing.StepCheckpoint`
replaces this handler with a flag and saves ``last.ckpt`` at the step boundary first.

Pure Python (no torch import), so the console entry point can install it before anything heavy.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry": resume the run
PREEMPTED_EXIT_CODE = 75
# the shell's 128 + SIGINT: the user stopped it
INTERRUPTED_EXIT_CODE = 130
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def exit_status(signum: int) -> int:
    """75 for a preemption notice (SIGTERM, SIGUSR1), 130 for Ctrl-C (SIGINT)."""
    return INTERRUPTED_EXIT_CODE if signum == signal.SIGINT else PREEMPTED_EXIT_CODE


def signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum).name
    except (TypeError, ValueError):
        return "a signal"


class Interrupted(SystemExit):
    """A stop signal arrived: unwind now and exit with :func:`exit_status` (a SystemExit, so no
    ``except Exception`` on the way treats it as a failure, and Hydra lets it through)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(exit_status(signum))
        self.signum = signum
        self.message = message or f"stopped by {signal_name(signum)}"

    def __str__(self) -> str:
        return self.message


def raise_interrupted(signum: int, frame: Any) -> None:
    """The signal handler: the exception is raised in the main thread, at the bytecode it was in."""
    raise Interrupted(signum)


def install() -> dict[int, Any]:
    """Raise :class:`Interrupted` on every stop signal from now on; returns the handlers replaced
    (for :func:`restore`). A no-op outside the main thread, where signals cannot be handled."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for name in STOP_SIGNALS:
        signum = getattr(signal, name)
        previous[signum] = signal.signal(signum, raise_interrupted)
    return previous


def restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def block() -> None:
    """Ignore further stop signals (while the process hands its children their signal and exits:
    a second Ctrl-C must not leave them orphaned)."""
    if threading.current_thread() is threading.main_thread():
        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
