"""Progress of genexp's long waits: a bar in a terminal, periodic log lines (percent, ETA) otherwise.

Pure Python (no torch, Lightning or Hydra), so the math packages' loops can use it: a sampler wraps
its steps in :func:`track`, a Lightning callback opens a :func:`task` per test epoch. Both cost
nothing unless a command has turned reporting on with :func:`reporting` (``genexp train``,
``sample``, ``evaluate`` and ``compare`` do, on rank zero); library calls and tests stay silent.

Nested waits report as one line: the innermost loop's count, the outer ones' positions and the
overall fraction and ETA from all of them, e.g.

    sampling 2/4 > ddpm steps 600/1000 | 40% | 1m12s elapsed, ETA 1m48s
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

log = logging.getLogger("genexp")

LOG_INTERVAL_S = 15.0  # seconds between log lines when the output is not a terminal
INTERVAL_ENV = "GENEXP_PROGRESS_INTERVAL"  # overrides it (seconds; 0: a line per step)


class Task:
    """One level of a nested wait: ``total`` units (None: unknown), ``done`` of them finished.

    ``span``: the units the inner levels are working on now (a batch of 250 images: 250), so their
    share counts for that many; ``ordinal``: an outer level reads as the unit in progress
    (``batch 2/4``), else as the units done (``images 250/256``)."""

    def __init__(self, what: str, total: int | None, ordinal: bool = True):
        self.what = what
        self.total = total if total is None or total > 0 else None
        self.done = 0
        self.span = 1
        self.ordinal = ordinal

    def advance(self, units: int = 1) -> None:
        self.done += units
        if _reporter is not None:
            _reporter.update(_stack)


_stack: list[Task] = []
_reporter: Reporter | None = None


def overall(stack: list[Task]) -> float:
    """The finished share of the outermost task: each level's position plus its inner levels' share
    of the ``span`` units in progress (a level of unknown total counts as 0 from there inwards)."""
    share = 0.0
    for i, level in enumerate(reversed(stack)):
        if level.total is None:
            share = 0.0
            continue
        inner = share * level.span if i else 0.0
        share = min((level.done + inner) / level.total, 1.0)
    return share


def describe(stack: list[Task]) -> str:
    """``outer 2/4 > inner 600/1000``: the outer levels' current unit (1-based), the innermost's count."""
    parts = []
    for i, level in enumerate(stack):
        total = "?" if level.total is None else str(level.total)
        count = level.done if i == len(stack) - 1 or not level.ordinal else level.done + 1
        if level.total is not None:
            count = min(count, level.total)
        parts.append(f"{level.what} {count}/{total}")
    return " > ".join(parts)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def log_interval() -> float:
    """:data:`LOG_INTERVAL_S`, or the ``GENEXP_PROGRESS_INTERVAL`` environment variable's seconds."""
    value = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(float(value), 0.0) if value else LOG_INTERVAL_S
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %g", INTERVAL_ENV, value, LOG_INTERVAL_S)
        return LOG_INTERVAL_S


class Reporter:
    """Where updates go: :class:`LogLines` or :class:`Bar`."""

    def __init__(self) -> None:
        self.start: float | None = None

    def begin(self, stack: list[Task]) -> None:
        if len(stack) == 1:
            self.start = time.monotonic()

    def update(self, stack: list[Task]) -> None:
        raise NotImplementedError

    def end(self, stack: list[Task]) -> None:
        """``stack`` still holds the task that ends."""

    def line(self, stack: list[Task]) -> str:
        now = time.monotonic()
        elapsed = now - (now if self.start is None else self.start)
        share = overall(stack)
        text = f"{describe(stack)} | {100 * share:.0f}% | {duration(elapsed)} elapsed"
        if 0 < share < 1:
            text += f", ETA {duration(elapsed * (1 - share) / share)}"
        return text


class LogLines(Reporter):
    """A log line every ``interval`` seconds while a wait lasts, and one when a wait that printed
    ends (logs, CI, nohup: where a bar would be one unreadable line)."""

    def __init__(self, interval: float | None = None):
        super().__init__()
        self.interval = log_interval() if interval is None else interval
        self.last = 0.0
        self.printed = False

    def begin(self, stack: list[Task]) -> None:
        super().begin(stack)
        if len(stack) == 1:
            self.last, self.printed = time.monotonic(), False

    def update(self, stack: list[Task]) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last, self.printed = now, True
            log.info("%s", self.line(stack))

    def end(self, stack: list[Task]) -> None:
        if len(stack) == 1 and self.printed:
            start = time.monotonic() if self.start is None else self.start
            log.info("%s done in %s", stack[0].what, duration(time.monotonic() - start))


class Bar(Reporter):
    """One tqdm bar on stderr for the outermost wait, in permille of it, labelled by the innermost."""

    def __init__(self) -> None:
        super().__init__()
        self.bar = None

    def begin(self, stack: list[Task]) -> None:
        super().begin(stack)
        if len(stack) == 1:
            from tqdm.auto import tqdm

            fmt = "{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
            self.bar = tqdm(total=1000, desc=stack[0].what, leave=False, bar_format=fmt)

    def update(self, stack: list[Task]) -> None:
        if self.bar is not None:
            self.bar.set_description_str(describe(stack), refresh=False)
            self.bar.update(int(1000 * overall(stack)) - self.bar.n)

    def end(self, stack: list[Task]) -> None:
        if len(stack) == 1 and self.bar is not None:
            self.bar.close()
            self.bar = None


def auto(enabled: bool = True, stream=None) -> Reporter | None:
    """A :class:`Bar` when ``stream`` (stderr) is a terminal, else :class:`LogLines`; None when
    not ``enabled`` (a rank other than zero)."""
    if not enabled:
        return None
    stream = sys.stderr if stream is None else stream
    return Bar() if getattr(stream, "isatty", lambda: False)() else LogLines()


@contextlib.contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Send the progress of the waits inside to ``reporter`` (None: silent); restores the previous one."""
    global _reporter
    previous, _reporter = _reporter, reporter
    try:
        yield
    finally:
        _reporter = previous


@contextlib.contextmanager
def task(what: str, total: int | None, ordinal: bool = True) -> Iterator[Task]:
    """A wait of ``total`` units, nested in the current one: ``with task(...) as t: ... t.advance()``
    (``ordinal``: see :class:`Task`)."""
    level = Task(what, total, ordinal)
    _stack.append(level)
    reporter = _reporter
    if reporter is not None:
        reporter.begin(_stack)
    try:
        yield level
    finally:
        try:
            if reporter is not None:
                reporter.end(_stack)
        finally:
            _stack.remove(level)


def track(iterable: Iterable, what: str, total: int | None = None) -> Iterator:
    """``iterable``'s items, each counted as one unit of the wait ``what`` (``total``: len() if it has one)."""
    if _reporter is None:
        yield from iterable
        return
    if total is None:
        total = len(iterable) if hasattr(iterable, "__len__") else None
    with task(what, total) as level:
        for item in iterable:
            yield item
            level.advance()
