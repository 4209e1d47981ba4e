"""In-memory image datasets and the helpers every source shares.

Every source yields float images in [0, 1] holding 8-bit values (k / 255) with integer labels
where the dataset has them (-1 otherwise). Images are kept as uint8 (N, C, H, W) tensors and
converted a whole batch at a time, so an epoch costs no per-item decoding.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from genexp.errors import GenexpError, check_choice, check_int

log = logging.getLogger(__name__)

NO_LABEL = -1


class ImageTensorDataset(Dataset):
    """uint8 images (N, C, H, W) and int64 labels (N,) held in memory.

    ``__getitems__`` lets the DataLoader fetch a whole batch with one index operation; use it with
    :func:`collate_batch`.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.labels = labels if labels is not None else torch.full((len(images),), NO_LABEL, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].float().div_(255.0), self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx].float().div_(255.0), self.labels[idx]


def collate_batch(batch):
    """Collate for :class:`ImageTensorDataset` (already batched) and per-item datasets alike."""
    if isinstance(batch, tuple):
        return batch
    images, labels = zip(*batch)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.long)


class Splits(NamedTuple):
    train: Dataset
    val: Dataset
    test: Dataset


class ImageSource:
    """Base of the dataset configs: shape, bit depth, label count, and ``load() -> Splits``."""

    bit_depth = 8
    num_classes = 0

    def __init__(self, image_size: int, channels: int):
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.channels = check_choice("channels", channels, (1, 3))

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def load(self) -> Splits:
        raise NotImplementedError


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, channels, H, W): grey to RGB by repetition, RGB to grey by luma."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if c == 4:
        return convert_channels(images[:, :3], channels)
    raise ValueError(f"cannot convert {c} channels to {channels}")


def resize_square(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Centre-crop uint8 (N, C, H, W) images to a square and resize to ``size`` (antialiased)."""
    h, w = images.shape[-2:]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        images = images[..., top : top + s, left : left + s]
    if images.shape[-1] == size:
        return images.contiguous()
    out = []
    for part in images.split(chunk):
        resized = F.interpolate(
            part.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out.append(resized.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def random_split(
    images: torch.Tensor, labels: torch.Tensor | None, sizes: tuple[int, ...], seed: int
) -> list[ImageTensorDataset]:
    """Split into consecutive parts of ``sizes`` after a seeded permutation (same split every run)."""
    if sum(sizes) > len(images):
        raise ValueError(f"split sizes {sizes} exceed the {len(images)} images")
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for size in sizes:
        idx = perm[start : start + size]
        parts.append(ImageTensorDataset(images[idx], None if labels is None else labels[idx]))
        start += size
    return parts


def check_cache_dir(cache_dir: str | os.PathLike | None, key: str = "paths.cache_dir") -> Path | None:
    """``cache_dir`` as a Path (``~`` expanded; None: no cache) if it is a folder or can be made one.

    Checked when the config is built, so a ``$GENEXP_CACHE`` that names a file fails before any work
    with the key and the fix, not at the first cache write as "Not a directory" (a folder that
    cannot be written is only a warning there: caches are optional)."""
    if cache_dir is None or str(cache_dir) in ("", "None"):
        return None
    path = Path(str(cache_dir)).expanduser()
    for part in (path, *path.parents):  # the nearest part that exists must be a folder
        try:
            if part.is_dir():
                return path
            is_file = part.exists()
        except OSError:  # not even readable: the cache write will say so (a warning)
            return path
        if is_file:
            what = "is" if part == path else f"is under {part}, which is"
            raise GenexpError(
                f"{key}={path}: {what} a file, not a folder; set GENEXP_CACHE=<folder> or "
                f"{key}=<folder> (a folder, created if missing)"
            )
    return path
