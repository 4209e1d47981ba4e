"""The order of training images: a seeded permutation per epoch that a resumed run can re-enter.

The DataLoader's default ``shuffle=True`` draws each epoch's order from the global torch RNG, so
the order depends on everything else that consumed random numbers before the epoch began, and a
run resumed inside an epoch cannot reproduce it. Here the order is a pure function of
``(seed, epoch)``, and ``start_at`` skips the batches a resumed run has already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from genexp.errors import check_int


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of ``epoch``: ``randperm(num_samples)`` from a generator seeded by
    ``(seed, epoch)`` only. Shared by the DataLoader's sampler and the device-resident loader, so
    both yield the same batches for the same seed."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_samples, generator=generator)


class EpochSampler(Sampler[int]):
    """Indices ``epoch_permutation(num_samples, seed, epoch)``; Lightning calls ``set_epoch``.

    Args:
        num_samples: dataset length.
        seed: the run's seed.
    """

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples = check_int("num_samples", num_samples, minimum=0)
        self.seed = check_int("seed", seed, minimum=0)
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, samples) to skip once, after a resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def start_at(self, epoch: int, samples: int) -> None:
        """Begin ``epoch`` at position ``samples`` of its order (once): a run resumed mid-epoch
        continues with the batches it had not trained on yet."""
        self.epoch = int(epoch)
        self._skip = (int(epoch), check_int("samples", samples, minimum=0))

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        order = epoch_permutation(self.num_samples, self.seed, self.epoch)
        if self._skip is not None and self._skip[0] == self.epoch:
            order = order[self._skip[1] :]
            self._skip = None
        yield from order.tolist()
