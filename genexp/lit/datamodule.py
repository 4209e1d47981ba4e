"""LightningDataModule over a genexp image source (``dataset/`` config group)."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from genexp.data.base import ImageSource, Splits, collate_batch
from genexp.data.order import EpochSampler
from genexp.errors import check_int
from genexp.lit.device_data import DeviceLoader, to_device

log = logging.getLogger("genexp")


class DataModule(pl.LightningDataModule):
    """Train/val/test loaders of float images in [0, 1] and labels (-1 where there are none).

    Args:
        dataset: the image source (from ``dataset/``).
        batch_size: images per step per device.
        num_workers, pin_memory: DataLoader settings (0 workers suits in-memory data).
        seed: the training order of epoch e is a permutation seeded by (seed, e) alone
            (:mod:`genexp.data.order`), so a resumed run sees the same batches as an uninterrupted one.
        device_data: serve batches from splits held on the training device (``performance.device_data``,
            passed by ``run.py``; :mod:`genexp.lit.device_data`), in the same order; workers are unused.
    """

    def __init__(
        self,
        dataset: ImageSource,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        device_data: bool = False,
    ):
        super().__init__()
        self.dataset = dataset
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.pin_memory = bool(pin_memory)
        self.seed = check_int("seed", seed, minimum=0)
        self.splits: Splits | None = None
        self.device_data = bool(device_data)
        self._on_device: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(split) -> tensors
        if self.device_data and (self.num_workers or self.pin_memory):
            log.info("performance.device_data=true: data.num_workers and data.pin_memory are not used")

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self.dataset.load()

    def _loader(self, split, shuffle: bool) -> DataLoader | DeviceLoader:
        if self.device_data:
            return self._device_loader(split, shuffle)
        return DataLoader(
            split,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(split), self.seed, *self._shard()) if shuffle else None,
            drop_last=shuffle and len(split) > self.batch_size,
            collate_fn=collate_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # workers' base seed comes from this generator, not the global RNG the models draw from
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _shard(self) -> tuple[int, int]:
        """(rank, world size) of this process: its share of the training order under DDP."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _device_loader(self, split, shuffle: bool) -> DeviceLoader:
        """The DataLoader's order (same samplers, as Lightning would shard them) on device tensors."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if id(split) not in self._on_device:  # uploaded once, reused by every epoch and stage
            self._on_device[id(split)] = to_device(split, device, type(self.dataset).__name__)
        rank, world = self._shard()
        if shuffle:
            order = EpochSampler(len(split), self.seed, rank, world)
        else:
            order = DistributedSampler(range(len(split)), num_replicas=world, rank=rank, shuffle=False)
        images, labels = self._on_device[id(split)]
        drop_last = shuffle and len(split) > self.batch_size  # as the DataLoader below
        return DeviceLoader(images, labels, self.batch_size, order, drop_last=drop_last)

    def train_dataloader(self) -> DataLoader | DeviceLoader:
        loader = self._loader(self.splits.train, shuffle=True)
        trainer = self.trainer
        if trainer is not None and trainer.fit_loop.restarting:
            # resumed inside an epoch (its end not processed yet): that epoch's order, minus the
            # batches already trained on (Lightning requests the loader and draws its first batch
            # before it calls set_epoch). A checkpoint written at a step's end (on_train_batch_end)
            # has that batch processed, not yet completed. Resumed after an epoch's end: the next
            # epoch starts from its beginning (set_epoch).
            epochs = trainer.fit_loop.epoch_progress.current
            if epochs.processed < epochs.started:
                done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
                loader.sampler.start_at(epochs.processed, done * self.batch_size)
        return loader

    def val_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader(self.splits.val, shuffle=False)

    def test_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader(self.splits.test, shuffle=False)

    def fixed_batch(self, split: str = "val", n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` images of a split (the same every epoch), for reconstruction grids."""
        self.setup()
        data = getattr(self.splits, split)
        return collate_batch([data[i] for i in range(min(n, len(data)))])
