"""Checks of a composed config that must fail before anything is built, trained or written: values
whose error would otherwise surface late (after an epoch, at the first checkpoint, in the test
bound) or as a library's traceback. Each raises :class:`GenexpError` with one line naming the key
and a fix that applies.
"""

from __future__ import annotations

from omegaconf import DictConfig


def check(cfg: DictConfig) -> None:
    """Every preflight check of a ``genexp train`` config (``genexp.run.validate`` calls this)."""
