"""Sample fidelity in a feature space: FID, KID and improved precision/recall, with cached real statistics.

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to real and generated features,
  ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)); torchmetrics' ``FrechetInceptionDistance``.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, averaged over random
  subsets; torchmetrics' ``KernelInceptionDistance``. Unbiased, so ~0 (possibly negative) for equal
  distributions even at small sample counts, where FID is biased upwards.
- precision/recall (Kynkäänniemi et al. 2019): the fraction of generated samples inside the real
  manifold (union of k-NN balls around real features), and of real samples inside the generated one.

Every extractor pass happens once per image set: features are extracted here in batches and then
fed to the torchmetrics metrics through an identity ``feature`` module, so FID, KID and
precision/recall share one pass, and the real side (features plus FID sums) can be cached on disk.
FID depends on the sample count and the reference set, so :func:`evaluate_fidelity` records both.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from genexp.errors import GenexpError
from genexp.metrics.features import FeatureExtractor, content_hash, save_atomic
from genexp.progress import track

log = logging.getLogger(__name__)

STATS_VERSION = 1


class _Precomputed(nn.Module):
    """The identity as a torchmetrics ``feature`` module: ``update`` receives extracted features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class RealStatistics(NamedTuple):
    """The real side of FID/KID/precision-recall, computed once per (extractor, reference, images).

    ``fid_sum`` and ``fid_cov_sum`` are torchmetrics' FID states (sum of features and of their outer
    products, float64); ``features`` (N, F) float32 serve KID and precision/recall.
    """

    key: str
    features: torch.Tensor
    fid_sum: torch.Tensor
    fid_cov_sum: torch.Tensor
    num_samples: int
    from_cache: bool = False


@torch.no_grad()
def extract_features(
    images: torch.Tensor, extractor: FeatureExtractor, batch_size: int = 256
) -> torch.Tensor:
    """Images (N, C, H, W), float [0, 1] or uint8, -> features (N, F) float32 on the CPU, in batches."""
    batches = track(images.split(batch_size), f"features of {len(images)} images, batch")
    out = [extractor(batch.to(extractor.device)).float().cpu() for batch in batches]
    return torch.cat(out) if out else torch.empty(0, extractor.num_features)


def _fid_metric(num_features: int) -> FrechetInceptionDistance:
    return FrechetInceptionDistance(
        feature=_Precomputed(num_features), reset_real_features=False, normalize=True
    )


def statistics_key(real_images: torch.Tensor, extractor: FeatureExtractor, reference: str) -> str:
    """Extractor name, reference split, count and a content hash of the images (same key, same stats)."""
    return f"{extractor.name}|{reference}|n={len(real_images)}|{content_hash(real_images)[:16]}"


def _statistics_from_features(key: str, features: torch.Tensor) -> RealStatistics:
    metric = _fid_metric(features.shape[1])
    for part in features.split(4096):
        metric.update(part.double(), real=True)
    return RealStatistics(
        key,
        features,
        metric.real_features_sum,
        metric.real_features_cov_sum,
        int(metric.real_features_num_samples),
    )


def _load_statistics(path: Path, key: str) -> RealStatistics | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob["version"] != STATS_VERSION or blob["key"] != key:
            return None
        return RealStatistics(
            key, blob["features"], blob["fid_sum"], blob["fid_cov_sum"], int(blob["num_samples"]), True
        )
    except Exception as err:  # noqa: BLE001 - a bad cache is recomputed, never fatal
        log.warning("real statistics cache %s is unusable (%s); recomputing", path, type(err).__name__)
        return None


def real_statistics(
    real_images: torch.Tensor,
    extractor: FeatureExtractor,
    cache_path: str | Path | None = None,
    reference: str = "",
    batch_size: int = 256,
    key: str | None = None,
) -> RealStatistics:
    """Features and FID sums of the real images, read from ``cache_path`` when its key matches.

    The key (:func:`statistics_key`) holds the extractor name, ``reference``, the image count and a
    hash of the images, so a changed dataset, size or extractor recomputes and rewrites the file.
    ``key`` skips hashing the images again when the caller already computed it.
    """
    key = statistics_key(real_images, extractor, reference) if key is None else key
    path = Path(cache_path).expanduser() if cache_path is not None else None
    if path is not None and (stats := _load_statistics(path, key)) is not None:
        log.info("real statistics for %s read from %s", reference or extractor.name, path)
        return stats
    stats = _statistics_from_features(key, extract_features(real_images, extractor, batch_size))
    if path is not None:
        save_atomic(
            {
                "version": STATS_VERSION,
                "key": key,
                "features": stats.features,
                "fid_sum": stats.fid_sum,
                "fid_cov_sum": stats.fid_cov_sum,
                "num_samples": stats.num_samples,
            },
            path,
        )
    return stats


def fid_from_features(real: RealStatistics, fake_features: torch.Tensor) -> float:
    """FID between cached real statistics and generated features (N, F), through torchmetrics."""
    metric = _fid_metric(real.features.shape[1])
    metric.real_features_sum = real.fid_sum.clone()
    metric.real_features_cov_sum = real.fid_cov_sum.clone()
    metric.real_features_num_samples = torch.tensor(real.num_samples)
    for part in fake_features.split(4096):
        metric.update(part.double(), real=False)
    return float(metric.compute())


def kid_from_features(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    subset_size: int = 1000,
    subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over ``subsets``) of features, float64; ``subset_size`` is clamped to both counts.

    The subsets are drawn from ``seed`` (torchmetrics draws from the global RNG; it is restored).
    """
    subset_size = clamp_subset_size(subset_size, len(real_features), len(fake_features))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_Precomputed(real_features.shape[1]), subsets=subsets, subset_size=subset_size
        )
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def clamp_subset_size(subset_size: int, num_real: int, num_fake: int) -> int:
    """The KID subset size actually used: at most the smaller sample count (and at least 2)."""
    return max(2, min(subset_size, num_real, num_fake))


def fid(
    real: torch.Tensor | None,
    fake: torch.Tensor,
    extractor: FeatureExtractor,
    batch_size: int = 256,
    real_stats: RealStatistics | None = None,
) -> float:
    """FID between image sets (N, C, H, W), float [0, 1] or uint8; ``real_stats`` replaces ``real``."""
    if real_stats is None:
        real_stats = real_statistics(real, extractor, batch_size=batch_size)
    return fid_from_features(real_stats, extract_features(fake, extractor, batch_size))


def kid(
    real: torch.Tensor | None,
    fake: torch.Tensor,
    extractor: FeatureExtractor,
    subset_size: int = 1000,
    subsets: int = 100,
    batch_size: int = 256,
    real_stats: RealStatistics | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std) between image sets; ``subset_size`` is clamped (see :func:`clamp_subset_size`)."""
    real_features = (
        real_stats.features if real_stats is not None else extract_features(real, extractor, batch_size)
    )
    return kid_from_features(
        real_features, extract_features(fake, extractor, batch_size), subset_size, subsets, seed
    )


def _knn_radii(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row, (N,) (the point itself is the 0th)."""
    radii = []
    for part in features.split(chunk):
        d = torch.cdist(part, features)  # (chunk, N)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of queries inside at least one ball (centre_j, radius_j)."""
    inside = 0
    for part in queries.split(chunk):
        inside += int((torch.cdist(part, centres) <= radii[None]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(
    real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of features (N, F), (M, F).

    precision = fraction of fake samples within the k-NN radius of some real sample;
    recall = fraction of real samples within the k-NN radius of some fake sample.
    Computed in float64 with chunked distances, so 10,000 x 10,000 pairs fit in memory.
    """
    if min(len(real_features), len(fake_features)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples on each side")
    real = real_features.double()
    fake = fake_features.double()
    precision = _coverage(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _knn_radii(fake, k, chunk), chunk)
    return precision, recall


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "none"


def evaluate_fidelity(
    real_images: torch.Tensor,
    fake_images: torch.Tensor,
    extractor: FeatureExtractor,
    reference: str,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    k: int = 3,
    batch_size: int = 256,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """FID, KID and precision/recall of generated images against a reference split, with provenance.

    Args:
        real_images, fake_images: (N, C, H, W), float [0, 1] or uint8.
        extractor: the feature space (its name is recorded as ``fid_features``).
        reference: the real split, e.g. ``"mnist5k/test"`` (recorded as ``fid_reference``).
        kid_subset_size: clamped to both sample counts; the value used is ``kid_subset_size``.
        k: neighbourhood size of precision/recall; clamped below the sample counts, the value
            used is ``precision_recall_k``.
        cache_dir: if set, real statistics are cached under ``cache_dir/fid_stats/``.
        seed: seed of KID's subsets.

    Returns:
        A flat dict for metrics.json: ``fid, kid_mean, kid_std, precision, recall`` and
        ``fid_num_samples, fid_num_real, fid_reference, fid_features, kid_subset_size, kid_subsets,
        precision_recall_k``.
    """
    if min(len(real_images), len(fake_images)) < 2:
        raise GenexpError(
            f"FID/KID need at least 2 real and 2 generated images, got {len(real_images)} and {len(fake_images)}"
        )
    cache_path = None
    key = statistics_key(real_images, extractor, reference)
    if cache_dir is not None:
        name = f"{_slug(reference)}-{_slug(extractor.name)}-n{len(real_images)}-{content_hash(key)[:10]}.pt"
        cache_path = Path(cache_dir).expanduser() / "fid_stats" / name
    real = real_statistics(real_images, extractor, cache_path, reference, batch_size, key)
    fake_features = extract_features(fake_images, extractor, batch_size)
    subset = clamp_subset_size(kid_subset_size, len(real.features), len(fake_features))
    kid_mean, kid_std = kid_from_features(real.features, fake_features, subset, kid_subsets, seed)
    k = min(k, len(real.features) - 1, len(fake_features) - 1)  # k-NN radii need k + 1 points
    precision, recall = precision_recall(real.features, fake_features, k)
    return {
        "fid": fid_from_features(real, fake_features),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "fid_num_samples": len(fake_features),
        "fid_num_real": real.num_samples,
        "fid_reference": reference,
        "fid_features": extractor.name,
        "kid_subset_size": subset,
        "kid_subsets": kid_subsets,
        "precision_recall_k": k,
    }
