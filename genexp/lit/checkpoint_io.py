"""Checkpoint files that survive being killed: :class:`AtomicCheckpointIO` writes every checkpoint
(``last.ckpt``, ``best.ckpt``) to a temporary file in the same folder, fsyncs it and renames it
over the old one, so a kill or a full disk during the write leaves the previous checkpoint as it
was; it refuses non-finite weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from genexp.atomic import fsync_dir, temp_path, write_refusal
from genexp.errors import GenexpError


def nonfinite_tensors(checkpoint: dict) -> list[str]:
    """Names of the weights (``state_dict``, and the raw weights next to an EMA) that hold NaN/Inf."""
    bad = []
    for section in ("state_dict", "current_model_state"):
        for name, value in (checkpoint.get(section) or {}).items():
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                bad.append(name)
    return bad


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
                self.serialize(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException as err:  # also KeyboardInterrupt: never a half-written file left
            tmp.unlink(missing_ok=True)
            refused = write_refusal(err, None)
            if refused is None:
                raise
            raise GenexpError(
                f"cannot write checkpoint {path}: {refused.strerror or refused}; the previous checkpoint is "
                "kept. Free space there or write elsewhere with paths.log_dir=<folder>"
            ) from None

    def serialize(self, checkpoint: dict[str, Any], file) -> None:
        """Write ``checkpoint`` into the open temporary file (a seam: tests slow it down)."""
        torch.save(checkpoint, file)
