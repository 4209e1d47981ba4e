"""Image folders that used to go wrong silently (issue 14, section 4): 16-bit files clipped to white,
symlinked class folders dropped, a tiny PNG of 144 million pixels decoded whole, alpha/palette/CMYK/
animated files converted by chance; and the image cache: a failed write, a cache dir that is a file.

Every file here is real (written by PIL into ``tmp_path``) and read back through genexp's decoder.
"""

from __future__ import annotations

import errno
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from genexp.data.image_folder import ImageFolder, decode_image
from genexp.errors import ConfigError, GenexpError

LOGGER = "genexp.data.image_folder"


def solid(path, mode, colour, size=(4, 4), **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)
    return path


def pixels(path, channels, size=4):
    """The decoded (channels, size, size) image's top-left pixel as a tuple."""
    return tuple(decode_image(path, size, channels)[:, 0, 0].tolist())


# ------------------------------------------------------------------ bit depth


def test_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    # a 64x64 ramp 0, 16, ..., 65520 (every 16-bit level a multiple of 16): its 8-bit levels are v >> 8 =
    # 0..255, each 16 times, so the mean is 127.5 (convert("L") made 99.6% of such pixels 255)
    ramp = (np.arange(64 * 64, dtype=np.uint16) * 16).reshape(64, 64)
    path = tmp_path / "imgs" / "ramp.png"
    path.parent.mkdir()
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"  # a real 16-bit PNG
    grey = decode_image(path, 64, 1)
    assert torch.equal(grey[0], torch.from_numpy((ramp >> 8).astype(np.uint8)))
    assert grey.float().mean().item() == 127.5
    rgb = decode_image(path, 64, 3)
    assert torch.equal(rgb, grey.expand(3, -1, -1))
    for i in range(3):  # the folder reads it the same way
        Image.fromarray(ramp).save(path.with_name(f"copy{i}.png"))
    splits = ImageFolder(
        str(path.parent), image_size=64, channels=1, val_fraction=0.2, test_fraction=0.2
    ).load()
    assert all(s.images.float().mean().item() == 127.5 for s in splits)


def test_big_endian_32_bit_and_float_grey_follow_the_documented_rule(tmp_path):
    values = np.array([[0x1234, 0xFFFF], [0x00FF, 0x0100]])
    big = tmp_path / "big_endian.tif"
    Image.frombytes("I;16B", (2, 2), values.astype(">u2").tobytes()).save(big)
    assert Image.open(big).mode == "I;16B"
    assert decode_image(big, 2, 1)[0].tolist() == [[0x12, 0xFF], [0x00, 0x01]]  # v >> 8
    wide = tmp_path / "int32.tif"  # mode I: read as 16-bit, clipped to 0..65535 first
    Image.fromarray(np.array([[0x1234, 70000], [-5, 0x0100]], dtype=np.int32)).save(wide)
    assert Image.open(wide).mode == "I"
    assert decode_image(wide, 2, 1)[0].tolist() == [[0x12, 0xFF], [0x00, 0x01]]
    real = tmp_path / "float.tif"  # mode F: read as [0, 1], clipped, round(255 v) (half to even)
    Image.fromarray(np.array([[0.5, 0.25], [1.5, -1.0]], dtype=np.float32)).save(real)
    assert Image.open(real).mode == "F"
    assert decode_image(real, 2, 1)[0].tolist() == [[128, 64], [255, 0]]


# ------------------------------------------------------------------ modes: alpha, palette, CMYK, frames

# Alpha is composited over white: out = round((c a + 255 (255 - a)) / 255), then colour -> grey by PIL's
# luma L = (19595 R + 38470 G + 7471 B + 2^15) >> 16. RGBA (200, 100, 50, 128):
#   R = (25600 + 32385) / 255 = 227.39 -> 227, G = (12800 + 32385) / 255 = 177.20 -> 177,
#   B = (6400 + 32385) / 255 = 152.10 -> 152; L = (19595*227 + 38470*177 + 7471*152 + 32768) >> 16 = 189.
# LA (60, 64): (3840 + 48705) / 255 = 206.06 -> 206. CMYK (50, 100, 150, 60): R = (255 - C)(255 - K) / 255:
#   (205*195, 155*195, 105*195) / 255 = (156.76, 118.53, 80.29) -> (157, 119, 80); L = 126.
MODES = [
    ("rgba", "x.png", "RGBA", (200, 100, 50, 128), {}, (227, 177, 152), (189,)),
    ("rgba-transparent", "x.png", "RGBA", (10, 20, 30, 0), {}, (255, 255, 255), (255,)),
    ("la", "x.png", "LA", (60, 64), {}, (206, 206, 206), (206,)),
    ("cmyk", "x.tif", "CMYK", (50, 100, 150, 60), {}, (157, 119, 80), (126,)),
    ("rgb-key-colour", "x.png", "RGB", (1, 2, 3), {"transparency": (1, 2, 3)}, (255, 255, 255), (255,)),
    ("one-bit", "x.png", "1", 1, {}, (255, 255, 255), (255,)),
]


@pytest.mark.parametrize(
    "name, mode, colour, save, rgb, grey", [m[1:] for m in MODES], ids=[m[0] for m in MODES]
)
def test_each_mode_converts_to_exact_values(name, mode, colour, save, rgb, grey, tmp_path):
    path = solid(tmp_path / name, mode, colour, **save)
    assert Image.open(path).mode == mode
    assert pixels(path, 3) == rgb
    assert pixels(path, 1) == grey


def test_palette_with_transparency_is_white_where_transparent(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 254 * 3)
    image.putpixel((0, 0), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)  # palette entry 0 is transparent
    assert Image.open(path).mode == "P"
    decoded = decode_image(path, 4, 3)
    assert decoded[:, 0, 0].tolist() == [200, 100, 50]  # opaque entry as it is
    assert decoded[:, 3, 3].tolist() == [255, 255, 255]  # transparent: white, not the entry's (10, 20, 30)
    # an opaque palette is its colours; a grey palette stays exact in grey (luma of (v, v, v) is v)
    plain = tmp_path / "plain.gif"
    opaque = Image.new("P", (4, 4), 0)
    opaque.putpalette([90, 90, 90] + [0] * 255 * 3)
    opaque.save(plain)
    assert Image.open(plain).mode == "P" and pixels(plain, 1) == (90,) and pixels(plain, 3) == (90, 90, 90)


@pytest.mark.parametrize("suffix", [".gif", ".png"])
def test_animated_files_give_their_first_frame(suffix, tmp_path):
    root = tmp_path / "frames"
    root.mkdir()
    for i in range(3):
        frames = [Image.new("RGB", (4, 4), c) for c in [(200, 0, 0), (0, 0, 200), (0, 200, 0)]]
        frames[0].save(root / f"{i}{suffix}", save_all=True, append_images=frames[1:], duration=50)
    assert getattr(Image.open(root / f"0{suffix}"), "n_frames", 1) == 3
    images = torch.cat([s.images for s in ImageFolder(str(root), image_size=4, channels=3).load()])
    assert images.shape == (3, 3, 4, 4)
    assert {tuple(p) for p in images[:, :, 0, 0].tolist()} == {(200, 0, 0)}


# ------------------------------------------------------------------ symlinked folders


def test_symlinked_class_folders_are_followed_and_loops_end(tmp_path, caplog):
    root = tmp_path / "images"
    elsewhere = tmp_path / "elsewhere" / "dogs"
    for i in range(4):
        solid(root / "cats" / f"{i}.png", "RGB", (200, 0, 0))
        solid(elsewhere / f"{i}.png", "RGB", (0, 0, 200))
    os.symlink(elsewhere, root / "dogs")  # a class folder kept on another disk
    os.symlink(root, root / "cats" / "loop")  # a link back to an ancestor must not recurse forever
    with caplog.at_level(logging.INFO, logger=LOGGER):
        source = ImageFolder(str(root), image_size=4, channels=3, val_fraction=0.25, test_fraction=0.25)
        splits = source.load()
    assert source.num_classes == 2
    images = torch.cat([s.images for s in splits])
    labels = torch.cat([s.labels for s in splits])
    assert len(images) == 8 and torch.bincount(labels).tolist() == [4, 4]
    assert torch.equal(labels, (images[:, 2, 0, 0] > 100).long())  # dogs (blue) = 1, from the linked folder
    assert "8 image(s), 2 classes (sub-folder names), decoded" in caplog.text
    assert "1 folder already seen (symlink loop or second link)" in caplog.text


# ------------------------------------------------------------------ the pixel limit


def test_a_17_kb_png_of_144_million_pixels_is_skipped_before_it_is_decoded(tmp_path, caplog, monkeypatch):
    root = tmp_path / "imgs"
    for i in range(3):
        solid(root / f"{i}.png", "RGB", (200, 0, 0))
    Image.new("1", (12000, 12000)).save(root / "bomb.png")
    assert (root / "bomb.png").stat().st_size < 20_000
    loaded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded.append(self.size) or original(self))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        splits = ImageFolder(str(root), image_size=4).load()  # the default dataset.max_pixels
    assert sum(len(s) for s in splits) == 3
    assert (12000, 12000) not in loaded, "the oversized image was decoded"
    assert (
        "skipped 1 file(s) of 4 over the pixel limit dataset.max_pixels=40000000 (e.g. 12000x12000)"
        in caplog.text
    )


def test_a_large_jpeg_is_drafted_under_the_limit_and_others_over_it_are_skipped(tmp_path, caplog):
    root = tmp_path / "imgs"
    for i in range(3):
        solid(root / f"photo{i}.jpg", "RGB", (10, 200, 30), size=(400, 300), quality=95)  # 120,000 px
    solid(root / "big.png", "RGB", (0, 0, 200), size=(400, 300))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        splits = ImageFolder(str(root), image_size=8, max_pixels=40_000).load()
    images = torch.cat([s.images for s in splits])
    assert len(images) == 3  # each JPEG decoded at 1/2 scale (200x150 = 30,000 px); the PNG cannot be
    assert images[:, :, 4, 4].tolist() == [[10, 200, 30]] * 3
    assert (
        "skipped 1 file(s) of 4 over the pixel limit dataset.max_pixels=40000 (e.g. 400x300)" in caplog.text
    )


MAX_PIXELS_ZERO = "dataset.max_pixels=0: must be >= 1"


@pytest.mark.parametrize("value", [0, -1, "many", 1.5, True])
def test_max_pixels_must_be_a_positive_integer(value, tmp_path):
    with pytest.raises(ConfigError, match="^max_pixels=.*must be"):
        ImageFolder(str(tmp_path), max_pixels=value)


def test_max_pixels_zero_is_one_line_before_training(tmp_path):
    from conftest import compose_cfg, tiny

    from genexp.commands.train import train

    no_data = [o for o in tiny("vae") if not o.startswith("dataset")]
    overrides = [*no_data, "dataset=image_folder", f"dataset.root={tmp_path}", "dataset.max_pixels=0"]
    with pytest.raises(GenexpError) as err:
        train(compose_cfg(overrides, tmp_path / "run"))
    assert str(err.value).startswith(MAX_PIXELS_ZERO) and "\n" not in str(err.value)
    assert not list(tmp_path.rglob("*.ckpt*"))


# ------------------------------------------------------------------ the image cache

NOT_WRITTEN = "was not written (No space left on device); training goes on from memory"


@pytest.mark.parametrize(
    "code", [errno.ENOSPC, errno.EACCES, errno.EROFS], ids=["full-disk", "no-permission", "read-only"]
)
def test_a_failed_cache_write_is_a_warning_and_leaves_no_temporary_file(code, tmp_path, monkeypatch, caplog):
    root = tmp_path / "imgs"
    for i in range(3):
        solid(root / f"{i}.png", "RGB", (60 * i, 0, 0))
    cache = tmp_path / "cache"

    def half_then_fail(blob, path):  # a disk that fills up halfway through the file
        with open(path, "wb") as f:
            f.write(b"\x00" * 2048)
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(torch, "save", half_then_fail)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        splits = ImageFolder(str(root), image_size=4, cache_dir=str(cache)).load()
    assert sum(len(s) for s in splits) == 3  # the images came from memory
    assert [p for p in cache.rglob("*") if p.is_file()] == [], "a temporary or partial cache file was left"
    assert f"was not written ({os.strerror(code)}); training goes on from memory" in caplog.text
    if code == errno.ENOSPC:
        assert NOT_WRITTEN in caplog.text
    monkeypatch.undo()  # the next run writes the cache and reads it back
    ImageFolder(str(root), image_size=4, cache_dir=str(cache)).load()
    assert len(list((cache / "image_folder").glob("*.pt"))) == 1


CACHE_IS_A_FILE = "is a file, not a folder; set GENEXP_CACHE=<folder> or paths.cache_dir=<folder>"


@pytest.mark.parametrize("where", ["the-file", "under-the-file"])
def test_genexp_cache_that_is_a_file_names_paths_cache_dir_before_training(where, tmp_path, monkeypatch):
    from conftest import compose_cfg, tiny

    from genexp.commands.train import train

    root = tmp_path / "imgs"
    for i in range(3):
        solid(root / f"{i}.png", "RGB", (60 * i, 0, 0))
    blocker = tmp_path / "cachefile"
    blocker.write_text("not a folder")
    monkeypatch.setenv("GENEXP_CACHE", str(blocker if where == "the-file" else blocker / "genexp"))
    no_data = [o for o in tiny("vae") if not o.startswith("dataset")]
    with pytest.raises(GenexpError) as err:
        train(compose_cfg([*no_data, "dataset=image_folder", f"dataset.root={root}"], tmp_path / "run"))
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"paths.cache_dir={os.environ['GENEXP_CACHE']}: ")
    assert CACHE_IS_A_FILE in text and "paths.log_dir" not in text
    if where == "under-the-file":
        assert f"is under {blocker}, which is a file" in text
    assert not list(tmp_path.rglob("*.ckpt*"))


def test_the_feature_classifier_refuses_a_cache_dir_that_is_a_file(tmp_path):
    from genexp.data.synthetic import Synthetic
    from genexp.metrics.features import classifier_features

    blocker = tmp_path / "cachefile"
    blocker.write_text("not a folder")
    with pytest.raises(GenexpError) as err:
        classifier_features(Synthetic(num_images=40, image_size=8, num_classes=2), blocker, epochs=1)
    assert CACHE_IS_A_FILE in str(err.value) and "\n" not in str(err.value)


def test_only_rank_zero_reports_the_folder(tmp_path, monkeypatch, caplog):
    """Every DDP rank reads the same folder; the counts are logged once (rank 0), kept on every rank."""
    root = tmp_path / "imgs"
    for i in range(3):
        solid(root / f"{i}.png", "RGB", (60 * i, 0, 0))
    (root / "broken.png").write_bytes(b"not a png")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        source = ImageFolder(str(root), image_size=4)
        source.load()
    assert source.skipped["unreadable"] == 1 and caplog.text == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ImageFolder(str(root), image_size=4).load()
    assert "skipped 1 unreadable file(s) of 4 (first: broken.png: UnidentifiedImageError)" in caplog.text
