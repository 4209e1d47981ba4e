"""Random number generator states in checkpoints, so a resumed run draws the same noise.

The *training stream* is what the global generators (Python ``random``, NumPy's legacy global
generator, torch CPU, every CUDA device) hold right after a training step: the next step starts
from it. Validation, sample grids and other callbacks that draw random numbers between two steps
draw from a fork of it: :class:`RNGState` captures the stream when such a section begins and
puts it back before the next step. So neither they nor where a checkpoint happens to be written
change the training noise, and a checkpoint stores the stream, whatever ran since the last step.

States are plain containers of tensors and numbers, so checkpoints load with ``weights_only=True``.
Under DDP each rank's stream differs (``on_fit_start`` offsets the seed per rank): every rank's
state is gathered into the checkpoint (rank 0 writes it) and each rank restores its own.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

log = logging.getLogger("genexp")


def capture() -> dict[str, Any]:
    """The global generators' states, as tensors and numbers only."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    # only once CUDA is in use: reading its state would initialise it (and its memory) otherwise
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Set the global generators to a :func:`capture` result."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


class RNGState(pl.Callback):
    """Keeps the training stream apart from everything between steps and saves it in checkpoints.

    Put it first in the callback list: its ``on_train_epoch_end`` and ``on_validation_start`` must
    run before any other callback's, which may draw random numbers there (sample grids).
    """

    def __init__(self, test_seed: int = 0):
        self.test_seed = int(test_seed)
        self._test_stream: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None
        self._pending: dict[str, Any] | None = None  # the stream, while something else draws
        self._loaded: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    # ------------------------------------------------------------ keeping the stream apart
    def _fork(self) -> None:
        if self._pending is None:
            self._pending = capture()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fork()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._fork()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # also where a resumed run takes its stream back: after Lightning's restore and the
        # per-rank reseed of on_fit_start, before the first step
        if self._pending is not None:
            restore(self._pending)
            self._pending = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            restore(self._pending)
            self._pending = None

    # ------------------------------------------------------------ a deterministic test
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The test draws from its own stream, seeded by the run's seed and the rank: testing the
        same weights twice gives the same numbers (resumed or not); the stream before is put back."""
        self._test_stream = capture()
        seed = (self.test_seed + 7919 * trainer.global_rank) % 2**32
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # every CUDA device too

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._test_stream is not None:
            restore(self._test_stream)
            self._test_stream = None

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        own = self._pending if self._pending is not None else capture()
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return {"world_size": 1, "ranks": [own]}
        # every rank dumps the checkpoint (only rank 0 writes it), so every rank takes part here
        ranks: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, own)
        return {"world_size": trainer.world_size, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is None:
            return
        if loaded["world_size"] != trainer.world_size:
            log.warning(
                "the checkpoint's random states are of %d process(es), this run has %d: fresh random "
                "streams (the run continues, but not as the interrupted one would have)",
                loaded["world_size"],
                trainer.world_size,
            )
            return
        self._pending = loaded["ranks"][trainer.global_rank]
