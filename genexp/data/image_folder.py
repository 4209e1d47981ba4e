"""Any folder tree of PNG/JPEG/WebP/BMP/GIF/TIFF images, resized and centre-cropped to ``image_size``.

Files are decoded once and kept as a uint8 tensor (cached on disk, keyed by the file list, so the
next run starts at once). Sub-folders are searched recursively, symlinked ones too (each real folder
once, so a link loop ends); sub-folder names become labels when there are at least two of them.
Files that cannot be used are skipped and counted by reason in the log; an error if none is left.

How a file becomes 8-bit ``channels`` (the rule, so the same file always gives the same numbers):

- 16-bit grey (PIL modes ``I;16``, ``I;16B``, ...) keeps its high byte (``v >> 8``); 32-bit integer
  grey (``I``) is read as 16-bit (clipped to 0..65535, then ``>> 8``); float grey (``F``) is read as
  [0, 1] (clipped, ``round(255 v)``).
- Transparency (RGBA, LA, PA, a palette or key colour with transparency) is composited over
  **white**: ``out = round((c * a + 255 * (255 - a)) / 255)``, so a transparent pixel is white.
- CMYK is converted by PIL: ``R = round((255 - C)(255 - K) / 255)`` (no ICC profile); palette,
  1-bit and YCbCr files go through PIL's RGB or L conversion.
- Colour to grey uses PIL's ITU-R 601 luma ``L = (19595 R + 38470 G + 7471 B + 2^15) >> 16``; grey
  to colour repeats the channel.
- Animated files (GIF, APNG, WebP) give their first frame.
- Images over ``max_pixels`` are refused before they are decoded (a 17 KB PNG can hold 144 million
  pixels); a JPEG is decoded at 1/2, 1/4 or 1/8 scale instead when that brings it under the limit.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from genexp import atomic
from genexp.data.base import ImageSource, Splits, check_cache_dir, random_split, resize_square
from genexp.errors import ConfigError, GenexpError, check_float, check_int

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# 40 million pixels: a 7680x4320 frame fits; decoding one costs ~0.5 GB before it is resized
DEFAULT_MAX_PIXELS = 40_000_000
# part of the cache key: a change to how files are decoded must not reuse tensors decoded the old way
DECODER_VERSION = 2
UNREADABLE, TOO_LARGE = "unreadable", "over the pixel limit"


class ImageTooLarge(ValueError):
    """An image with more pixels than ``max_pixels`` (its size is in the message)."""


def _grey_levels(image) -> np.ndarray:
    """High-bit-depth grey (``I;16*``, ``I``, ``F``) -> uint8 (H, W) by the module's rule."""
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    values = np.asarray(image).astype(np.int64)  # I;16B is big-endian: astype reads it right
    return (np.clip(values, 0, 65535) >> 8).astype(np.uint8)


def _over_white(array: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C + 1) with alpha last -> (H, W, C) composited over white, rounded."""
    colour, alpha = array[..., :-1].astype(np.uint32), array[..., -1:].astype(np.uint32)
    return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def to_uint8(image, channels: int) -> np.ndarray:
    """A PIL image of any mode -> uint8 (H, W, channels) by the rule in the module docstring."""
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":
        array = _grey_levels(image)[..., None]
    else:
        grey = image.mode in ("1", "L", "LA", "La")
        # what Pillow >= 10.1 calls has_transparency_data: an alpha band, or a transparent colour/entry
        transparent = image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
        target = ("LA" if transparent else "L") if grey else ("RGBA" if transparent else "RGB")
        array = np.asarray(image.convert(target), dtype=np.uint8)
        array = array[..., None] if array.ndim == 2 else array
        array = _over_white(array) if transparent else array
    if array.shape[-1] == 3 and channels == 1:  # PIL's luma, as for a plain RGB file
        array = np.asarray(Image.fromarray(array).convert("L"), dtype=np.uint8)[..., None]
    elif array.shape[-1] == 1 and channels == 3:
        array = np.repeat(array, 3, axis=-1)
    return array


def _within_limit(image, max_pixels: int) -> None:
    """Raise :class:`ImageTooLarge` unless the (not yet decoded) image fits ``max_pixels``; a JPEG
    is first drafted to the smallest DCT scale (1/2, 1/4, 1/8) that fits."""
    w, h = image.size
    if w * h <= max_pixels:
        return
    if image.format == "JPEG":
        for scale in (2, 4, 8):
            if math.ceil(w / scale) * math.ceil(h / scale) <= max_pixels:
                image.draft(None, (max(1, w // scale), max(1, h // scale)))
                break
        if image.size[0] * image.size[1] <= max_pixels:
            return
    raise ImageTooLarge(f"{w}x{h}")


def decode_image(
    path: Path, image_size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Read one image file -> uint8 (channels, image_size, image_size), centre-cropped and resized.

    Raises :class:`ImageTooLarge` for an image over ``max_pixels``, found from its header before
    any pixel is decoded; anything PIL raises for a broken file passes through."""
    from PIL import Image

    with warnings.catch_warnings():  # max_pixels is the limit here, not PIL's bomb warning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as err:  # over twice PIL's own limit: refused at open
            raise ImageTooLarge(str(err)) from None
    with image:
        image.seek(0)  # the first frame of an animated file
        _within_limit(image, max_pixels)
        array = to_uint8(image, channels)
    tensor = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)  # PIL arrays are read-only
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


def _rank_zero() -> bool:
    """Whether this process reports the data: rank 0 of a distributed run (as its launcher or
    Lightning numbered it), or the only process."""
    from genexp.rundir import process_rank

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    local = max(int(os.environ.get("LOCAL_RANK") or 0), int(os.environ.get("NODE_RANK") or 0))
    return max(process_rank(), local) == 0


def _walk(root: Path) -> tuple[list[Path], Counter]:
    """Image files under ``root``, following symlinked folders; each real folder is entered once,
    so a link back to an ancestor (a loop) or a second link to the same folder adds nothing.

    Returns the sorted files (paths under ``root`` as written, links not resolved, so sub-folder
    names stay the labels) and the skipped entries by reason."""
    files, skipped, seen = [], Counter(), set()

    def on_error(err: OSError) -> None:
        skipped[f"unreadable folder ({err.strerror or type(err).__name__})"] += 1

    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=on_error):
        real = os.path.realpath(folder)
        if real in seen:
            skipped["folder already seen (symlink loop or second link)"] += 1
            subfolders[:] = []
            continue
        seen.add(real)
        for name in names:
            path = Path(folder, name)
            if path.suffix.lower() not in EXTENSIONS:
                continue
            if path.is_file():
                files.append(path)
            else:
                skipped["broken symlink"] += 1
    return sorted(files), skipped


class ImageFolder(ImageSource):
    """Images from ``root`` (searched recursively), split train/val/test by a seeded permutation.

    Args:
        root: the folder (``~`` expanded).
        image_size: side of the square images.
        channels: 1 (grey) or 3 (RGB); see the module docstring for how each file mode converts.
        val_fraction, test_fraction: parts held out for validation and test.
        split_seed: seed of the split.
        cache_dir: where decoded tensors are cached (null: no cache); a folder, created if missing.
        max_pixels: images with more pixels (width x height) are skipped, found before decoding.
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
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        super().__init__(image_size, channels)
        if not root or str(root) in ("???", "None"):
            raise ConfigError("root", root, "set dataset.root to a folder of images")
        self.root = Path(str(root)).expanduser()
        self.val_fraction = check_float("val_fraction", val_fraction, positive=True, maximum=0.4)
        self.test_fraction = check_float("test_fraction", test_fraction, positive=True, maximum=0.4)
        self.split_seed = check_int("split_seed", split_seed)
        self.max_pixels = check_int("max_pixels", max_pixels, minimum=1)
        self.cache_dir = check_cache_dir(cache_dir)
        self.skipped: Counter = Counter()

    def files(self) -> list[Path]:
        if not self.root.is_dir():
            raise GenexpError(
                f"dataset.root={self.root}: no such folder; point dataset.root at a folder of images"
            )
        files, self.skipped = _walk(self.root)
        if not files:
            raise GenexpError(
                f"dataset.root={self.root}: no images found ({', '.join(EXTENSIONS)}); put images there or fix the path"
            )
        return files

    def _cache_path(self, files: list[Path]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = f"{self.image_size}:{self.channels}:{self.max_pixels}:{DECODER_VERSION}"
        h = hashlib.sha1(key.encode())
        for f in files:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        return self.cache_dir / "image_folder" / f"{h.hexdigest()[:16]}.pt"

    def _label(self, f: Path) -> str:
        return f.parent.relative_to(self.root).as_posix()

    def decode_all(self, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor | None]:
        classes = sorted({self._label(f) for f in files})
        use_labels = len(classes) >= 2
        index = {c: i for i, c in enumerate(classes)}
        images, labels, failed, too_large, first = [], [], 0, [], ""
        for f in files:
            try:
                images.append(decode_image(f, self.image_size, self.channels, self.max_pixels))
            except ImageTooLarge as err:
                too_large.append(str(err))
                continue
            except Exception as err:  # PIL raises many types for broken files; skip and count them
                failed += 1
                first = first or f"{f.relative_to(self.root)}: {type(err).__name__}"
                continue
            labels.append(index[self._label(f)])
        self._report_skipped(len(files), failed, first, too_large)
        if not images:
            raise GenexpError(f"dataset.root={self.root}: none of the {len(files)} image files could be read")
        labels_t = torch.tensor(labels, dtype=torch.long) if use_labels else None
        return torch.stack(images), labels_t

    def _report_skipped(self, total: int, failed: int, first: str, too_large: list[str]) -> None:
        """Count what was skipped, by reason (rank zero only: every rank reads the same files)."""
        self.skipped[UNREADABLE] += failed
        self.skipped[TOO_LARGE] += len(too_large)
        if not _rank_zero():
            return
        if failed:
            log.warning(
                "dataset.root=%s: skipped %d unreadable file(s) of %d (first: %s)",
                self.root,
                failed,
                total,
                first,
            )
        if too_large:
            log.warning(
                "dataset.root=%s: skipped %d file(s) of %d over the pixel limit dataset.max_pixels=%d (e.g. %s); "
                "raise dataset.max_pixels to keep them (each is decoded whole before it is resized)",
                self.root,
                len(too_large),
                total,
                self.max_pixels,
                too_large[0],
            )

    def _report(
        self, images: torch.Tensor, labels: torch.Tensor | None, cache: Path | None, cached: bool
    ) -> None:
        if not _rank_zero():
            return
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()) if n) or "none"
        classes = (
            "no labels (one folder)" if labels is None else f"{self.num_classes} classes (sub-folder names)"
        )
        source = f"from the cache {cache}" if cached else "decoded"
        log.info(
            "dataset.root=%s: %d image(s), %s, %s; skipped: %s",
            self.root,
            len(images),
            classes,
            source,
            skipped,
        )

    def load(self) -> Splits:
        files = self.files()
        cache = self._cache_path(files)
        blob = _read_cache(cache) if cache is not None and cache.is_file() else None
        if blob is not None:
            images, labels = blob["images"], blob.get("labels")
            self.skipped.update({str(k): int(v) for k, v in (blob.get("skipped") or {}).items()})
        else:
            images, labels = self.decode_all(files)
            if cache is not None:
                skipped = {
                    why: self.skipped[why] for why in (UNREADABLE, TOO_LARGE)
                }  # the file walk is redone
                atomic.save_cache(
                    {"images": images, "labels": labels, "skipped": skipped},
                    cache,
                    "image cache",
                    "training goes on from memory and the next run decodes again",
                )
        self.num_classes = 0 if labels is None else int(labels.max()) + 1
        self._report(images, labels, cache, blob is not None)
        n = len(images)
        n_val = max(1, round(n * self.val_fraction))
        n_test = max(1, round(n * self.test_fraction))
        if n - n_val - n_test < 1:
            raise GenexpError(
                f"dataset.root={self.root}: only {n} readable image(s); need at least 3 for train/val/test"
            )
        return Splits(*random_split(images, labels, (n - n_val - n_test, n_val, n_test), self.split_seed))
