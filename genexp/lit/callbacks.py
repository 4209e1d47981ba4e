"""Callbacks: sample/reconstruction/latent grids, throughput, and plain-text epoch summaries."""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import math
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from genexp import atomic, progress
from genexp.errors import check_float, check_int
from genexp.models.base import Autoencoding, Reconstructing

log = logging.getLogger("genexp")


def log_image(trainer: pl.Trainer, key: str, path: Path, caption: str) -> None:
    """Send a PNG written to ``path`` to every logger that takes images (wandb, TensorBoard)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], caption=[caption], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            import numpy as np
            from PIL import Image

            array = np.asarray(Image.open(path).convert("RGB"))
            logger.experiment.add_image(key, array, trainer.global_step, dataformats="HWC")


def latent_scatter(latents: torch.Tensor, labels: torch.Tensor, path: Path, title: str) -> None:
    """Scatter plot of 2-D latents, or of their first two principal components, coloured by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = latents.float()
    if z.shape[1] > 2:
        z = z - z.mean(0)
        _, _, v = torch.pca_lowrank(z, q=2, center=False)
        z, axes = z @ v[:, :2], ("PC 1", "PC 2")
    elif z.shape[1] == 2:
        axes = ("z1", "z2")
    else:
        z, axes = torch.cat([z, torch.zeros_like(z)], 1), ("z1", "")
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    labelled = labels >= 0
    sc = ax.scatter(z[:, 0], z[:, 1], c=labels.where(labelled, 0), cmap="tab10", s=6, alpha=0.8)
    if labelled.any():
        fig.colorbar(sc, ax=ax, label="label")
    ax.set(xlabel=axes[0], ylabel=axes[1], title=title)
    fig.tight_layout()
    try:
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def save_png(images: torch.Tensor, path: Path, nrow: int) -> None:
    """torchvision's grid, written atomically: a signal or a full disk leaves no half PNG."""
    from torchvision.utils import save_image

    with atomic.atomic_path(path) as tmp:
        save_image(images, tmp, nrow=nrow, format="png")


class SampleGrid(pl.Callback):
    """Every ``every_n_epochs``: samples from fixed noise, reconstructions of a fixed validation
    batch, and a latent scatter plot, written under ``dirpath`` as PNG and sent to the loggers.

    Args:
        dirpath: folder for the PNGs (the run's ``samples/``).
        every_n_epochs: how often (0: only at the end of training).
        num_samples: images per grid.
        seed: seed of the sampling noise (the same noise every epoch, so grids compare).
        latent_points: validation images encoded for the scatter plot (0: off).
        temperatures: for families whose ``sample`` takes a ``temperature`` (flows), extra grids
            ``{tag}_samples_t{T}.png`` from the same noise scaled by T (``_samples.png`` is T = 1).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_epochs: int = 1,
        num_samples: int = 64,
        seed: int = 0,
        latent_points: int = 1000,
        temperatures: tuple[float, ...] = (0.7,),
    ):
        self.dirpath = Path(dirpath)
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, minimum=0)
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        self.seed = seed
        self.latent_points = check_int("latent_points", latent_points, minimum=0)
        self.temperatures = tuple(check_float("temperatures", t, minimum=0.0) for t in temperatures)
        self.written: list[Path] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            self.write(trainer, pl_module, f"epoch_{epoch:03d}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if not self.every_n_epochs or epoch % self.every_n_epochs:
            self.write(trainer, pl_module, f"epoch_{epoch:03d}")

    @rank_zero_only
    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        from genexp.lit.ema import sampling_family

        model = sampling_family(trainer, pl_module)  # the EMA weights when the run averages them
        self.dirpath.mkdir(parents=True, exist_ok=True)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), progress.task(f"sample grid ({tag})", 1):
                self._samples(trainer, model, pl_module.device, tag)
                datamodule = trainer.datamodule
                if isinstance(model, Reconstructing) and datamodule is not None:
                    self._reconstructions(trainer, model, datamodule, pl_module.device, tag)
                if isinstance(model, Autoencoding) and self.latent_points and datamodule is not None:
                    self._latents(trainer, model, datamodule, pl_module.device, tag)
        finally:
            model.train(was_training)

    def _samples(self, trainer: pl.Trainer, model, device: torch.device, tag: str) -> None:
        """``{tag}_samples.png`` from fixed noise; for families whose ``sample`` takes a
        ``temperature`` (flows), one grid per temperature from the same noise."""
        nrow = int(self.num_samples**0.5)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        samples = model.sample(self.num_samples, generator=generator)
        path = self.dirpath / f"{tag}_samples.png"
        save_png(samples.float().clamp(0, 1).cpu(), path, nrow=nrow)
        self._done(trainer, "samples", path, tag)
        if "temperature" not in inspect.signature(model.sample).parameters:
            return
        for t in self.temperatures:  # the same noise, scaled: z ~ N(0, T^2 I)
            generator = torch.Generator(device=device).manual_seed(self.seed)
            samples = model.sample(self.num_samples, generator=generator, temperature=t)
            path = self.dirpath / f"{tag}_samples_t{t:g}.png"
            save_png(samples.float().clamp(0, 1).cpu(), path, nrow=nrow)
            self._done(trainer, f"samples_t{t:g}", path, tag)

    def _reconstructions(
        self, trainer: pl.Trainer, model, datamodule, device: torch.device, tag: str
    ) -> None:
        """Pairs (original, reconstruction) of a fixed validation batch."""
        x, _ = datamodule.fixed_batch("val", self.num_samples // 2)
        x = x.to(device)
        recon = model.reconstruct(x).float().clamp(0, 1)
        pairs = torch.stack([x, recon], 1).flatten(0, 1)  # original, reconstruction, ...
        path = self.dirpath / f"{tag}_reconstructions.png"
        save_png(pairs.cpu(), path, nrow=2 * int((self.num_samples // 2) ** 0.5))
        self._done(trainer, "reconstructions", path, tag)

    def _latents(self, trainer: pl.Trainer, model, datamodule, device: torch.device, tag: str) -> None:
        """A scatter plot of the codes of fixed validation images, coloured by label."""
        x, y = datamodule.fixed_batch("val", self.latent_points)
        if len(x) < 3:  # a 2-D projection needs a few points
            return
        z = model.encode(x.to(device))  # (B, latent_dim)
        path = self.dirpath / f"{tag}_latents.png"
        latent_scatter(z.cpu(), y.cpu(), path, f"latents of {len(x)} validation images ({tag})")
        # a figure is a web of reference cycles, and with torch's many long-lived objects a full
        # collection rarely runs: a long run grew ~1 MB per plot (tests/test_long_run.py). The
        # young generations hold it: ~2 ms
        gc.collect(1)
        self._done(trainer, "latents", path, tag)

    def _done(self, trainer: pl.Trainer, kind: str, path: Path, tag: str) -> None:
        self.written.append(path)
        log_image(trainer, f"val/{kind}", path, tag)


class Throughput(pl.Callback):
    """Training images per second over the training batches only (not validation or sampling)."""

    def __init__(self):
        self.images = 0
        self.seconds = 0.0
        self._start = None
        self._epoch_images = 0
        self._epoch_seconds = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_images, self._epoch_seconds = 0, 0.0
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # batch end to batch end: data loading, step and hooks count; epoch-end work does not
        now = time.perf_counter()
        if self._start is None:  # resumed inside an epoch: time from this batch on
            self._start = now
            return
        n = batch[0].shape[0] * trainer.world_size
        self._epoch_images += n
        self._epoch_seconds += now - self._start
        self._start = now

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.images += self._epoch_images
        self.seconds += self._epoch_seconds
        if self._epoch_seconds > 0:
            pl_module.log("train/img_per_sec", self._epoch_images / self._epoch_seconds, rank_zero_only=True)

    @property
    def img_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def bits_per_dim_images(pl_module: pl.LightningModule, stage: str) -> int | None:
    """How many images of ``stage`` get the family's bits/dim (``model.bpd_images``), or None when
    the stage computes none or all of them."""
    model = getattr(pl_module, "model", None)
    if stage not in getattr(model, "bpd_stages", ()):
        return None
    return getattr(model, "bpd_images", None)


class WaitProgress(pl.Callback):
    """The test epoch as a :func:`genexp.progress.task` (batches), so the waits inside it (a
    likelihood bound, an ODE) report their place in the whole: log lines with percent and ETA when
    the output is not a terminal (where Lightning draws no bar)."""

    def __init__(self):
        self._tasks = contextlib.ExitStack()
        self._task: progress.Task | None = None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        total = int(sum(n for n in trainer.num_test_batches if n != float("inf")))
        what, limit = "test batches", bits_per_dim_images(pl_module, "test")
        loaders = trainer.test_dataloaders
        batch_size = getattr(loaders[0] if isinstance(loaders, list | tuple) else loaders, "batch_size", None)
        if limit is not None and batch_size and total:
            # the batches that carry a likelihood estimate cost nearly all of the wait: count those
            what, total = "test batches with bits/dim", min(total, math.ceil(limit / batch_size))
        self._task = self._tasks.enter_context(progress.task(what, total or None))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._task is not None:
            self._task.advance()

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._tasks.close()
        self._task = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._tasks.close()
        self._task = None


class EpochSummary(pl.Callback):
    """One plain log line per epoch: mean training loss, validation metrics, time (files, CI logs)."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        # also the state after a resume that lands mid-epoch (no on_train_epoch_start then)
        self._start = time.perf_counter()
        self._loss_sum, self._batches = 0.0, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._loss_sum = self._loss_sum + loss.detach()  # stays on the device: no sync per step
            self._batches += 1

    @rank_zero_only
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        parts = [f"train/loss {float(self._loss_sum) / max(self._batches, 1):.4g}"]
        parts += [
            f"{k} {float(v):.4g}"
            for k, v in sorted(metrics.items())
            if (k.startswith("val/") or k in ("train/d_loss", "train/g_loss")) and v.numel() == 1
        ]
        elapsed = time.perf_counter() - self._start
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        log.info(
            "epoch %d/%s (step %d, %.1fs) | %s",
            trainer.current_epoch + 1,
            max_epochs,
            trainer.global_step,
            elapsed,
            " | ".join(parts),
        )
