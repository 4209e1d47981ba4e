"""torchvision datasets (MNIST, Fashion-MNIST, CIFAR-10, CelebA) as genexp sources.

They take ``root`` and ``download`` (which needs a network; tests never download). The official
train set is split into train and a seeded ``val_size`` validation part; the official test set is
the test split. Small datasets are held in memory as uint8 tensors; CelebA is decoded lazily.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from genexp.data.base import (
    NO_LABEL,
    ImageSource,
    ImageTensorDataset,
    Splits,
    convert_channels,
    random_split,
    resize_square,
)
from genexp.errors import GenexpError, check_int


class TorchvisionSource(ImageSource):
    """Base: ``root``/``download`` handling with a one-line error when the data is missing."""

    native_size = 28
    native_channels = 1

    def __init__(
        self,
        root: str = "~/.cache/genexp/data",
        download: bool = True,
        image_size: int | None = None,
        channels: int | None = None,
        val_size: int = 5000,
        split_seed: int = 0,
    ):
        super().__init__(image_size or self.native_size, channels or self.native_channels)
        self.root = Path(str(root)).expanduser()
        if not isinstance(download, bool):
            from genexp.errors import ConfigError

            raise ConfigError("download", download, "must be true or false")
        self.download = download
        self.val_size = check_int("val_size", val_size, minimum=1)
        self.split_seed = check_int("split_seed", split_seed)

    def _open(self, cls, **kwargs):
        try:
            return cls(root=str(self.root), download=self.download, **kwargs)
        except (RuntimeError, OSError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if self.download:
                raise GenexpError(
                    f"dataset.root={self.root}: could not download {cls.__name__} ({first}); check the network, "
                    "or put the files under dataset.root and set dataset.download=false"
                ) from None
            raise GenexpError(
                f"dataset.root={self.root}: {cls.__name__} not found there ({first}); set dataset.download=true "
                "(needs a network) or point dataset.root at a folder that holds it"
            ) from None

    def _tensors(self, ds) -> tuple[torch.Tensor, torch.Tensor]:
        data = ds.data
        data = torch.from_numpy(np.asarray(data)) if not isinstance(data, torch.Tensor) else data
        if data.ndim == 3:  # (N, H, W) grey
            data = data[:, None]
        else:  # (N, H, W, C)
            data = data.permute(0, 3, 1, 2)
        images = resize_square(convert_channels(data.contiguous(), self.channels), self.image_size)
        return images, torch.as_tensor(ds.targets, dtype=torch.long)

    def load(self) -> Splits:
        train_images, train_labels = self._tensors(self._open(self.torchvision_class(), train=True))
        test_images, test_labels = self._tensors(self._open(self.torchvision_class(), train=False))
        n_train = len(train_images) - self.val_size
        if n_train < 1:
            raise GenexpError(
                f"dataset.val_size={self.val_size}: must leave training images (have {len(train_images)})"
            )
        train, val = random_split(train_images, train_labels, (n_train, self.val_size), self.split_seed)
        return Splits(train, val, ImageTensorDataset(test_images, test_labels))

    def torchvision_class(self):
        raise NotImplementedError


class MNIST(TorchvisionSource):
    """MNIST (LeCun et al.), 60k/10k 28x28 grey digits."""

    num_classes = 10

    def torchvision_class(self):
        from torchvision.datasets import MNIST as TV

        return TV


class FashionMNIST(TorchvisionSource):
    """Fashion-MNIST (Xiao et al. 2017), 60k/10k 28x28 grey clothing images."""

    num_classes = 10

    def torchvision_class(self):
        from torchvision.datasets import FashionMNIST as TV

        return TV


class CIFAR10(TorchvisionSource):
    """CIFAR-10 (Krizhevsky 2009), 50k/10k 32x32 colour images."""

    num_classes = 10
    native_size = 32
    native_channels = 3

    def torchvision_class(self):
        from torchvision.datasets import CIFAR10 as TV

        return TV


class _LazyImages(Dataset):
    """Decode a torchvision dataset item by item (for data too big to hold in memory)."""

    def __init__(self, dataset, image_size: int, channels: int):
        self.dataset, self.image_size, self.channels = dataset, image_size, channels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.dataset[index][0]  # PIL image
        array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        s = min(array.shape[-2:])
        crop = int(s * 148 / 178)  # the usual CelebA face crop, scaled to the image
        h, w = array.shape[-2:]
        array = array[:, (h - crop) // 2 : (h - crop) // 2 + crop, (w - crop) // 2 : (w - crop) // 2 + crop]
        image = resize_square(convert_channels(array[None], self.channels), self.image_size)[0]
        return image.float().div_(255.0), torch.tensor(NO_LABEL)


class CelebA(TorchvisionSource):
    """CelebA (Liu et al. 2015) faces, centre-cropped and resized; official train/valid/test splits."""

    native_size = 64
    native_channels = 3

    def load(self) -> Splits:
        from torchvision.datasets import CelebA as TV

        parts = [self._open(TV, split=split) for split in ("train", "valid", "test")]
        return Splits(*(_LazyImages(p, self.image_size, self.channels) for p in parts))
