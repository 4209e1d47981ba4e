"""The order of training images: a seeded permutation per epoch that a resumed run can re-enter.

The DataLoader's default ``shuffle=True`` draws each epoch's order from the global torch RNG, so
the order depends on everything else that consumed random numbers before the epoch began, and a
run resumed inside an epoch cannot reproduce it. Here the order is a pure function of
``(seed, epoch)``, and ``start_at`` skips the batches a resumed run has already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler

from genexp.errors import check_int


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of ``epoch``: ``randperm(num_samples)`` from a generator seeded by
    ``(seed, epoch)`` only. Shared by the DataLoader's sampler and the device-resident loader, so
    both yield the same batches for the same seed."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_samples, generator=generator)


class EpochSampler(DistributedSampler):
    """This rank's share of ``epoch_permutation(num_samples, seed, epoch)``; Lightning calls ``set_epoch``.

    Under DDP rank r takes ``order[r::world_size]`` of the order padded with its own head to a
    multiple of ``world_size`` (how ``DistributedSampler`` splits, and the device-resident loader
    too). It is a ``DistributedSampler`` so that Lightning keeps it instead of wrapping it in one
    that would split the order after ``start_at`` has shortened it.

    Args:
        num_samples: dataset length.
        seed: the run's seed.
        rank, world_size: this process's share under DDP (0 and 1 on one device).
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        check_int("num_samples", num_samples, minimum=0)
        check_int("seed", seed, minimum=0)
        check_int("world_size", world_size, minimum=1)
        check_int("rank", rank, minimum=0)
        # range(): DistributedSampler only needs the length; it sets num_samples (per rank) and total_size
        super().__init__(range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self._skip: tuple[int, int] | None = None  # (epoch, samples) to skip once, after a resume

    def start_at(self, epoch: int, samples: int) -> None:
        """Begin ``epoch`` at position ``samples`` of this rank's share (once): a run resumed
        mid-epoch continues with the batches it had not trained on yet."""
        self.epoch = int(epoch)
        self._skip = (int(epoch), check_int("samples", samples, minimum=0))

    def __iter__(self) -> Iterator[int]:
        order = epoch_permutation(len(self.dataset), self.seed, self.epoch)
        if self.num_replicas > 1:
            pad = self.total_size - len(order)
            if pad and len(order):
                order = torch.cat([order, order.repeat(-(-pad // len(order)))[:pad]])
            order = order[self.rank :: self.num_replicas]
        if self._skip is not None and self._skip[0] == self.epoch:
            order = order[self._skip[1] :]
            self._skip = None
        yield from order.tolist()
