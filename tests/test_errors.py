"""The catalogue of bad inputs (``docs/errors.md``): the cases no other test file covers, and a test
that the table and the tests agree.

Every case fails with one line that names the key or path and the fix, and none loses a previous
checkpoint or leaves a half-written one: where a run existed before, its ``checkpoints/`` folder is
compared byte for byte afterwards (no temporary file left either). The messages below are the
single source of truth: ``test_the_catalogue_lists_every_case_and_its_message`` checks that each
row of ``docs/errors.md`` names an existing test and quotes its message verbatim.
"""

from __future__ import annotations

import ast
import errno
import io
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, tiny
from test_cli import genexp
from test_sample_cli import compose_app

from genexp.build import build_model
from genexp.commands.train import train
from genexp.errors import GenexpError

TESTS = Path(__file__).resolve().parent
DOC = TESTS.parent / "docs" / "errors.md"

# node id (relative to tests/) -> the text the test asserts the user sees; the doc must quote it
CATALOGUE: dict[str, str] = {}


def catalogue(test: str, cases: list[tuple]) -> list:
    """Register parametrised cases ``(id, ..., message)`` under ``test`` and return pytest params."""
    for case in cases:
        CATALOGUE[f"test_errors.py::{test}[{case[0]}]"] = case[-1]
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


def checkpoint_files(run: Path) -> dict[str, bytes]:
    """Every file under ``run/checkpoints`` (hidden temporary files included) with its bytes."""
    folder = run / "checkpoints"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def one_line(err: pytest.ExceptionInfo, message: str) -> str:
    text = str(err.value)
    assert message in text, text
    assert "\n" not in text, text
    return text


class _Evil:
    """Unpickling this runs ``touch <path>``: what a crafted checkpoint or cache file would do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> Path:
    """A finished tiny VAE run (latent_dim 4): the run every resume case starts from."""
    run = tmp_path_factory.mktemp("previous") / "run"
    train(compose_cfg(tiny("vae"), run))
    return run


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("gan") / "run"
    train(compose_cfg(tiny("gan"), run))
    return run


@pytest.fixture
def run_copy(previous, tmp_path) -> Path:
    """A private copy of the previous run, so a case that breaks it breaks nothing else."""
    return Path(shutil.copytree(previous, tmp_path / "prev"))


# ------------------------------------------------------------------ config values (in-process)

CONFIG_CASES = [
    # (id, family, overrides, the text of the one-line error)
    ("data.batch_size=abc", "vae", ["data.batch_size=abc"], "data.batch_size='abc': must be an integer"),
    ("trainer.max_epochs=-5", "vae", ["trainer.max_epochs=-5"], "trainer.max_epochs=-5: must be >= -1"),
    ("dataset.channels=2", "vae", ["dataset.channels=2"], "dataset.channels=2: must be one of 1, 3"),
    ("dataset.image_size=0", "vae", ["dataset.image_size=0"], "dataset.image_size=0: must be >= 1"),
    (
        "ddpm-dataset.image_size=30",
        "ddpm",
        ["dataset.image_size=30"],
        "model.net.image_size=30: 3 levels halve the image 2 times, so it must be a multiple of 4",
    ),
    (
        "glow-dataset.image_size=30",
        "glow",
        ["dataset.image_size=30"],
        "model.image_size=30: glow with n_scales=2 squeezes 2 time(s), so image_size must be a multiple of 4",
    ),
    (
        "trainer.max_time=soon",
        "vae",
        ["trainer.max_time=soon"],
        "trainer: `Timer(duration='soon')` is not a valid duration. Expected a string in the format DD:HH:MM:SS.",
    ),
    (
        "model._target_=typo",
        "vae",
        ["model._target_=genexp.models.vae.VEA"],
        "model._target_=genexp.models.vae.VEA: not a configurable target (did you mean genexp.models.vae.VAE?)",
    ),
]


@pytest.mark.parametrize(
    "family, overrides, message", catalogue("test_bad_value_fails_before_training", CONFIG_CASES)
)
def test_bad_value_fails_before_training(family, overrides, message, tmp_path):
    with pytest.raises(GenexpError) as err:
        train(compose_cfg([*tiny(family), *overrides], tmp_path / "run"))
    one_line(err, message)
    assert not list(tmp_path.rglob("*.ckpt*")), "nothing was trained, nothing saved"


GPU_MESSAGE = "trainer.accelerator=gpu: no CUDA GPU is visible here; use accelerator=cpu"
CATALOGUE["test_errors.py::test_gpu_accelerator_without_a_gpu"] = GPU_MESSAGE


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_accelerator_without_a_gpu(tmp_path):
    overrides = [o for o in tiny("vae") if not o.startswith("accelerator")]
    with pytest.raises(GenexpError) as err:
        train(compose_cfg([*overrides, "accelerator=gpu"], tmp_path / "run"))
    one_line(err, GPU_MESSAGE)


MONITOR_MESSAGE = "monitor.metric=val/nope: the run logs no such metric; pick one of val/loss, val/recon"
CATALOGUE["test_errors.py::test_monitor_metric_the_family_does_not_log"] = MONITOR_MESSAGE


def test_monitor_metric_the_family_does_not_log(tmp_path):
    """Only known once the first validation logged its metrics: fails there, before any save."""
    with pytest.raises(GenexpError) as err:
        train(compose_cfg([*tiny("vae"), "monitor.metric=val/nope"], tmp_path / "run"))
    one_line(err, MONITOR_MESSAGE)
    assert not list(tmp_path.rglob("*.ckpt*"))


# ------------------------------------------------------------------ checkpoints (in-process)


def _truncated(run: Path, tmp: Path) -> str:
    last = run / "checkpoints" / "last.ckpt"
    cut = tmp / "cut.ckpt"
    cut.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    return str(cut)


def _empty(run: Path, tmp: Path) -> str:
    (tmp / "empty.ckpt").write_bytes(b"")
    return str(tmp / "empty.ckpt")


def _plain_state_dict(run: Path, tmp: Path) -> str:
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp / "weights.pt")  # another tool's file
    return str(tmp / "weights.pt")


def _evil_config(run: Path, tmp: Path) -> str:
    """A weights-only file (it loads) whose stored config names os.system: the allow-list refuses it."""
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["genexp"]["config"]["model"] = {"_target_": "os.system", "_args_": [f"touch {tmp / 'pwned'}"]}
    torch.save(ckpt, tmp / "crafted.ckpt")
    return str(tmp / "crafted.ckpt")


RESUME_CASES = [
    # (id, family, extra overrides, the checkpoint (a function of the run copy and tmp_path), message)
    (
        "another-shape",
        "vae",
        ["model.latent_dim=8"],
        lambda run, tmp: str(run),
        "its weights do not fit this model (model.encoder.head.weight is (8, 1024) there, (16, 1024) here)",
    ),
    (
        "truncated",
        "vae",
        [],
        _truncated,
        "cannot load it safely as a checkpoint: truncated or not a PyTorch file (RuntimeError: "
        "PytorchStreamReader failed reading zip archive: failed finding central directory)",
    ),
    (
        "empty-file",
        "vae",
        [],
        _empty,
        "cannot load it safely as a checkpoint: truncated or not a PyTorch file (EOFError)",
    ),
    ("not-genexp", "vae", [], _plain_state_dict, "not a genexp checkpoint (no genexp section)"),
]


@pytest.mark.parametrize(
    "family, overrides, make, message", catalogue("test_bad_checkpoint_to_resume_from", RESUME_CASES)
)
def test_bad_checkpoint_to_resume_from(family, overrides, make, message, run_copy, tmp_path):
    before = checkpoint_files(run_copy)
    ckpt = make(run_copy, tmp_path)
    with pytest.raises(GenexpError) as err:
        train(compose_cfg([*tiny(family), *overrides, f"ckpt_path={ckpt}"], run_copy))
    one_line(err, message)
    assert checkpoint_files(run_copy) == before, "the previous checkpoints are untouched"


ANOTHER_FAMILY = "a checkpoint of genexp.models.gan.GAN, but model is genexp.models.vae.VAE"
CATALOGUE["test_errors.py::test_checkpoint_of_another_family"] = ANOTHER_FAMILY


def test_checkpoint_of_another_family(gan_run, tmp_path):
    run = Path(shutil.copytree(gan_run, tmp_path / "gan"))
    before = checkpoint_files(run)
    with pytest.raises(GenexpError) as err:
        train(compose_cfg([*tiny("vae"), f"ckpt_path={run}"], run))
    one_line(err, ANOTHER_FAMILY)
    assert checkpoint_files(run) == before


LDM_GAN = (
    "a GAN checkpoint; latent diffusion needs an AE or VAE run (a family with encode, decode and latent_dim)"
)
CATALOGUE["test_errors.py::test_ldm_with_a_gan_run_as_first_stage"] = LDM_GAN


def test_ldm_with_a_gan_run_as_first_stage(gan_run, tmp_path):
    with pytest.raises(GenexpError) as err:
        build_model(compose_cfg(["model=ldm", "dataset=synthetic", f"model.first_stage={gan_run}"], tmp_path))
    one_line(err, LDM_GAN)


CRAFTED_CONFIG = "model._target_=os.system: not a configurable target; configs construct only the classes"
CATALOGUE["test_errors.py::test_checkpoint_whose_config_names_os_system"] = CRAFTED_CONFIG


def test_checkpoint_whose_config_names_os_system(previous, tmp_path):
    """The weights load (weights_only), but the stored config is instantiated through the allow-list."""
    from genexp.commands.sample import sample

    crafted = _evil_config(previous, tmp_path)
    with pytest.raises(GenexpError) as err:
        sample(compose_app("sample", [f"ckpt={crafted}", f"out={tmp_path / 'out'}"]))
    one_line(err, CRAFTED_CONFIG)
    assert not (tmp_path / "pwned").exists()


MALICIOUS_SAMPLE = "that weights_only=True refuses, so nothing in it was run; use a checkpoint genexp wrote"
CATALOGUE["test_errors.py::test_sample_refuses_a_malicious_checkpoint"] = MALICIOUS_SAMPLE


def test_sample_refuses_a_malicious_checkpoint(tmp_path):
    from genexp.commands.sample import sample

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "genexp": _Evil(tmp_path / "pwned")}, evil)
    with pytest.raises(GenexpError) as err:
        sample(compose_app("sample", [f"ckpt={evil}", f"out={tmp_path / 'out'}"]))
    one_line(err, "(posix.system) " + MALICIOUS_SAMPLE)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


INCEPTION_EVIL = "not a weights-only PyTorch file (UnpicklingError); features=inception needs"
CATALOGUE["test_errors.py::test_malicious_inception_weights_are_refused_before_torch_fidelity"] = (
    INCEPTION_EVIL
)


def test_malicious_inception_weights_are_refused_before_torch_fidelity(tmp_path, monkeypatch):
    """torch-fidelity loads the weights file with ``weights_only=False``; genexp loads it safely first."""
    import importlib.util

    from genexp.metrics.features import inception_features

    find_spec = importlib.util.find_spec  # torch-fidelity may be absent here: pretend it is installed
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "torch_fidelity" else find_spec(name, *a),
    )
    evil = tmp_path / "inception.pth"
    torch.save({"weights": _Evil(tmp_path / "pwned")}, evil)
    with pytest.raises(GenexpError) as err:
        inception_features(evil)
    assert one_line(err, INCEPTION_EVIL).startswith(f"eval.inception_weights={evil}: ")
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------ allow-list


BYPASS = "callbacks.evil._target_=genexp.cli.os.system: not a configurable target; configs construct only"
CATALOGUE["test_errors.py::test_allow_list_checks_what_a_target_resolves_to"] = BYPASS


def test_allow_list_checks_what_a_target_resolves_to(tmp_path):
    """``genexp.cli.os.system`` starts with ``genexp.`` but is os.system: refused before anything runs."""
    marker = tmp_path / "pwned"
    evil = ["++callbacks.evil._target_=genexp.cli.os.system", f"++callbacks.evil._args_=['touch {marker}']"]
    with pytest.raises(GenexpError) as err:
        train(compose_cfg([*tiny("vae"), *evil], tmp_path / "run"))
    one_line(err, BYPASS)
    loader = [
        "++callbacks.evil._target_=genexp.commands.train.torch.load",
        f"++callbacks.evil._args_=['{marker}']",
    ]
    with pytest.raises(GenexpError, match=r"genexp\.commands\.train\.torch\.load: not a configurable target"):
        train(compose_cfg([*tiny("vae"), *loader], tmp_path / "run"))
    assert not marker.exists() and not list(tmp_path.rglob("*.ckpt"))


SEARCHPATH = "genexp: error: model._target_=subprocess.run: not a configurable target; configs construct only"
CATALOGUE["test_errors.py::test_user_config_group_with_a_foreign_target_is_refused"] = SEARCHPATH


def test_user_config_group_with_a_foreign_target_is_refused(tmp_path):
    """A config group added through ``hydra.searchpath`` goes through the same allow-list (CLI)."""
    marker = tmp_path / "pwned"
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "evil.yaml").write_text(
        "# @package _global_\nmodel:\n  _target_: subprocess.run\n"
        f"  args: [touch, {marker}]\nmonitor:\n  metric: val/loss\n  mode: min\n"
    )
    out = genexp(
        "train",
        f"hydra.searchpath=[file://{tmp_path / 'mine'}]",
        "model=evil",
        "dataset=synthetic",
        "logger=none",
        cwd=tmp_path,
    )
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
    assert SEARCHPATH in out.stderr
    assert not marker.exists() and not list(tmp_path.rglob("*.ckpt"))


# ------------------------------------------------------------------ cached files (in-process)

CACHE_REBUILT = "is unusable (UnpicklingError); decoding the images again"
CATALOGUE["test_errors.py::test_malicious_or_corrupt_caches_are_rebuilt_without_running_code"] = CACHE_REBUILT


def test_malicious_or_corrupt_caches_are_rebuilt_without_running_code(tmp_path, caplog):
    """Decoded image folders, the feature classifier and real FID statistics live under
    ``$GENEXP_CACHE``; a file there that would run code is refused by ``weights_only=True``, logged,
    and rebuilt, never run."""
    import logging

    from PIL import Image

    from genexp.data.image_folder import ImageFolder
    from genexp.data.synthetic import Synthetic
    from genexp.metrics.features import classifier_features
    from genexp.metrics.fidelity import real_statistics

    caplog.set_level(logging.WARNING)
    marker = tmp_path / "pwned"
    cache = tmp_path / "cache"
    for i in range(4):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        Image.new("RGB", (12, 12), (60 * i, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    folder = ImageFolder(str(tmp_path / "imgs"), image_size=8, cache_dir=str(cache))
    expected = folder.load().train.images.clone()
    source = Synthetic(num_images=40, image_size=8, num_classes=2)
    extractor, info = classifier_features(source, cache, epochs=1)
    stats_path = cache / "fid_stats" / "real.pt"
    real = real_statistics(source.load().test.images, extractor, stats_path, reference="test")
    cached = [*(cache / "image_folder").glob("*.pt"), Path(info["cache"]), stats_path]
    assert len(cached) == 3 and all(p.is_file() for p in cached)

    for how in ("malicious", "corrupt"):
        for path in cached:
            if how == "malicious":
                with path.open("wb") as f:
                    pickle.dump({"images": _Evil(marker), "key": _Evil(marker)}, f)
            else:
                path.write_bytes(path.read_bytes()[:100])
        caplog.clear()
        assert torch.equal(
            ImageFolder(str(tmp_path / "imgs"), 8, cache_dir=str(cache)).load().train.images, expected
        )
        again, info = classifier_features(source, cache, epochs=1)
        assert info["trained"] is True, "an unusable classifier cache is retrained"
        stats = real_statistics(source.load().test.images, again, stats_path, reference="test")
        assert not stats.from_cache and torch.allclose(stats.features, real.features, atol=1e-4)
        assert not marker.exists(), f"a {how} cache file ran code"
        for path in cached:  # rewritten: weights-only again
            torch.load(path, weights_only=True)
        warnings = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
        assert len(warnings) == 3, warnings
        if how == "malicious":
            assert any(CACHE_REBUILT in w for w in warnings), warnings


# ------------------------------------------------------------------ data folders (in-process)

DATA_CASES = [
    # (id, what the folder holds, message)
    ("non-image-files", {"notes.txt": b"hello", "table.csv": b"a,b\n1,2\n"}, "no images found (.png, .jpg"),
    (
        "only-corrupt-images",
        {"a.png": b"not a png", "b.jpg": b"\xff\xd8 truncated", "c.png": b""},
        "none of the 3 image files could be read",
    ),
]


@pytest.mark.parametrize("files, message", catalogue("test_image_folder_without_usable_images", DATA_CASES))
def test_image_folder_without_usable_images(files, message, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    no_data = [o for o in tiny("vae") if not o.startswith("dataset")]
    with pytest.raises(GenexpError) as err:
        train(compose_cfg([*no_data, "dataset=image_folder", f"dataset.root={root}"], tmp_path / "run"))
    assert f"dataset.root={root}: " in one_line(err, message)
    assert not list(tmp_path.rglob("*.ckpt*"))


NO_ROOT = "dataset.root=???: a required value; pass dataset.root=<value>"
CATALOGUE["test_errors.py::test_image_folder_without_a_root"] = NO_ROOT


def test_image_folder_without_a_root(tmp_path):
    no_data = [o for o in tiny("vae") if not o.startswith("dataset")]
    with pytest.raises(GenexpError) as err:
        train(compose_cfg([*no_data, "dataset=image_folder"], tmp_path / "run"))
    one_line(err, NO_ROOT)


# ------------------------------------------------------------------ the machine (in-process)


def _oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


OOM = "out of GPU memory with data.batch_size=16: try data.batch_size=8 (or trainer.precision=bf16-mixed"
CATALOGUE["test_errors.py::test_out_of_gpu_memory_suggests_a_smaller_batch"] = OOM


def test_out_of_gpu_memory_suggests_a_smaller_batch(run_copy, monkeypatch):
    from genexp.models.vae import VAE

    before = checkpoint_files(run_copy)
    monkeypatch.setattr(VAE, "loss", _oom)
    with pytest.raises(GenexpError) as err:
        train(compose_cfg([*tiny("vae"), "trainer.max_epochs=2", f"ckpt_path={run_copy}"], run_copy))
    one_line(err, OOM)
    assert checkpoint_files(run_copy) == before


def _save_on_a_full_disk(real_save):
    """``torch.save`` that writes half of the file, then fails as a full disk does."""

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        half = buffer.getvalue()[: buffer.tell() // 2]
        if isinstance(f, str | os.PathLike):
            Path(f).write_bytes(half)
        else:
            f.write(half)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


DISK_FULL = "No space left on device"
FILE_TOO_LARGE = "File too large"
DISK_CASES = [("enospc", DISK_FULL), ("file-size-limit", FILE_TOO_LARGE)]


@pytest.mark.parametrize(
    "message", catalogue("test_full_disk_while_saving_keeps_the_last_checkpoint", DISK_CASES)
)
def test_full_disk_while_saving_keeps_the_last_checkpoint(message, run_copy, monkeypatch, request):
    """A resumed run whose next checkpoint write fails half-way: one line, the previous
    ``last.ckpt``/``best.ckpt`` byte-identical, no temporary file left behind. ``enospc`` fakes the
    failure in ``torch.save``; ``file-size-limit`` makes the kernel refuse the write (RLIMIT_FSIZE)."""
    before = checkpoint_files(run_copy)
    cfg = compose_cfg([*tiny("vae"), "trainer.max_epochs=2", f"ckpt_path={run_copy}"], run_copy)
    if request.node.callspec.id == "enospc":
        monkeypatch.setattr(torch, "save", _save_on_a_full_disk(torch.save))
        with pytest.raises(GenexpError) as err:
            train(cfg)
    else:
        resource = pytest.importorskip("resource")
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before["last.ckpt"]) // 2, hard))
        try:
            with pytest.raises(GenexpError) as err:
                train(cfg)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    text = one_line(err, message)
    assert "paths.log_dir=<folder>" in text
    assert checkpoint_files(run_copy) == before, "the previous checkpoints are whole, nothing half-written"


NOT_A_DIR = "cannot write there (Not a directory); pick a writable folder with paths.log_dir=<folder>"
READ_ONLY = "cannot write there (permission denied); pick a writable folder with paths.log_dir=<folder>"
UNWRITABLE_CASES = [("under-a-file", NOT_A_DIR), ("read-only-dir", READ_ONLY)]


@pytest.mark.parametrize("message", catalogue("test_unwritable_output_dir", UNWRITABLE_CASES))
def test_unwritable_output_dir(message, tmp_path, request):
    if request.node.callspec.id == "under-a-file":
        (tmp_path / "a_file").write_text("")
        out = tmp_path / "a_file" / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes through chmod 0500; the under-a-file case covers root")
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro"
    with pytest.raises(GenexpError) as err:
        train(compose_cfg(tiny("vae"), out))
    assert f"paths.output_dir={out}: " in one_line(err, message)


WANDB_OFFLINE = "wandb: offline run saved; upload it with: wandb sync"
CATALOGUE["test_errors.py::test_wandb_unreachable_goes_offline_within_seconds"] = WANDB_OFFLINE


def test_wandb_unreachable_goes_offline_within_seconds(tiny_cfg, tmp_path, monkeypatch, caplog):
    """A wandb login with no reachable server: a closed port is refused at once, a black-hole
    address costs the 2 s probe; the run logs offline, and never blocks on the network."""
    import logging

    from genexp.lit import loggers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    assert loggers.wandb_mode() == "offline"
    assert time.monotonic() - start < 2

    probed = []

    def black_hole(address, timeout=None):  # a server that never answers: wait out the timeout
        probed.append((address, timeout))
        time.sleep(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(loggers.socket, "create_connection", black_hole)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org:8443")
    start = time.monotonic()
    assert loggers.wandb_mode() == "offline"
    assert time.monotonic() - start < 5 and probed == [(("wandb.example.org", 8443), 2.0)]

    caplog.set_level(logging.INFO, logger="genexp")
    start = time.monotonic()
    train(tiny_cfg("logger=wandb", "logger.name=offline"))
    assert time.monotonic() - start < 60
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1
    assert any(WANDB_OFFLINE in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ the command line (subprocesses)

CLI_CASES = [
    # (id, arguments, the whole stderr line)
    (
        "unknown-option",
        ["model=gan_typo"],
        "genexp: error: Could not find 'model/gan_typo'; model options: ae, ddpm, flow_matching, gan, glow, ldm, "
        "ncsn, pixel_transformer, pixelcnn, realnvp, score_sde, vae",
    ),
    (
        "unknown-experiment",
        ["experiment=vae_mnist"],
        "genexp: error: Could not find 'experiment/vae_mnist'; experiment options: ae_mnist5k,",
    ),
    (
        "misspelled-key",
        ["optimizer.lrr=1"],
        "genexp: error: Could not override 'optimizer.lrr': Key 'lrr' is not in struct; did you mean "
        "optimizer.lr? (optimizer has: lr, betas, weight_decay; +optimizer.lrr=1 adds a new key)",
    ),
    (
        "key-of-another-family",
        ["model.net.base_channels=8"],
        "genexp: error: Could not override 'model.net.base_channels': Key 'net' is not in struct (model has: "
        "image_size, channels, latent_dim",
    ),
    (
        "renamed-key",
        ["model=gan", "model.d_optimizer.lr=4e-4"],
        "genexp: error: Could not override 'model.d_optimizer.lr': Key 'd_optimizer' is not in struct; "
        "model.d_optimizer is now module.optimizers.discriminator: pass module.optimizers.discriminator.lr=...",
    ),
    (
        "override-syntax",
        ["model.latent_dim=[1,"],
        "genexp: error: model.latent_dim=[1,: no viable alternative at input '[1,' (see genexp train --help "
        "for the syntax)",
    ),
    (
        "run-dir-under-a-file",
        ["hydra.run.dir={tmp}/a_file/run"],
        "/a_file/run: Not a directory; pick a writable folder with paths.log_dir=<folder> or hydra.run.dir=<folder>",
    ),
]


@pytest.mark.parametrize("args, message", catalogue("test_cli_reports_one_line", CLI_CASES))
def test_cli_reports_one_line(args, message, tmp_path):
    """Hydra's own errors (composition, the run dir) reach the user as genexp's one line, exit 2."""
    (tmp_path / "a_file").write_text("")
    out = genexp("train", *[a.format(tmp=tmp_path) for a in args], "logger=none", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("genexp: error: "), out.stderr
    assert message in out.stderr.replace(str(tmp_path), ""), out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"], "no run dir left behind"


SAME_SECOND = "/<timestamp>_1"
CATALOGUE["test_errors.py::test_two_runs_started_in_the_same_second_get_distinct_dirs"] = SAME_SECOND


def test_two_runs_started_in_the_same_second_get_distinct_dirs(tmp_path):
    """Both start just after a second turns, with the default run dir (``outputs/<model>-<data>/<time>``)."""
    time.sleep(1 - time.time() % 1)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    args = [sys.executable, "-m", "genexp.cli", "train", *tiny("ae"), "trainer.limit_train_batches=1"]
    procs = [
        subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    runs = sorted((tmp_path / "outputs" / "ae-synthetic").iterdir())
    assert len(runs) == 2, runs
    for run in runs:
        assert (run / "metrics.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / ".hydra" / "config.yaml").is_file()
    if runs[0].name[:19] == runs[1].name[:19]:  # they did start in the same second
        assert runs[1].name == runs[0].name + "_1"


# ------------------------------------------------------------------ the catalogue itself


def _rows() -> list[list[str]]:
    """The table rows of docs/errors.md (cells split on unescaped ``|``)."""
    rows = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| #") or set(line) <= set("|- :"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append(cells)
    return rows


def _code(cell: str) -> str:
    """The text inside a cell's code span (``x`` or ```` `` x `` ````)."""
    found = re.fullmatch(r"(`+)\s?(.*?)\s?\1", cell)
    return found.group(2) if found else cell


def _literals(path: Path, function: str) -> list[str]:
    """String literals of one test (its body, decorators and the module-level tables it names),
    regex escapes undone (``r"a\\.b"`` -> ``a.b``) and split at ``.*``."""
    tree = ast.parse(path.read_text())
    test = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)}
    tables = [
        n
        for n in tree.body
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in n.targets)
    ]
    out = []
    for node in (n for part in (test, *tables) for n in ast.walk(part)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out += re.sub(r"\\(.)", r"\1", node.value).split(".*")  # a regex's wildcard splits it
    return out


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_the_catalogue_lists_every_case_and_its_message():
    """Each row names a test that exists; this file's cases are quoted verbatim; the others' rows
    quote a text their test asserts; every case here has a row; at least 25 rows."""
    rows = _rows()
    assert len(rows) >= 25
    listed = {}
    for cells in rows:
        assert len(cells) == 6, cells  # #, category, what the user did, what they see, test, checkpoints
        message, test = _code(cells[3]), _code(cells[4])
        assert message, cells
        file, _, node = test.partition("::")
        path = TESTS.parent / file
        assert path.is_file() and file.startswith("tests/"), test
        function, _, param = node.partition("[")
        assert function in _functions(path), f"{test}: no such test"
        key = f"{path.name}::{node}"
        listed[key] = message
        if path.name == "test_errors.py":
            assert key in CATALOGUE, f"{test}: not a case of this file"
            assert CATALOGUE[key] in message, f"{test}: the doc must quote {CATALOGUE[key]!r}"
        else:
            text = message.removeprefix("genexp: error: ")
            asserted = [s for s in _literals(path, function) if len(s) >= 12 and s in text]
            assert asserted, f"{test}: the quoted text is not what that test asserts"
            if param:
                assert param.rstrip("]") in path.read_text(), f"{test}: no such case"
    missing = sorted(set(CATALOGUE) - set(listed))
    assert not missing, f"cases without a row in docs/errors.md: {missing}"
