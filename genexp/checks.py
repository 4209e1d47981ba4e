"""Checks of what a user typed, each refusing in one line that names the key and the fix.

Pure Python (no torch, Lightning, Hydra or OmegaConf), so every layer may use it, the math packages
included. Two kinds of refusal:

- :class:`~genexp.errors.ConfigError` from the ``check_*`` of :mod:`genexp.errors` and
  :func:`check_bool`: a constructor argument; the caller prefixes the config path (``model.x=...``).
- :class:`~genexp.errors.GenexpError` from :func:`user` and the checks built on it: a command's own
  top-level key (``n=``, ``seed=``, ``out=``), already named in full.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from genexp import atomic
from genexp.errors import ConfigError, GenexpError, check_float, check_int

T = TypeVar("T")

MAX_COUNT = 2**31 - 1  # image counts, batch sizes, grid columns: beyond this torch's sizes overflow
MAX_SEED = 2**32 - 1  # seeds: uint32, what numpy's and Lightning's seeding accept


def user(check: Callable[[], T], fix: str | None = None) -> T:
    """Run a ``check_*`` and turn its ConfigError into a GenexpError (the key is already top-level),
    with ``; <fix>`` appended where one is given."""
    try:
        return check()
    except ConfigError as err:
        raise GenexpError(f"{err}; {fix}" if fix else str(err)) from None


def check_bool(key: str, value: Any) -> bool:
    """``true`` or ``false`` only: YAML's ``1``/``"yes"`` are not silently truthy."""
    if not isinstance(value, bool):
        raise ConfigError(key, value, "must be true or false")
    return value


def check_count(key: str, value: Any, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    """An integer in ``minimum..maximum`` (a count or size), else one line naming the range."""
    fix = f"pass {key}=<an integer in {minimum}..{maximum}>"
    user(lambda: check_int(key, value, minimum=minimum), fix)
    if value > maximum:
        raise GenexpError(f"{key}={value!r}: must be <= {maximum}; {fix}")
    return value


def check_seed(value: Any, key: str = "seed") -> int:
    """A seed every generator takes (``0..MAX_SEED``)."""
    return check_count(key, value, minimum=0, maximum=MAX_SEED)


def check_finite(key: str, value: Any, fix: str, positive: bool = False) -> float:
    """A finite number (>= 0, or > 0 with ``positive``); nan and inf are refused too."""
    number = user(lambda: check_float(key, value, positive=positive, minimum=None if positive else 0.0), fix)
    if not math.isfinite(number):
        raise GenexpError(f"{key}={value!r}: must be finite; {fix}")
    return number


def writable_folder(
    key: str, folder: Path, value: Any = None, example: str = "<a writable folder>", create: bool = True
) -> Path:
    """``folder``, created if missing (``create``); refused in one line naming ``key`` when it
    cannot be written (checked before any work: a long run must not end in a write error).

    Args:
        value: what the user passed, shown in the message (default: ``folder``).
        example: the fix's value, ``pass <key>=<example>``.
        create: False checks the nearest existing folder above a missing one and creates nothing.
    """
    shown = folder if value is None else value
    where = "" if value is None else f" ({folder})"
    if folder.exists() and not folder.is_dir():
        what = "it" if value is None else str(folder)
        raise GenexpError(f"{key}={shown}: {what} is a file, not a folder; pass {key}={example}")
    existing = folder
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise GenexpError(
            f"{key}={shown}: cannot create the folder{where} ({reason}); pass {key}={example}"
        ) from None
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GenexpError(f"{key}={shown}: the folder{where} is read-only; pass {key}={example}")
    return folder


def write_failed(key: str, path: Path, err: OSError) -> GenexpError:
    """The one line for a write that failed after the checks (a full disk, a folder gone read-only)."""
    reason = err.strerror or type(err).__name__
    fix = (
        f"free space there or pass {key}=<another folder>"
        if atomic.is_full(err)
        else f"pass {key}=<a writable folder>"
    )
    return GenexpError(f"{key}={path.parent}: cannot write {path.name} ({reason}); {fix}")
