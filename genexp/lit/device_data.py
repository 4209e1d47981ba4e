"""Device-resident data (``performance.device_data=true``): each split lives on the training device
as one uint8 tensor and batches are sliced there, with no DataLoader, workers or host-to-device copy.

The order comes from the DataLoader's own sampler: training uses
:class:`genexp.data.order.EpochSampler` (``epoch_permutation(seed, epoch)``; ``set_epoch``,
``start_at`` for a mid-epoch resume), val/test a ``DistributedSampler`` without shuffling (what
Lightning gives a DataLoader under DDP), so both paths yield the same batches on every rank. Under
DDP rank r takes ``order[r::world_size]`` of the order padded with its head to a multiple of
``world_size``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from genexp.data.base import ImageTensorDataset
from genexp.errors import GenexpError, check_int


def to_device(split: Dataset, device: torch.device, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """A split's uint8 images (N, C, H, W) and int64 labels (N,) on ``device``; refuses datasets
    decoded image by image and, on a GPU, splits larger than half of its free memory.
    ``name``: the dataset, for the error message."""
    if not isinstance(split, ImageTensorDataset):
        raise GenexpError(
            f"performance.device_data=true: {name or type(split).__name__} decodes images one by one "
            "and is not held in memory; set performance.device_data=false"
        )
    images, labels = split.images, split.labels
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.nbytes > free // 2:
            raise GenexpError(
                f"performance.device_data=true: the data needs {images.nbytes / 2**30:.1f} GiB, more than "
                f"half of the GPU's free {free / 2**30:.1f} GiB; set performance.device_data=false"
            )
    return images.to(device), labels.to(device)


class DeviceLoader:
    """Batches ``(images float in [0, 1], labels)`` sliced from tensors already on the device:
    what Lightning takes as a dataloader (an iterable with ``__len__``; it calls ``sampler.set_epoch``).

    Args:
        images, labels: the split, uint8 (N, C, H, W) and int64 (N,), on the training device.
        batch_size: images per step (per rank).
        sampler: this rank's indices, the DataLoader path's sampler (see the module docstring).
        drop_last: drop the last incomplete batch (training, as the DataLoader does).
    """

    batch_sampler = None  # Lightning inspects it next to ``sampler``

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        sampler: Sampler[int],
        drop_last: bool = False,
    ):
        self.images, self.labels = images, labels
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.sampler = sampler
        self.drop_last = bool(drop_last)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.as_tensor(list(self.sampler), dtype=torch.long, device=self.images.device)
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            idx = order[start : start + self.batch_size]
            # the same conversion as ImageTensorDataset.__getitems__, so batches are bit-identical
            yield self.images[idx].float().div_(255.0), self.labels[idx]
