"""LightningDataModule over a genexp image source (``dataset/`` config group)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from genexp.data.base import ImageSource, Splits, collate_batch
from genexp.data.order import EpochSampler
from genexp.errors import check_int


class DataModule(pl.LightningDataModule):
    """Train/val/test loaders of float images in [0, 1] and labels (-1 where there are none).

    Args:
        dataset: the image source (from ``dataset/``).
        batch_size: images per step per device.
        num_workers, pin_memory: DataLoader settings (0 workers suits in-memory data).
        seed: the training order of epoch e is a permutation seeded by (seed, e) alone
            (:mod:`genexp.data.order`), so a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(
        self,
        dataset: ImageSource,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.dataset = dataset
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.pin_memory = bool(pin_memory)
        self.seed = check_int("seed", seed, minimum=0)
        self.splits: Splits | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self.dataset.load()

    def _loader(self, split, shuffle: bool) -> DataLoader:
        return DataLoader(
            split,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(split), self.seed) if shuffle else None,
            drop_last=shuffle and len(split) > self.batch_size,
            collate_fn=collate_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # workers' base seed comes from this generator, not the global RNG the models draw from
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.splits.train, shuffle=True)
        trainer = self.trainer
        if trainer is not None and trainer.fit_loop.restarting:
            # resumed: this epoch's order, minus the batches already trained on (Lightning requests
            # the loader and draws its first batch before it calls set_epoch)
            epoch = trainer.fit_loop.epoch_progress.current.processed
            done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
            loader.sampler.start_at(epoch, done * self.batch_size)
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits.val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits.test, shuffle=False)

    def fixed_batch(self, split: str = "val", n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` images of a split (the same every epoch), for reconstruction grids."""
        self.setup()
        data = getattr(self.splits, split)
        return collate_batch([data[i] for i in range(min(n, len(data)))])
