"""``genexp sample``: images from a trained run, rebuilt from its checkpoint alone.

Writes a PNG grid and the raw samples (``.npz``: uint8 ``images`` (N, C, H, W) plus a JSON
``meta`` string) into ``<run dir>/samples/`` or ``out=``. The same checkpoint, seed, options and
batch size give the same images.
"""

from __future__ import annotations

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

from genexp import atomic, layout, progress
from genexp.checkpoints import describe
from genexp.checks import check_count, check_seed, writable_folder, write_failed
from genexp.errors import GenexpError
from genexp.metrics.sampling import sample_uint8
from genexp.sampling import (
    load_for_sampling,
    output_dir,
    resolve_device,
    sample_kwargs,
    sampler_description,
)

log = logging.getLogger("genexp")


def file_tag(seed: int, n: int, kwargs: dict, sampler: dict | None, chosen: bool) -> str:
    """``seed0_n64`` plus the options that change the images (``_t0.7``, ``_ddim50``, ``_heun8``)."""
    tag = f"seed{seed}_n{n}"
    if "temperature" in kwargs:
        tag += f"_t{kwargs['temperature']:g}"
    if "truncation" in kwargs:
        tag += f"_trunc{kwargs['truncation']:g}"
    if chosen and sampler:
        steps = sampler.get("steps") or sampler.get("steps_per_scale")  # Langevin: T per sigma level
        tag += f"_{sampler['name'].lower().removesuffix('sampler').removesuffix('solver')}"
        tag += f"{steps}" if steps else (f"_rtol{sampler['rtol']:g}" if "rtol" in sampler else "")
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


def run(cfg: DictConfig) -> SampleResult:
    """Run ``genexp sample`` from its composed config (``configs/sample.yaml``)."""
    opts = check_options(cfg)
    n, batch_size, seed, device = opts["n"], opts["batch_size"], opts["seed"], opts["device"]
    chosen, chosen_solver = cfg.get("sampler"), cfg.get("solver")
    sampler = OmegaConf.to_container(chosen, resolve=False) if chosen else None
    solver = OmegaConf.to_container(chosen_solver, resolve=False) if chosen_solver else None

    loaded = load_for_sampling(str(cfg.ckpt), sampler, solver)
    kwargs = sample_kwargs(loaded, cfg.get("temperature"), cfg.get("truncation"))
    out = opts["out"] or writable_folder("out", output_dir(loaded.path) / layout.SAMPLES)
    model = loaded.model.to(device)
    log.info("sampling %d images from %s on %s", n, describe(loaded), device)

    generator = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    with progress.reporting(progress.auto()):
        drawn = sample_uint8(model, n, batch_size, generator, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if drawn.nonfinite:
        log.warning("%d of %d samples held NaN/inf values (written as 0 there)", drawn.nonfinite, n)

    described = sampler_description(loaded.config, loaded.model)
    stem = opts["name"] or f"sample_{file_tag(seed, n, kwargs, described, bool(chosen or chosen_solver))}"
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


sample = run  # the name tests and scripts call
