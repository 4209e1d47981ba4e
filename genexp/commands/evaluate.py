"""``genexp evaluate``: FID/KID/precision-recall, bits/dim, reconstruction and speed of a trained run.

The run's own dataset (rebuilt from the config stored in the checkpoint) gives the real images; the
reference split (default ``test``), the number of samples and real images, and the feature
extractor are recorded beside every number, since FID depends on all of them. Results go to
``<run dir>/evaluation.json`` and into the run's ``metrics.json`` under ``"eval"``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from genexp import atomic
from genexp.errors import GenexpError, check_choice
from genexp.lit.fid_callback import SPLITS, feature_extractor, sample_uint8
from genexp.commands.sample import (
    _user,
    check_count,
    check_seed,
    family_name,
    load_for_sampling,
    resolve_device,
    run_dir_of_checkpoint,
    sample_kwargs,
    sampler_description,
    writable_folder,
    write_failed,
)

log = logging.getLogger("genexp")

METRICS = ("fid", "kid", "pr", "bpd", "recon", "speed")
FIDELITY = ("fid", "kid", "pr")
NA = "n/a"  # a metric the family cannot have (bpd of a GAN, recon of a flow)
# settings recorded beside the numbers (left out of the one-line summary)
PROVENANCE_KEYS = (
    "kid_subset_size",
    "kid_subsets",
    "precision_recall_k",
    "speed_batch_size",
    "speed_device",
    "bpd_num_images",
)
DIVERSITY_IMAGES = 500  # images per side for the pixel-space diversity ratio (a collapse signal)


@dataclass
class EvalSettings:
    """What an evaluation depends on; stored in ``evaluation.json`` (and compared by ``genexp compare``
    to skip runs already evaluated the same way)."""

    metrics: tuple[str, ...] = METRICS
    num_samples: int = 10000  # generated images for fid/kid/pr
    num_real: int | None = None  # real images of the reference split (None: all)
    reference: str = "test"  # the real split: train | val | test
    batch_size: int = 250
    kid_subset_size: int = 1000
    features: str = "classifier"  # classifier | inception
    inception_weights: str | None = None
    classifier_epochs: int = 5
    speed_batch_size: int = 64
    speed_repeats: int = 3
    seed: int = 0
    device: str = "auto"
    sampler: dict | None = None  # a sampler/ node replacing the run's model.sampler (diffusion)
    temperature: float | None = None
    truncation: float | None = None
    cache_dir: str = field(default_factory=lambda: str(Path("~/.cache/genexp").expanduser()))

    def check(self) -> EvalSettings:
        metrics = [self.metrics] if isinstance(self.metrics, str) else self.metrics
        if not isinstance(metrics, list | tuple) and not OmegaConf.is_list(metrics):
            raise GenexpError(
                f"metrics={self.metrics!r}: must be a list of {', '.join(METRICS)}; pass metrics='[fid,bpd]'"
            )
        metrics = list(metrics)
        for name in metrics:
            _user(lambda n=name: check_choice("metrics", n, METRICS))
        if not metrics:
            raise GenexpError(f"metrics=[]: name at least one of {', '.join(METRICS)}")
        self.metrics = tuple(dict.fromkeys(metrics))
        check_count("eval.num_samples", self.num_samples, minimum=4)
        if self.num_real is not None:
            check_count("eval.num_real", self.num_real, minimum=4)
        _user(lambda: check_choice("eval.reference", self.reference, SPLITS))
        check_count("eval.batch_size", self.batch_size)
        check_count("eval.kid_subset_size", self.kid_subset_size, minimum=2)
        _user(lambda: check_choice("features", self.features, ("classifier", "inception")))
        check_count("eval.classifier_epochs", self.classifier_epochs)
        check_count("eval.speed_batch_size", self.speed_batch_size)
        check_count("eval.speed_repeats", self.speed_repeats)
        check_seed(self.seed)
        if not self.cache_dir:
            raise GenexpError("cache_dir='': empty; pass cache_dir=<a folder> or set GENEXP_CACHE=<a folder>")
        return self

    def fingerprint(self) -> dict:
        """The settings that change the numbers (not the device or the cache folder)."""
        out = asdict(self)
        for key in ("device", "cache_dir"):
            out.pop(key)
        out["metrics"] = sorted(out["metrics"])
        return json.loads(json.dumps(out))


def settings_from_config(cfg: DictConfig) -> EvalSettings:
    """``configs/evaluate.yaml`` (or compare's ``eval`` node plus top-level keys) -> settings."""
    ev = cfg.get("eval") or {}
    chosen = cfg.get("sampler")
    return EvalSettings(
        metrics=tuple(OmegaConf.to_container(cfg.metrics)) if OmegaConf.is_list(cfg.metrics) else cfg.metrics,
        num_samples=ev.get("num_samples", 10000),
        num_real=ev.get("num_real"),
        reference=ev.get("reference", "test"),
        batch_size=ev.get("batch_size", 250),
        kid_subset_size=ev.get("kid_subset_size", 1000),
        features=cfg.get("features", "classifier"),
        inception_weights=ev.get("inception_weights"),
        classifier_epochs=ev.get("classifier_epochs", 5),
        speed_batch_size=ev.get("speed_batch_size", 64),
        speed_repeats=ev.get("speed_repeats", 3),
        seed=cfg.get("seed", 0),
        device=str(cfg.get("device", "auto")),
        sampler=OmegaConf.to_container(chosen, resolve=False) if chosen else None,
        temperature=cfg.get("temperature"),
        truncation=cfg.get("truncation"),
        cache_dir=str(Path(str(cfg.get("cache_dir") or "~/.cache/genexp")).expanduser()),
    ).check()


def json_safe(value: Any) -> Any:
    """Tensors and numpy scalars -> Python numbers; NaN/inf -> strings (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _checkpoint_progress(path: Path) -> dict:
    """global_step, epoch and wandb run id of a checkpoint (memory-mapped: the weights are not read)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        meta = ckpt.get("genexp") or {}
        return {
            "global_step": ckpt.get("global_step"),
            "epoch": ckpt.get("epoch"),
            "wandb_id": meta.get("wandb_id"),
        }
    except Exception:  # an older, non-zip checkpoint; the numbers are provenance only
        return {}


def log_to_run_logger(
    config: DictConfig, run_dir: Path, metrics: dict, step: int | None, wandb_id: str | None
) -> str | None:
    """Send the numeric results to the logger the run trained with (wandb: the same run, resumed;
    csv: appended to its metrics.csv; tensorboard: its log dir), at the checkpoint's step."""
    from genexp.lit.loggers import finish_wandb
    from genexp.commands.train import build_logger

    if not config.get("logger"):
        return None
    numeric = {
        k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    if not numeric:
        return None
    logger = build_logger(config, run_dir, wandb_id)
    try:
        logger.log_metrics(numeric, step=int(step or 0))
        logger.save()
    finally:
        if type(logger).__name__ == "WandbLogger":
            finish_wandb(logger)
        else:
            logger.finalize("success")
    return type(logger).__name__


@torch.no_grad()
def mean_bpd(model, images: torch.Tensor, batch_size: int, device: torch.device, seed: int) -> float:
    """Mean bits/dim of uint8 images under the family's ``nll_bpd`` (exact or a bound)."""
    takes_generator = "generator" in inspect.signature(model.nll_bpd).parameters
    generator = torch.Generator(device=device).manual_seed(seed)
    total, count = 0.0, 0
    # families that draw their noise from the global generator (VAE's z, DDPM's t) get it seeded too
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for part in images.split(batch_size):
            x = part.to(device).float().div_(255.0)
            bpd = model.nll_bpd(x, generator=generator) if takes_generator else model.nll_bpd(x)
            total += float(bpd.double().sum())
            count += len(part)
    return total / max(count, 1)


@torch.no_grad()
def reconstruction(model, images: torch.Tensor, batch_size: int, device: torch.device) -> dict:
    from genexp.metrics.recon import reconstruction_metrics

    xs, x_hats = [], []
    for part in images.split(batch_size):
        x = part.to(device).float().div_(255.0)
        xs.append(x.cpu())
        x_hats.append(model.reconstruct(x).float().clamp(0, 1).cpu())
    return dict(reconstruction_metrics(torch.cat(xs), torch.cat(x_hats)))


@torch.no_grad()
def sampling_speed(
    model, batch_size: int, repeats: int, device: torch.device, kwargs: dict, seed: int
) -> dict:
    """Samples/s and ms/sample at ``batch_size``, after one warm-up batch (allocations, cuDNN autotune)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    model.sample(batch_size, generator=generator, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        model.sample(batch_size, generator=generator, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    n = batch_size * repeats
    return {
        "samples_per_sec": n / seconds,
        "ms_per_sample": 1000 * seconds / n,
        "speed_batch_size": batch_size,
        "speed_device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def evaluate_checkpoint(ckpt: str, settings: EvalSettings, out: str | Path | None = None) -> dict:
    """Evaluate ``ckpt`` (a run dir, .ckpt or ``latest``); write and return the evaluation dict:
    ``{"metrics": {"eval/<name>": ...}, "provenance": {...}, "settings": {...}}``."""
    from genexp.metrics.diversity import diversity_ratio
    from genexp.commands.train import instantiate

    settings.check()
    start = time.perf_counter()
    device = resolve_device(settings.device)
    wanted = set(settings.metrics)
    target = evaluation_file(out)
    if wanted & set(FIDELITY):  # the feature classifier and the real statistics are cached there
        writable_folder(
            "cache_dir",
            Path(settings.cache_dir),
            example="<a writable folder> (or set GENEXP_CACHE)",
            create=False,
        )
    extractor = None
    if settings.features == "inception" and wanted & set(FIDELITY):  # a missing weights file fails first
        extractor, info = feature_extractor(
            "inception",
            None,
            Path(settings.cache_dir),
            str(device),
            inception_weights=settings.inception_weights,
        )
    loaded = load_for_sampling(ckpt, settings.sampler)
    family = family_name(loaded.config)
    kwargs = sample_kwargs(loaded.model, family, settings.temperature, settings.truncation)
    path = target or evaluation_file(run_dir_of_checkpoint(loaded.path) / "evaluation.json")
    model = loaded.model.to(device)
    if "dataset" not in loaded.config:
        raise GenexpError(f"ckpt={ckpt}: the checkpoint's config has no dataset to evaluate against")
    source = instantiate(loaded.config.dataset, "dataset")
    real = getattr(source.load(), settings.reference).images
    if settings.num_real is not None:
        real = real[: settings.num_real]
    reference = f"{source.name}/{settings.reference}"
    log.info("evaluating %s (%s) on %s against %s", family, loaded.path, device, reference)
    cache_dir = Path(settings.cache_dir)
    results: dict[str, Any] = {}
    provenance: dict[str, Any] = {}

    if wanted & set(FIDELITY):
        from genexp.metrics.fidelity import evaluate_fidelity

        if extractor is None:
            extractor, info = feature_extractor(
                settings.features,
                source,
                cache_dir,
                str(device),
                classifier_epochs=settings.classifier_epochs,
                seed=settings.seed,
            )
        provenance["feature_extractor"] = info
        generator = torch.Generator(device=device).manual_seed(settings.seed)
        fake = sample_uint8(
            model, settings.num_samples, settings.batch_size, generator, progress=True, **kwargs
        )
        fidelity = evaluate_fidelity(
            real,
            fake.images,
            extractor,
            reference=reference,
            kid_subset_size=settings.kid_subset_size,
            batch_size=settings.batch_size,
            cache_dir=cache_dir,
            seed=settings.seed,
        )
        keep = {k for k in fidelity if k.startswith("fid_")}  # provenance: counts, reference, features
        keep |= {"fid"} if "fid" in wanted else set()
        keep |= {"kid_mean", "kid_std", "kid_subset_size", "kid_subsets"} if "kid" in wanted else set()
        keep |= {"precision", "recall", "precision_recall_k"} if "pr" in wanted else set()
        results.update({k: v for k, v in fidelity.items() if k in keep})
        results["nonfinite_samples"] = fake.nonfinite
        k = min(DIVERSITY_IMAGES, len(real), len(fake.images))
        if k >= 2:
            ratio = diversity_ratio(fake.images[:k].float() / 255, real[:k].float() / 255)
            results["diversity"] = float(ratio)
    if "bpd" in wanted:
        if hasattr(model, "nll_bpd"):
            results["bpd"] = mean_bpd(model, real, settings.batch_size, device, settings.seed)
            results["bpd_num_images"] = len(real)
        else:
            results["bpd"] = NA
    if "recon" in wanted:
        if hasattr(model, "reconstruct"):
            recon = reconstruction(model, real, settings.batch_size, device)
            results.update({f"recon_{k}": v for k, v in recon.items()})
        else:
            results["recon_mse"] = results["recon_psnr"] = NA
    if "speed" in wanted:
        results.update(
            sampling_speed(
                model, settings.speed_batch_size, settings.speed_repeats, device, kwargs, settings.seed
            )
        )

    run_dir = run_dir_of_checkpoint(loaded.path)
    provenance.update(
        {
            "checkpoint": str(loaded.path),
            "run_dir": str(run_dir),
            **_checkpoint_progress(loaded.path),
            "family": family,
            "model": str(loaded.config.model.get("_target_")),
            "dataset": str(loaded.config.dataset.get("_target_")),
            "reference": reference,
            "reference_split": settings.reference,
            "num_real": len(real),
            "features": settings.features,
            "sampling": {**kwargs, "sampler": sampler_description(loaded.config)},
            "device": str(device),
            "seed": settings.seed,
            "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "eval_time_s": time.perf_counter() - start,
        }
    )
    evaluation = json_safe(
        {
            "metrics": {f"eval/{k}": v for k, v in results.items()},
            "provenance": provenance,
            "settings": settings.fingerprint(),
        }
    )
    try:
        write_json(path, evaluation)
    except OSError as err:
        raise write_failed("out", path, err) from None
    merge_into_metrics(run_dir / "metrics.json", evaluation["metrics"], path)
    logged = log_to_run_logger(
        loaded.config,
        run_dir,
        evaluation["metrics"],
        provenance.get("global_step"),
        provenance.get("wandb_id"),
    )
    if logged:
        log.info("evaluation logged to the run's %s", logged)
    return evaluation


def evaluation_file(out: str | Path | None, key: str = "out") -> Path | None:
    """The file ``out=`` names (None: the run dir's), refused before any work where it cannot be
    written: a folder, under a file, read-only."""
    if out in (None, ""):
        return None
    path = Path(str(out)).expanduser()
    if path.is_dir():
        raise GenexpError(
            f"{key}={path}: is a folder; pass {key}=<a file>.json (or {key}={path}/evaluation.json)"
        )
    writable_folder(key, path.parent, value=path, example="<a writable folder>/evaluation.json", create=False)
    if path.exists() and not os.access(path, os.W_OK):
        raise GenexpError(f"{key}={path}: is read-only; pass {key}=<a writable file>.json")
    return path


def merge_into_metrics(metrics_json: Path, metrics: dict, path: Path) -> None:
    """The results beside the run's test metrics in its ``metrics.json``; a file that cannot be read
    or written is left as it is, with a warning (the evaluation itself is already written)."""
    if not metrics_json.is_file():
        return
    try:
        merged = json.loads(metrics_json.read_text())
        if not isinstance(merged, dict):
            raise ValueError("not a JSON object")
        merged["eval"] = {**metrics, "eval/file": str(path)}
        write_json(metrics_json, merged)
    except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        log.warning(
            "%s left as it was (%s: %s); the evaluation is in %s", metrics_json, type(err).__name__, err, path
        )


def write_json(path: Path, payload: dict) -> None:
    atomic.write_json(path, payload)


def evaluate(cfg: DictConfig) -> tuple[dict, Path]:
    """Run ``genexp evaluate`` from its composed config (``configs/evaluate.yaml``)."""
    if not cfg.get("ckpt"):
        raise GenexpError("ckpt: missing; pass ckpt=<run dir|.ckpt|latest>")
    settings = settings_from_config(cfg)
    out = cfg.get("out")
    evaluation = evaluate_checkpoint(str(cfg.ckpt), settings, out)
    path = evaluation_file(out) or Path(evaluation["provenance"]["run_dir"]) / "evaluation.json"
    return evaluation, path


def format_metrics(metrics: dict) -> str:
    """One line: ``fid 12.3 | kid_mean 0.01 | ...`` (numbers only, provenance keys left out)."""
    parts = []
    for key, value in metrics.items():
        name = key.removeprefix("eval/")
        if name.startswith("fid_") or name in PROVENANCE_KEYS:
            continue
        parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return " | ".join(parts)
