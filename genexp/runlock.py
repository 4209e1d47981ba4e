"""One writer per run dir: an OS file lock held for the life of the training process.

Two ``genexp train`` processes writing one run dir (a resume started while the run still trains)
would interleave checkpoints, cut each other's CSV logs and delete each other's in-flight files.
The first takes ``<run>/.genexp.lock`` with ``flock``; a second is refused in one line before it
builds anything. The kernel drops the lock when its holder exits, however it exits (SIGKILL, a
crash), so a stale lock never blocks a resume. Under DDP only the process a user started (rank 0)
holds it: the other ranks are its children and write nothing but their own logs.

Pure Python; on a platform without ``fcntl`` no lock is taken (and a warning says so).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from genexp.errors import GenexpError
from genexp.layout import LOCK

log = logging.getLogger("genexp")
LOCK_NAME = LOCK


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "another process"
    return f"another genexp process ({text})" if text else "another process"


@contextlib.contextmanager
def run_lock(
    run_dir: Path,
    key: str = "paths.output_dir",
    fix: str = "wait until it ends (or stop it), then resume with ckpt_path=<run dir>, or start a new run",
) -> Iterator[None]:
    """Hold the run dir's lock for the ``with`` block; refuse at once if someone else holds it
    (``fix``: what the refusal tells the user to do)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: nothing to lock with
        log.warning("no file locks on this platform: nothing stops a second writer in %s", run_dir)
        yield
        return
    path = Path(run_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GenexpError(f"{key}={run_dir}: {_holder(path)} is writing this run now; {fix}") from None
        # the holder's name, written in place: the lock lives on this file, so no atomic rename here
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
