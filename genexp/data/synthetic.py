"""A seeded synthetic dataset of labelled shapes, for tests and smoke runs (no files needed)."""

from __future__ import annotations

import torch

from genexp.data.base import ImageSource, Splits, random_split
from genexp.errors import check_float, check_int


def draw_shapes(n: int, image_size: int, channels: int, num_classes: int, generator: torch.Generator):
    """Class k draws shape k % 4 (square, disc, cross, bars) at a random place, size and intensity."""
    s = image_size
    yy, xx = torch.meshgrid(torch.arange(s).float(), torch.arange(s).float(), indexing="ij")
    labels = torch.randint(num_classes, (n,), generator=generator)
    centre = torch.rand(n, 2, generator=generator) * (s * 0.5) + s * 0.25  # (n, 2)
    radius = (torch.rand(n, generator=generator) * 0.15 + 0.15) * s  # (n,)
    dy = yy[None] - centre[:, 0, None, None]  # (n, s, s)
    dx = xx[None] - centre[:, 1, None, None]
    r = radius[:, None, None]
    masks = torch.stack(
        [
            (dy.abs() <= r) & (dx.abs() <= r),
            dy.pow(2) + dx.pow(2) <= r.pow(2),
            ((dy.abs() <= r / 3) & (dx.abs() <= r)) | ((dx.abs() <= r / 3) & (dy.abs() <= r)),
            (torch.remainder(yy[None] + centre[:, :1, None], 4) < 2) & (dx.abs() <= r),
        ]
    )  # (4, n, s, s)
    mask = masks[labels % 4, torch.arange(n)]  # (n, s, s)
    colour = torch.rand(n, channels, generator=generator) * 0.6 + 0.4  # (n, C)
    images = mask[:, None].float() * colour[:, :, None, None]
    return (images * 255).round().to(torch.uint8), labels


class Synthetic(ImageSource):
    """Seeded shapes, ``num_images`` split 80/10/10; the same images for the same seed.

    Args:
        num_images: total images over the three splits.
        image_size, channels: shape of the images.
        num_classes: shape classes (labels).
        seed: seed of the images and the split.
    """

    def __init__(
        self,
        num_images: int = 1024,
        image_size: int = 16,
        channels: int = 1,
        num_classes: int = 4,
        seed: int = 0,
        val_fraction: float = 0.1,
    ):
        super().__init__(image_size, channels)
        self.num_images = check_int("num_images", num_images, minimum=10)
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.seed = check_int("seed", seed)
        self.val_fraction = check_float("val_fraction", val_fraction, positive=True, maximum=0.4)

    def load(self) -> Splits:
        g = torch.Generator().manual_seed(self.seed)
        images, labels = draw_shapes(self.num_images, self.image_size, self.channels, self.num_classes, g)
        n_val = max(1, int(self.num_images * self.val_fraction))
        sizes = (self.num_images - 2 * n_val, n_val, n_val)
        return Splits(*random_split(images, labels, sizes, self.seed))
