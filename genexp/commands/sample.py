"""``genexp sample``: images from a trained run, rebuilt from its checkpoint alone.

Writes a PNG grid and the raw samples (``.npz``: uint8 ``images`` (N, C, H, W) plus a JSON
``meta`` string) into ``<run dir>/samples/`` or ``out=``. The same checkpoint, seed, options and
batch size give the same images.
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from genexp import atomic
from genexp.checkpoints import LoadedModel, MissingNode, load_model
from genexp.errors import ConfigError, GenexpError, check_choice, check_float, check_int
from genexp.lit.fid_callback import sample_uint8

log = logging.getLogger("genexp")

DEVICES = ("auto", "cpu", "cuda")
MAX_COUNT = 2**31 - 1  # image counts, batch sizes, grid columns: beyond this torch's sizes overflow
MAX_SEED = 2**32 - 1  # seeds: uint32, what numpy's and Lightning's seeding accept
# the ENOSPC family: the folder is fine, the disk is not
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def resolve_device(value: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``/``cuda:N`` (N a device here)."""
    value = str(value)
    if value != "auto" and not value.startswith("cuda:"):
        _user(lambda: check_choice("device", value, DEVICES))
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise GenexpError(f"device={value}: no CUDA device here; use device=cpu or device=auto")
    index = value.partition(":")[2]
    count = torch.cuda.device_count() if index else 0
    if index and not (index.isdigit() and int(index) < count):
        raise GenexpError(
            f"device={value}: no such CUDA device (this machine has {count}); use device=cuda or "
            f"device=cuda:<0..{count - 1}>"
        )
    return torch.device(value)


def _user(check, fix: str | None = None):
    """Run a ``check_*`` and turn its ConfigError into a GenexpError (the key is already top-level),
    with ``; <fix>`` appended where one is given."""
    try:
        return check()
    except ConfigError as err:
        raise GenexpError(f"{err}; {fix}" if fix else str(err)) from None


def check_count(key: str, value: Any, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    """An integer in ``minimum..maximum`` (a count or size), else one line naming the range."""
    fix = f"pass {key}=<an integer in {minimum}..{maximum}>"
    _user(lambda: check_int(key, value, minimum=minimum), fix)
    if value > maximum:
        raise GenexpError(f"{key}={value!r}: must be <= {maximum}; {fix}")
    return value


def check_seed(value: Any, key: str = "seed") -> int:
    return check_count(key, value, minimum=0, maximum=MAX_SEED)


def check_finite(key: str, value: Any, fix: str, positive: bool = False) -> float:
    """A finite number (>= 0, or > 0 with ``positive``); nan and inf are refused too."""
    number = _user(lambda: check_float(key, value, positive=positive, minimum=None if positive else 0.0), fix)
    if not math.isfinite(number):
        raise GenexpError(f"{key}={value!r}: must be finite; {fix}")
    return number


def writable_folder(
    key: str, folder: Path, value: Any = None, example: str = "<a writable folder>", create: bool = True
) -> Path:
    """``folder``, created if missing (``create``); refused in one line naming ``key`` when it
    cannot be written (checked before any work: a long run must not end in a write error).

    Args:
        value: what the user passed, shown in the message (default: ``folder``).
        example: the fix's value, ``pass <key>=<example>``.
        create: False checks the nearest existing folder above a missing one and creates nothing.
    """
    shown = folder if value is None else value
    where = "" if value is None else f" ({folder})"
    if folder.exists() and not folder.is_dir():
        what = "it" if value is None else str(folder)
        raise GenexpError(f"{key}={shown}: {what} is a file, not a folder; pass {key}={example}")
    existing = folder
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise GenexpError(
            f"{key}={shown}: cannot create the folder{where} ({reason}); pass {key}={example}"
        ) from None
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GenexpError(f"{key}={shown}: the folder{where} is read-only; pass {key}={example}")
    return folder


def write_failed(key: str, path: Path, err: OSError) -> GenexpError:
    """The one line for a write that failed after the checks (a full disk, a folder gone read-only)."""
    reason = err.strerror or type(err).__name__
    fix = (
        f"free space there or pass {key}=<another folder>"
        if err.errno in FULL
        else f"pass {key}=<a writable folder>"
    )
    return GenexpError(f"{key}={path.parent}: cannot write {path.name} ({reason}); {fix}")


def family_name(config: DictConfig) -> str:
    """``genexp.models.vae.VAE`` -> ``vae`` (the model option's name by convention)."""
    return str(config.model.get("_target_", "?")).rsplit(".", 1)[-1].lower()


def run_dir_of_checkpoint(path: Path) -> Path:
    """``<run>/checkpoints/last.ckpt`` -> ``<run>``; a loose .ckpt -> its folder."""
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def load_for_sampling(ckpt: str, sampler: dict | None = None) -> LoadedModel:
    """The model of ``ckpt``; ``sampler`` (a ``sampler/`` node) replaces the run's ``model.sampler``.

    The node replaces the stored one as a whole (another sampler class takes other arguments: DDPM's
    ``variance`` is not DDIM's); the model is built once, with it.
    """
    if sampler is None:
        return load_model(ckpt)
    try:
        return load_model(ckpt, {"model.sampler": sampler})
    except MissingNode as err:
        raise GenexpError(
            f"sampler: {family_name(err.config)} has no sampler to choose (only diffusion families "
            "have a model.sampler); drop the sampler option"
        ) from None


TEMPERATURE_FIX = "pass temperature=<T >= 0> (0: the most likely value, 1: the model's own distribution)"
TRUNCATION_FIX = "pass truncation=<t > 0>, e.g. 1.5, or leave it out for untruncated noise"


def sample_kwargs(model: torch.nn.Module, family: str, temperature: Any, truncation: Any) -> dict:
    """The optional ``sample`` arguments the user set, refused where the family's ``sample`` has none.

    ``temperature=0`` is allowed: the autoregressive families then take the most likely level at
    every step (greedy decoding), the flows the mode z = 0."""
    params = inspect.signature(model.sample).parameters
    kwargs = {}
    for key, value, which in (
        (
            "temperature",
            temperature,
            "flows and autoregressive models: realnvp, glow, pixelcnn, pixel_transformer",
        ),
        ("truncation", truncation, "gan"),
    ):
        if value is None:
            continue
        if key not in params:
            raise GenexpError(f"{key}={value}: {family} sampling takes no {key} (it applies to {which})")
        if key == "temperature":
            kwargs[key] = check_finite(key, value, TEMPERATURE_FIX)
        else:
            kwargs[key] = check_finite(key, value, TRUNCATION_FIX, positive=True)
    return kwargs


def sampler_description(config: DictConfig) -> dict | None:
    """The diffusion sampler in use (class and arguments) for the metadata, or None."""
    node = config.model.get("sampler")
    if node is None:
        return None
    plain = OmegaConf.to_container(node, resolve=True)
    plain = {k: v for k, v in plain.items() if k != "_partial_"}
    plain["name"] = str(plain.pop("_target_", "?")).rsplit(".", 1)[-1]
    return plain


def file_tag(seed: int, n: int, kwargs: dict, sampler: dict | None, chosen: bool) -> str:
    """``seed0_n64`` plus the options that change the images (``_t0.7``, ``_ddimsampler50``)."""
    tag = f"seed{seed}_n{n}"
    if "temperature" in kwargs:
        tag += f"_t{kwargs['temperature']:g}"
    if "truncation" in kwargs:
        tag += f"_trunc{kwargs['truncation']:g}"
    if chosen and sampler:
        steps = sampler.get("steps")
        tag += f"_{sampler['name'].lower().removesuffix('sampler')}" + (f"{steps}" if steps else "")
    return tag


class SampleResult(NamedTuple):
    png: Path
    npz: Path
    num_samples: int
    samples_per_sec: float
    device: str
    description: str  # family, dataset, checkpoint


def file_stem(name: Any) -> str | None:
    """``name=`` as a file stem (no folders: those go in ``out=``), or None for the default."""
    if name is None or name == "":
        return None
    stem = str(name)
    if "/" in stem or os.sep in stem or stem in (".", ".."):
        raise GenexpError(f"name={stem}: must be a file stem, not a path; pass name=<stem> and out=<folder>")
    return stem


def check_options(cfg: DictConfig) -> dict:
    """Every plain key of ``configs/sample.yaml``, checked before the checkpoint is read."""
    if not cfg.get("ckpt"):
        raise GenexpError("ckpt: missing; pass ckpt=<run dir|.ckpt|latest>")
    out = cfg.get("out")
    return {
        "n": check_count("n", cfg.n),
        "batch_size": check_count("batch_size", cfg.batch_size),
        "seed": check_seed(cfg.seed),
        "nrow": None if cfg.get("nrow") is None else check_count("nrow", cfg.nrow),
        "name": file_stem(cfg.get("name")),
        "device": resolve_device(cfg.device),
        "out": writable_folder("out", Path(str(out)).expanduser(), create=False)
        if out not in (None, "")
        else None,
    }


def write_samples(images: torch.Tensor, png: Path, npz: Path, nrow: int, meta: dict) -> None:
    """The grid and the .npz, each atomically; a failed write is one line naming ``out=``."""
    from torchvision.utils import save_image

    path = png
    try:
        with atomic.atomic_path(png) as tmp:
            save_image(images.float().div(255), tmp, nrow=nrow, format="png")
        path = npz
        with atomic.atomic_path(npz) as tmp, open(tmp, "wb") as file:
            np.savez_compressed(file, images=images.numpy(), meta=np.array(json.dumps(meta)))
    except OSError as err:
        raise write_failed("out", path, err) from None


def sample(cfg: DictConfig) -> SampleResult:
    """Run ``genexp sample`` from its composed config (``configs/sample.yaml``)."""
    from genexp.checkpoints import describe

    opts = check_options(cfg)
    n, batch_size, seed, device = opts["n"], opts["batch_size"], opts["seed"], opts["device"]
    chosen = cfg.get("sampler")
    sampler = OmegaConf.to_container(chosen, resolve=False) if chosen else None

    loaded = load_for_sampling(str(cfg.ckpt), sampler)
    family = family_name(loaded.config)
    kwargs = sample_kwargs(loaded.model, family, cfg.get("temperature"), cfg.get("truncation"))
    out = opts["out"] or writable_folder("out", run_dir_of_checkpoint(loaded.path) / "samples")
    model = loaded.model.to(device)
    log.info("sampling %d images from %s on %s", n, describe(loaded), device)

    generator = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    drawn = sample_uint8(model, n, batch_size, generator, progress=True, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if drawn.nonfinite:
        log.warning("%d of %d samples held NaN/inf values (written as 0 there)", drawn.nonfinite, n)

    described = sampler_description(loaded.config)
    stem = opts["name"] or f"sample_{file_tag(seed, n, kwargs, described, bool(chosen))}"
    png, npz = out / f"{stem}.png", out / f"{stem}.npz"
    meta = {
        "checkpoint": str(loaded.path),
        "model": str(loaded.config.model.get("_target_")),
        "dataset": str(loaded.config.get("dataset", {}).get("_target_")),
        "n": n,
        "seed": seed,
        "batch_size": batch_size,
        **kwargs,
        "sampler": described,
        "device": str(device),
        "samples_per_sec": n / seconds,
        "nonfinite_samples": drawn.nonfinite,
        "value_range": "uint8 k = round(255 x), x in [0, 1]",
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_samples(drawn.images, png, npz, opts["nrow"] or math.ceil(math.sqrt(n)), meta)
    return SampleResult(png, npz, n, n / seconds, str(device), describe(loaded))
