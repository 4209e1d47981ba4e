"""The one atomic writer: every file genexp writes goes to a hidden temporary file beside its target
and is renamed over it, so a reader never sees half a file and a failure (a full disk, a signal, a
crash inside the writer) leaves the previous file and no temporary one behind.

Pure Python (torch is imported only by :func:`save_torch`), so every layer can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
