"""``val/fid`` during training: FID of a fixed number of samples against a real split, every N epochs.

The sampling loop and the feature extractor are the pure-torch ones ``genexp evaluate`` uses
(:mod:`genexp.metrics.sampling`, :mod:`genexp.metrics.features`), so the numbers compare.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch

from genexp.data.base import Splits
from genexp.errors import check_choice, check_int
from genexp.metrics.features import FEATURES, default_cache_dir, feature_extractor
from genexp.metrics.sampling import sample_uint8

log = logging.getLogger("genexp")


class FIDCallback(pl.Callback):
    """Log ``val/fid`` every ``every_n_epochs`` epochs, at the end of validation.

    Rank zero draws ``num_samples`` images from a fixed seed and scores them against the ``reference``
    split of the run's dataset in the feature space of ``features``; the value is broadcast and logged
    by every rank (the same number), so ``monitor.metric=val/fid`` works under DDP too. The classifier
    (``features=classifier``) is trained once per dataset and cached under ``cache_dir``. Writes no
    files of its own.

    Args:
        every_n_epochs: how often (0: never).
        num_samples: generated images per FID (small: a cheap, noisy, but comparable-over-time number).
        features: ``classifier`` or ``inception`` (needs ``inception_weights``).
        reference: the real split, ``train``, ``val`` or ``test``.
        batch_size: images per ``sample`` call.
        seed: sampling seed (the same noise every time).
        cache_dir: the classifier and reference-statistics cache (null: ``$GENEXP_CACHE`` or ``~/.cache/genexp``).
        classifier_epochs: training epochs of the feature classifier (on first use).
        inception_weights: a local Inception weights file for ``features=inception``.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_samples: int = 1000,
        features: str = "classifier",
        reference: str = "val",
        batch_size: int = 250,
        seed: int = 0,
        cache_dir: str | None = None,
        classifier_epochs: int = 5,
        inception_weights: str | None = None,
    ):
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, minimum=0)
        self.num_samples = check_int("num_samples", num_samples, minimum=4)
        self.features = check_choice("features", features, FEATURES)
        self.reference = check_choice("reference", reference, Splits._fields)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.classifier_epochs = check_int("classifier_epochs", classifier_epochs, minimum=1)
        self.inception_weights = inception_weights
        self._extractor = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.every_n_epochs:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        fid = self.compute(trainer, pl_module) if trainer.is_global_zero else 0.0
        fid = trainer.strategy.broadcast(fid, src=0)  # every rank logs rank zero's number
        pl_module.log("val/fid", float(fid), on_step=False, on_epoch=True, sync_dist=False)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        from genexp.metrics.fidelity import evaluate_fidelity  # torchmetrics: only when FID is due

        datamodule = trainer.datamodule
        datamodule.setup()
        source = datamodule.dataset
        device = str(pl_module.device)
        if self._extractor is None:
            self._extractor, _ = feature_extractor(
                self.features,
                source,
                self.cache_dir,
                device,
                classifier_epochs=self.classifier_epochs,
                seed=self.seed,
                inception_weights=self.inception_weights,
            )
        real = getattr(datamodule.splits, self.reference).images
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
            fake = sample_uint8(model, self.num_samples, self.batch_size, generator).images
        finally:
            model.train(was_training)
        result = evaluate_fidelity(
            real,
            fake,
            self._extractor,
            reference=f"{source.name}/{self.reference}",
            batch_size=self.batch_size,
            cache_dir=self.cache_dir,  # the reference split's features are computed once per dataset
            seed=self.seed,
        )
        log.info(
            "val/fid %.4g (%d samples vs %d %s images)", result["fid"], len(fake), len(real), self.reference
        )
        return float(result["fid"])
