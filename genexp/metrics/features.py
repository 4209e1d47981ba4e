"""Feature extractors for FID/KID/precision-recall: Inception-v3 (needs weights) or a dataset classifier.

A :class:`FeatureExtractor` maps images (B, C, H, W) to features (B, num_features) and plugs into
torchmetrics as a custom ``feature`` module: ``FrechetInceptionDistance(feature=extractor)`` and
``KernelInceptionDistance(feature=extractor)`` read ``num_features`` and call the module on the
images exactly as passed to ``update`` (torchmetrics converts to uint8 only for its own Inception),
so ``forward`` accepts float images in [0, 1] (``normalize=True``) and uint8 images (the default
``normalize=False``) alike.

- ``inception``: the pool3 (2048) features of the TF Inception-v3 that FID is defined with (Heusel
  et al. 2017), through torchmetrics' wrapper of torch-fidelity's port. Needs a local weights file.
- ``classifier``: the penultimate layer of :class:`~genexp.metrics.classifier.SmallCNN`, trained
  once on the dataset's labelled train split and cached; works offline. Numbers compare runs on the
  same dataset, not with published FIDs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

from genexp import atomic
from genexp.data.base import check_cache_dir
from genexp.errors import GenexpError
from genexp.metrics.classifier import SmallCNN, accuracy, train_classifier

log = logging.getLogger(__name__)

# The FID Inception weights (converted from TF's 2015-12-05 graph), as torch-fidelity publishes them;
# pytorch-fid's pt_inception-2015-12-05-6726825d.pth uses the same key names.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"

# bump when SmallCNN or its training changes, so old caches are not reused
CLASSIFIER_VERSION = 1
FEATURES = ("classifier", "inception")  # the features= options


def default_cache_dir() -> Path:
    """``$GENEXP_CACHE`` or ``~/.cache/genexp`` (the ``paths.cache_dir`` default)."""
    return Path(os.environ.get("GENEXP_CACHE") or "~/.cache/genexp").expanduser()


def as_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images -> float32 [0, 1]."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


class FeatureExtractor(nn.Module):
    """Images (B, C, H, W), uint8 or float in [0, 1] -> float32 features (B, num_features).

    Always in eval mode with frozen weights: ``train()`` is a no-op, so a metric inside a
    LightningModule cannot flip its batch norms into training mode.

    Attributes:
        name: what the features are, recorded beside every FID (``fid_features``).
        num_features: feature dimension (read by torchmetrics).
    """

    def __init__(self, name: str, num_features: int):
        super().__init__()
        self.name = name
        self.num_features = num_features

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """float [0, 1] images (B, C, H, W) on ``self.device`` -> features (B, num_features)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.extract(as_unit_float(x.to(self.device))).float()


class ClassifierFeatures(FeatureExtractor):
    """The penultimate layer of a trained :class:`SmallCNN` on images of the training shape."""

    def __init__(self, model: SmallCNN, key: str, image_size: int):
        super().__init__(f"classifier:{key}", model.feature_dim)
        self.model = model.eval().requires_grad_(False)
        self.image_size = image_size

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.model.in_channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise GenexpError(
                f"features={self.name} was trained on {expected} images, got {tuple(x.shape[1:])}; "
                "evaluate at the dataset's size and channels"
            )
        return self.model.features(x)


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 pool3 features (2048) as FID defines them; grey images are repeated to RGB.

    Uses torch-fidelity's TF-compatible resize to 299x299 (``antialias=False`` in torchmetrics), so
    numbers match torch-fidelity and the original TF FID code.
    """

    def __init__(self, network: nn.Module, name: str):
        super().__init__(name, 2048)
        self.network = network

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # the network wants uint8 (B, 3, H, W); rounding to 8 bits is what saving samples as PNG does
        return self.network(x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8))


def _inception_weights_error(weights_path, reason: str) -> GenexpError:
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    hint = f" (a copy exists at {hub})" if hub.is_file() else ""
    return GenexpError(
        f"eval.inception_weights={weights_path}: {reason}; features=inception needs the FID Inception-v3 "
        f"weights {INCEPTION_FILE}{hint}, downloaded on a connected machine from {INCEPTION_URL} "
        "(or pytorch-fid's pt_inception-2015-12-05-6726825d.pth); "
        "features=classifier works offline"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inception_features(weights_path: str | os.PathLike | None) -> InceptionFeatures:
    """The FID Inception-v3 from a local weights file; never downloads.

    Raises :class:`GenexpError` (one line) at once when the path is unset or missing, when the file
    is not a weights-only state dict of that network, or when torch-fidelity is not installed.
    The extractor's name is ``inception:<first 8 hex digits of the file's sha256>``.
    """
    if weights_path is None or str(weights_path) == "":
        raise _inception_weights_error(None, "not set")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise _inception_weights_error(weights_path, "file not found")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise GenexpError(
            "features=inception needs torch-fidelity: pip install 'genexp[inception]' "
            "(or use features=classifier)"
        )
    try:
        # torch-fidelity loads the file with weights_only=False; loading it here first with
        # weights_only=True refuses a file that would run code before it gets there
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not a weights file"
        raise _inception_weights_error(
            weights_path, f"not a weights-only PyTorch file ({type(err).__name__})"
        ) from None

    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        network = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=str(path),
            antialias=False,
        )
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys or shapes
        first = str(err).splitlines()[0]
        raise _inception_weights_error(weights_path, f"not the Inception-v3 state dict ({first})") from None
    # the name records which file made the features: FIDs from different files do not compare
    return InceptionFeatures(network, f"inception:{_sha256(path)[:8]}")


def _labelled(split) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled images (uint8) and labels of an in-memory split; empty if it has none."""
    images, labels = getattr(split, "images", None), getattr(split, "labels", None)
    if images is None or labels is None:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    keep = labels >= 0
    return images[keep], labels[keep]


def content_hash(*parts) -> str:
    """sha1 of tensors (shape, dtype and bytes) and plain values; a short stable content key."""
    digest = hashlib.sha1()
    for part in parts:
        if isinstance(part, torch.Tensor):
            tensor = part.detach().cpu().contiguous()
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.float()
            digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(memoryview(tensor.numpy()).cast("B"))
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()


def _load_classifier(path: Path, key: str) -> tuple[SmallCNN, float] | None:
    """The cached classifier at ``path`` if it is intact and made for ``key``; else None."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob["key"] != key or blob["version"] != CLASSIFIER_VERSION:
            raise ValueError("made for another dataset or version")
        model = SmallCNN(**blob["arguments"])
        model.load_state_dict(blob["state_dict"])
        return model.eval(), float(blob["accuracy"])
    except Exception as err:  # noqa: BLE001 - a bad cache is rebuilt, never fatal
        log.warning("classifier cache %s is unusable (%s: %s); retraining", path, type(err).__name__, err)
        return None


def save_atomic(blob: dict, path: Path) -> None:
    """An optional cache file, written atomically; a failed write is a warning (genexp.atomic.save_cache)."""
    atomic.save_cache(blob, path, "cache", "going on without it")


def _classifier_blob(
    model: SmallCNN, acc: float, key: str, source, epochs: int, seed: int, num_train: int, num_test: int
) -> dict:
    """The cache file's contents: the weights plus what :func:`_load_classifier` checks and rebuilds from."""
    return {
        "version": CLASSIFIER_VERSION,
        "key": key,
        "arguments": model.arguments(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "accuracy": acc,
        "num_classes": model.num_classes,
        "image_size": source.image_size,
        "epochs": epochs,
        "seed": seed,
        "num_train": num_train,
        "num_test": num_test,
    }


def classifier_features(
    source, cache_dir: str | os.PathLike, device: str | torch.device = "cpu", epochs: int = 5, seed: int = 0
) -> tuple[ClassifierFeatures, dict]:
    """The dataset classifier's features: trained once on the labelled train split, then cached.

    The cache file is ``cache_dir/classifier/<key>.pt`` with key
    ``<dataset>-<size>x<channels>-<hash>``; the hash covers the train and test images and labels,
    ``epochs``, ``seed`` and the network version, so another dataset, split or size never reuses it.
    An unreadable or mismatched cache file is retrained and replaced.

    Args:
        source: a genexp ImageSource (``load()``, ``name``, ``image_size``, ``channels``) whose
            train and test splits are in memory with labels.
        cache_dir: root of genexp's cache.
        device: where to train and run the classifier.
        epochs, seed: training length and seed (part of the key).

    Returns:
        The extractor (on ``device``) and ``{"features", "accuracy", "cache", "trained"}``;
        ``accuracy`` is the test-split accuracy recorded when it was trained.
    """
    cache_dir = check_cache_dir(cache_dir)  # a file there is one line naming GENEXP_CACHE, before training
    splits = source.load()
    train_x, train_y = _labelled(splits.train)
    test_x, test_y = _labelled(splits.test)
    if len(train_x) == 0 or len(test_x) == 0:
        raise GenexpError(
            f"features=classifier needs a labelled dataset (train and test labels); "
            f"dataset {source.name} has none here: use features=inception"
        )
    digest = content_hash(train_x, train_y, test_x, test_y, epochs, seed, CLASSIFIER_VERSION)[:10]
    key = f"{source.name}-{source.image_size}x{source.channels}-{digest}"
    path = cache_dir / "classifier" / f"{key}.pt"

    cached = _load_classifier(path, key)
    if cached is None:
        log.info("training the feature classifier %s on %d labelled images", key, len(train_x))
        model, acc = train_classifier(
            train_x, train_y, test_x, test_y, epochs=epochs, seed=seed, device=device
        )
        save_atomic(_classifier_blob(model, acc, key, source, epochs, seed, len(train_x), len(test_x)), path)
    else:
        model, acc = cached
    extractor = ClassifierFeatures(model, key, source.image_size).to(device)
    log.info("feature classifier %s: test accuracy %.4f (%s)", key, acc, path)
    info = {"features": extractor.name, "accuracy": acc, "cache": str(path), "trained": cached is None}
    return extractor, info


def classifier_accuracy(extractor: ClassifierFeatures, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the extractor's classifier on uint8 images: re-checks a cached accuracy."""
    return accuracy(extractor.model, images, labels)


def feature_extractor(
    features: str,
    source,
    cache_dir: Path,
    device: str,
    classifier_epochs: int = 5,
    seed: int = 0,
    inception_weights: str | None = None,
) -> tuple[FeatureExtractor, dict]:
    """(extractor, info) for ``features=classifier|inception``; info records how it was made."""
    if features == "inception":  # never downloads: a missing or wrong file is a one-line GenexpError
        extractor = inception_features(inception_weights).to(device)
        return extractor, {"features": extractor.name, "weights": str(inception_weights)}
    extractor, info = classifier_features(
        source, cache_dir, device=device, epochs=classifier_epochs, seed=seed
    )
    return extractor, dict(info)
