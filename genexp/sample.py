"""``genexp sample``: images from a trained run, rebuilt from its checkpoint alone.

Writes a PNG grid and the raw samples (``.npz``: uint8 ``images`` (N, C, H, W) plus a JSON
``meta`` string) into ``<run dir>/samples/`` or ``out=``. The same checkpoint, seed, options and
batch size give the same images.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from genexp.checkpoints import LoadedModel, MissingNode, load_model
from genexp.errors import ConfigError, GenexpError, check_choice, check_float, check_int
from genexp.lit.fid_callback import sample_uint8

log = logging.getLogger("genexp")

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(value: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``/``cuda:N``."""
    value = str(value)
    if value != "auto" and not value.startswith("cuda:"):
        _user(lambda: check_choice("device", value, DEVICES))
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise GenexpError(f"device={value}: no CUDA device here; use device=cpu or device=auto")
    return torch.device(value)


def _user(check):
    """Run a ``check_*`` and turn its ConfigError into a GenexpError (the key is already top-level)."""
    try:
        return check()
    except ConfigError as err:
        raise GenexpError(str(err)) from None


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


def sample_kwargs(model: torch.nn.Module, family: str, temperature: Any, truncation: Any) -> dict:
    """The optional ``sample`` arguments the user set, refused where the family's ``sample`` has none."""
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
        kwargs[key] = _user(lambda k=key, v=value: check_float(k, v, positive=True))
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


def sample(cfg: DictConfig) -> SampleResult:
    """Run ``genexp sample`` from its composed config (``configs/sample.yaml``)."""
    from torchvision.utils import save_image

    from genexp.checkpoints import describe

    if not cfg.get("ckpt"):
        raise GenexpError("ckpt: missing; pass ckpt=<run dir|.ckpt|latest>")
    n = _user(lambda: check_int("n", cfg.n, minimum=1))
    batch_size = _user(lambda: check_int("batch_size", cfg.batch_size, minimum=1))
    seed = _user(lambda: check_int("seed", cfg.seed, minimum=0))
    device = resolve_device(cfg.device)
    chosen = cfg.get("sampler")
    sampler = OmegaConf.to_container(chosen, resolve=False) if chosen else None

    loaded = load_for_sampling(str(cfg.ckpt), sampler)
    family = family_name(loaded.config)
    kwargs = sample_kwargs(loaded.model, family, cfg.get("temperature"), cfg.get("truncation"))
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

    out = Path(cfg.out).expanduser() if cfg.get("out") else run_dir_of_checkpoint(loaded.path) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    described = sampler_description(loaded.config)
    stem = cfg.get("name") or f"sample_{file_tag(seed, n, kwargs, described, bool(chosen))}"
    png, npz = out / f"{stem}.png", out / f"{stem}.npz"
    nrow = int(cfg.get("nrow") or math.ceil(math.sqrt(n)))
    save_image(drawn.images.float().div(255), png, nrow=nrow)
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
    np.savez_compressed(npz, images=drawn.images.numpy(), meta=np.array(json.dumps(meta)))
    return SampleResult(png, npz, n, n / seconds, str(device), describe(loaded))
