"""Any folder tree of PNG/JPEG/WebP images, resized and centre-cropped to ``image_size``.

Files are decoded once and kept as a uint8 tensor (cached on disk, keyed by the file list, so the
next run starts at once). Unreadable files are skipped with a count in the log; an error if none
can be read. Sub-folder names become labels when there are at least two of them.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from genexp import atomic
from genexp.data.base import ImageSource, Splits, random_split, resize_square
from genexp.errors import ConfigError, GenexpError, check_float, check_int

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def decode_image(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """Read one image file -> uint8 (channels, image_size, image_size), centre-cropped and resized."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return resize_square(tensor[None], image_size)[0]


def _read_cache(path: Path) -> dict | None:
    """The decoded images cached at ``path``; None (decode again) if the file is unreadable, is not
    weights-only (a pickle that would run code is refused, never run) or is not a cache of ours."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or not isinstance(blob.get("images"), torch.Tensor):
            raise ValueError("not a decoded-images cache")
        return blob
    except Exception as err:  # noqa: BLE001 - a bad cache is rebuilt, never fatal
        log.warning("image cache %s is unusable (%s); decoding the images again", path, type(err).__name__)
        return None


class ImageFolder(ImageSource):
    """Images from ``root`` (searched recursively), split train/val/test by a seeded permutation.

    Args:
        root: the folder (``~`` expanded).
        image_size: side of the square images.
        channels: 1 (grey) or 3 (RGB).
        val_fraction, test_fraction: parts held out for validation and test.
        split_seed: seed of the split.
        cache_dir: where decoded tensors are cached (null: no cache).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        channels: int = 3,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__(image_size, channels)
        if not root or str(root) in ("???", "None"):
            raise ConfigError("root", root, "set dataset.root to a folder of images")
        self.root = Path(str(root)).expanduser()
        self.val_fraction = check_float("val_fraction", val_fraction, positive=True, maximum=0.4)
        self.test_fraction = check_float("test_fraction", test_fraction, positive=True, maximum=0.4)
        self.split_seed = check_int("split_seed", split_seed)
        self.cache_dir = Path(str(cache_dir)).expanduser() if cache_dir else None

    def files(self) -> list[Path]:
        if not self.root.is_dir():
            raise GenexpError(
                f"dataset.root={self.root}: no such folder; point dataset.root at a folder of images"
            )
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not files:
            raise GenexpError(
                f"dataset.root={self.root}: no images found ({', '.join(EXTENSIONS)}); put images there or fix the path"
            )
        return files

    def _cache_path(self, files: list[Path]) -> Path | None:
        if self.cache_dir is None:
            return None
        h = hashlib.sha1(f"{self.image_size}:{self.channels}".encode())
        for f in files:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        return self.cache_dir / "image_folder" / f"{h.hexdigest()[:16]}.pt"

    def decode_all(self, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor | None]:
        classes = sorted({f.parent.relative_to(self.root).as_posix() for f in files})
        use_labels = len(classes) >= 2
        index = {c: i for i, c in enumerate(classes)}
        images, labels, failed = [], [], 0
        for f in files:
            try:
                images.append(decode_image(f, self.image_size, self.channels))
            except Exception:  # PIL raises many types for broken files; skip and count them
                failed += 1
                continue
            labels.append(index[f.parent.relative_to(self.root).as_posix()])
        if failed:
            log.warning("dataset.root=%s: skipped %d unreadable file(s) of %d", self.root, failed, len(files))
        if not images:
            raise GenexpError(f"dataset.root={self.root}: none of the {len(files)} image files could be read")
        labels_t = torch.tensor(labels, dtype=torch.long) if use_labels else None
        return torch.stack(images), labels_t

    def load(self) -> Splits:
        files = self.files()
        cache = self._cache_path(files)
        blob = _read_cache(cache) if cache is not None and cache.is_file() else None
        if blob is not None:
            images, labels = blob["images"], blob.get("labels")
        else:
            images, labels = self.decode_all(files)
            if cache is not None:
                atomic.save_torch({"images": images, "labels": labels}, cache)
        self.num_classes = 0 if labels is None else int(labels.max()) + 1
        n = len(images)
        n_val = max(1, round(n * self.val_fraction))
        n_test = max(1, round(n * self.test_fraction))
        if n - n_val - n_test < 1:
            raise GenexpError(
                f"dataset.root={self.root}: only {n} readable image(s); need at least 3 for train/val/test"
            )
        return Splits(*random_split(images, labels, (n - n_val - n_test, n_val, n_test), self.split_seed))
