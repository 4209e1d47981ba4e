"""The one atomic writer: every file genexp writes goes to a hidden temporary file beside its target
and is renamed over it, so a reader never sees half a file and a failure (a full disk, a signal, a
crash inside the writer) leaves the previous file and no temporary one behind.

Pure Python (torch is imported only by :func:`save_torch`), so every layer can use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("genexp")
# the disk, not the folder, refuses (full disk, quota, file size limit): the fix is free space
FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# the file system refusing a write, not a bug in genexp: a full disk, permissions, a read-only
# mount, a path through a file or onto one
WRITE_ERRORS = FULL | {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST}


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before the rename: hidden, same folder (a rename within one file
    system is atomic), one per process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on any failure (also
    KeyboardInterrupt and SystemExit) it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as file:
                os.fsync(file.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """``payload`` as indented, key-sorted JSON (one trailing newline)."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def save_torch(blob: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically (caches; checkpoints go through ``AtomicCheckpointIO``)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def save_cache(blob: Any, path: str | os.PathLike, label: str, consequence: str) -> None:
    """:func:`save_torch` for an optional cache: a failed write (full disk, read-only, no permission)
    is a warning (``<label> <path> was not written (<why>); <consequence>: ...``), not an error; the
    caller goes on with what it computed, and no temporary file is left."""
    try:
        save_torch(blob, path)
    except OSError as err:
        log.warning(
            "%s %s was not written (%s); %s: free space there or point GENEXP_CACHE (paths.cache_dir) "
            "at a writable folder",
            label,
            path,
            err.strerror or type(err).__name__,
            consequence,
        )


def write_refusal(err: BaseException | None, errnos: frozenset | set | None = WRITE_ERRORS) -> OSError | None:
    """The OSError behind ``err`` whose errno is in ``errnos`` (None: any OSError): ``err`` itself or
    one in its cause/context chain. torch.save's zip writer reports a failed write as a RuntimeError
    raised while handling the OSError; Hydra wraps one a resolver raised. The one walker: every
    command asks it which write the environment refused, and :func:`is_full` whether space is the fix."""
    seen = err
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError) and (errnos is None or seen.errno in errnos):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def is_full(err: OSError) -> bool:
    """The disk (or quota, or file size limit) refused ``err``: free space is the fix, not another folder."""
    return err.errno in FULL
