"""The evaluation of one checkpoint: FID/KID/precision-recall, bits/dim, reconstruction and speed.

Shared by ``genexp evaluate`` (one run) and ``genexp compare`` (every run of a comparison). The run's
own dataset (rebuilt from the config stored in the checkpoint) gives the real images; the reference
split, the number of samples and real images, and the feature extractor are recorded beside every
number, since FID depends on all of them. Results go to ``<run dir>/evaluation.json`` and into the
run's ``metrics.json`` under ``"eval"``. The settings' defaults live in ``configs/eval/`` only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf

from genexp import atomic, layout, sampling
from genexp.checkpoints import LoadedModel, progress
from genexp.checks import check_count, check_seed, user, writable_folder, write_failed
from genexp.data.base import Splits
from genexp.errors import GenexpError, check_choice
from genexp.metrics.features import FEATURES, default_cache_dir, feature_extractor
from genexp.metrics.sampling import sample_uint8, sampling_speed
from genexp.models.base import Likelihood, Reconstructing

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
# the fidelity results each metric keeps (the fid_* provenance keys are always kept)
KEPT = {
    "fid": ("fid",),
    "kid": ("kid_mean", "kid_std", "kid_subset_size", "kid_subsets"),
    "pr": ("precision", "recall", "precision_recall_k"),
}


@dataclass
class EvalSettings:
    """What an evaluation depends on; stored in ``evaluation.json`` (and compared by ``genexp compare``
    to skip runs already evaluated the same way). No defaults here: they are ``configs/eval/``'s."""

    metrics: tuple[str, ...]
    num_samples: int  # generated images for fid/kid/pr
    num_real: int | None  # real images of the reference split (None: all)
    reference: str  # the real split: train | val | test
    batch_size: int
    kid_subset_size: int
    features: str  # classifier | inception
    inception_weights: str | None
    classifier_epochs: int
    speed_batch_size: int
    speed_repeats: int
    seed: int
    device: str
    cache_dir: str
    sampler: dict | None = None  # a sampler/ node replacing the run's model.sampler (diffusion)
    solver: dict | None = None  # a solver/ node replacing the run's model.solver (flow matching)
    temperature: float | None = None  # a sample option the user set (None: the family's own)
    truncation: float | None = None

    def check(self) -> EvalSettings:
        self.metrics = check_metrics(self.metrics)
        check_count("eval.num_samples", self.num_samples, minimum=4)
        if self.num_real is not None:
            check_count("eval.num_real", self.num_real, minimum=4)
        user(lambda: check_choice("eval.reference", self.reference, Splits._fields))
        check_count("eval.batch_size", self.batch_size)
        check_count("eval.kid_subset_size", self.kid_subset_size, minimum=2)
        user(lambda: check_choice("features", self.features, FEATURES))
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
        if out["solver"] is None:  # evaluations recorded before the solver group match as they were
            out.pop("solver")
        out["metrics"] = sorted(out["metrics"])
        return json.loads(json.dumps(out))


def check_metrics(value: Any) -> tuple[str, ...]:
    """``metrics``: a non-empty list of :data:`METRICS` (one name alone is taken as a list of one)."""
    metrics = [value] if isinstance(value, str) else value
    if not isinstance(metrics, list | tuple) and not OmegaConf.is_list(metrics):
        raise GenexpError(
            f"metrics={value!r}: must be a list of {', '.join(METRICS)}; pass metrics='[fid,bpd]'"
        )
    metrics = list(metrics)
    for name in metrics:
        user(lambda n=name: check_choice("metrics", n, METRICS))
    if not metrics:
        raise GenexpError(f"metrics=[]: name at least one of {', '.join(METRICS)}")
    return tuple(dict.fromkeys(metrics))


def settings_from_config(cfg: DictConfig) -> EvalSettings:
    """The composed config of ``genexp evaluate`` or ``genexp compare`` -> settings.

    The keys come from ``configs/eval/`` (the top-level ``metrics``, ``features``, ``device``,
    ``seed``, ``cache_dir`` and the ``eval`` node), so both commands share one set of defaults; the
    sample options (``temperature``, ``truncation``) and the ``sampler``/``solver`` groups are evaluate's own."""
    ev = cfg.eval
    chosen, solver = cfg.get("sampler"), cfg.get("solver")
    metrics = cfg.metrics
    return EvalSettings(
        metrics=tuple(OmegaConf.to_container(metrics)) if OmegaConf.is_list(metrics) else metrics,
        num_samples=ev.num_samples,
        num_real=ev.num_real,
        reference=ev.reference,
        batch_size=ev.batch_size,
        kid_subset_size=ev.kid_subset_size,
        features=cfg.features,
        inception_weights=ev.inception_weights,
        classifier_epochs=ev.classifier_epochs,
        speed_batch_size=ev.speed_batch_size,
        speed_repeats=ev.speed_repeats,
        seed=cfg.seed,
        device=str(cfg.device),
        # empty (GENEXP_CACHE='') means the default folder, as everywhere else
        cache_dir=str(Path(str(cfg.cache_dir)).expanduser() if cfg.cache_dir else default_cache_dir()),
        sampler=OmegaConf.to_container(chosen, resolve=False) if chosen else None,
        solver=OmegaConf.to_container(solver, resolve=False) if solver else None,
        temperature=cfg.get("temperature"),
        truncation=cfg.get("truncation"),
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


def log_to_run_logger(
    config: DictConfig, run_dir: Path, metrics: dict, step: int | None, wandb_id: str | None
) -> str | None:
    """Send the numeric results to the logger the run trained with (wandb: the same run, resumed;
    csv: appended to its metrics.csv; tensorboard: its log dir), at the checkpoint's step."""
    from genexp.build import build_logger, is_wandb
    from genexp.lit.loggers import finish_wandb

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
        if is_wandb(logger):
            finish_wandb(logger)
        else:
            logger.finalize("success")
    return type(logger).__name__


class Subject(NamedTuple):
    """What is evaluated: the rebuilt family on its device and the real images it is measured against."""

    loaded: LoadedModel
    model: torch.nn.Module  # on ``device``, eval mode
    family: str
    kwargs: dict  # the sample options the user set
    device: torch.device
    source: Any  # the run's ImageSource
    real: torch.Tensor  # (N, C, H, W) uint8, the reference split (first num_real)
    reference: str  # "<dataset>/<split>"


def load_subject(ckpt: str, settings: EvalSettings, device: torch.device) -> Subject:
    """The checkpoint's family and its dataset's reference split (``ckpt``: a run dir, .ckpt or latest)."""
    from genexp.build import instantiate

    loaded = sampling.load_for_sampling(ckpt, settings.sampler, settings.solver)
    family = sampling.family_name(loaded.config)
    kwargs = sampling.sample_kwargs(loaded, settings.temperature, settings.truncation)
    model = loaded.model.to(device)
    if "dataset" not in loaded.config:
        raise GenexpError(f"ckpt={ckpt}: the checkpoint's config has no dataset to evaluate against")
    source = instantiate(loaded.config.dataset, "dataset")
    real = getattr(source.load(), settings.reference).images
    if settings.num_real is not None:
        real = real[: settings.num_real]
    reference = f"{source.name}/{settings.reference}"
    return Subject(loaded, model, family, kwargs, device, source, real, reference)


def first_extractor(settings: EvalSettings, device: torch.device):
    """The Inception extractor before the checkpoint is read (a missing weights file fails first, and
    nothing is written), after the cache folder is checked; (None, None) where not needed yet."""
    if not set(settings.metrics) & set(FIDELITY):
        return None, None
    # the feature classifier and the real statistics are cached there
    example = "<a writable folder> (or set GENEXP_CACHE)"
    writable_folder("cache_dir", Path(settings.cache_dir), example=example, create=False)
    if settings.features != "inception":
        return None, None
    return feature_extractor(
        "inception", None, Path(settings.cache_dir), str(device), inception_weights=settings.inception_weights
    )


def extractor_for(subject: Subject, settings: EvalSettings, extractor, info) -> tuple[Any, Any]:
    """(extractor, info): the one given (Inception, loaded before the checkpoint), else the run's
    dataset's feature classifier (trained once, then read from the cache)."""
    if extractor is not None:
        return extractor, info
    return feature_extractor(
        settings.features,
        subject.source,
        Path(settings.cache_dir),
        str(subject.device),
        classifier_epochs=settings.classifier_epochs,
        seed=settings.seed,
    )


def fidelity_results(subject: Subject, settings: EvalSettings, extractor, info) -> tuple[dict, dict]:
    """(results, provenance) of fid/kid/pr in the extractor's feature space, plus the diversity ratio."""
    from genexp.metrics.diversity import diversity_ratio
    from genexp.metrics.fidelity import evaluate_fidelity

    cache_dir = Path(settings.cache_dir)
    extractor, info = extractor_for(subject, settings, extractor, info)
    generator = torch.Generator(device=subject.device).manual_seed(settings.seed)
    fake = sample_uint8(
        subject.model, settings.num_samples, settings.batch_size, generator, **subject.kwargs
    )
    fidelity = evaluate_fidelity(
        subject.real,
        fake.images,
        extractor,
        reference=subject.reference,
        kid_subset_size=settings.kid_subset_size,
        batch_size=settings.batch_size,
        cache_dir=cache_dir,
        seed=settings.seed,
    )
    keep = {k for k in fidelity if k.startswith("fid_")}  # provenance: counts, reference, features
    keep.update(*(KEPT[m] for m in FIDELITY if m in settings.metrics))
    results = {k: v for k, v in fidelity.items() if k in keep}
    results["nonfinite_samples"] = fake.nonfinite
    k = min(DIVERSITY_IMAGES, len(subject.real), len(fake.images))
    if k >= 2:
        results["diversity"] = float(
            diversity_ratio(fake.images[:k].float() / 255, subject.real[:k].float() / 255)
        )
    return results, {"feature_extractor": info}


def model_results(subject: Subject, settings: EvalSettings) -> dict:
    """bits/dim, reconstruction and speed, each where asked for (:data:`NA` where the family has none)."""
    from genexp.metrics.bpd import mean_bpd_with_error
    from genexp.metrics.recon import reconstruction

    model, real, device, wanted = subject.model, subject.real, subject.device, settings.metrics
    results: dict[str, Any] = {}
    if "bpd" in wanted:
        if isinstance(model, Likelihood):
            bpd = mean_bpd_with_error(model, real, settings.batch_size, device, settings.seed)
            results["bpd"] = bpd.value
            if bpd.std_err is not None:  # an estimate (the ODE's Hutchinson trace): its standard error
                results["bpd_std_err"] = bpd.std_err
            results["bpd_num_images"] = len(real)
        else:
            results["bpd"] = NA
    if "recon" in wanted:
        if isinstance(model, Reconstructing):
            recon = reconstruction(model, real, settings.batch_size, device)
            results.update({f"recon_{k}": v for k, v in recon.items()})
        else:
            results["recon_mse"] = results["recon_psnr"] = NA
    if "speed" in wanted:
        speed = sampling_speed(
            model, settings.speed_batch_size, settings.speed_repeats, device, subject.kwargs, settings.seed
        )
        results.update(speed)
    return results


def provenance_of(subject: Subject, settings: EvalSettings, seconds: float) -> dict:
    """Where the numbers come from: the checkpoint and its progress, the data, the sampling, the machine."""
    loaded = subject.loaded
    return {
        "checkpoint": str(loaded.path),
        "run_dir": str(sampling.output_dir(loaded.path)),
        **progress(loaded.path),
        "family": subject.family,
        "model": str(loaded.config.model.get("_target_")),
        "dataset": str(loaded.config.dataset.get("_target_")),
        "reference": subject.reference,
        "reference_split": settings.reference,
        "num_real": len(subject.real),
        "features": settings.features,
        "sampling": {**subject.kwargs, "sampler": sampling.sampler_description(loaded.config, subject.model)},
        "device": str(subject.device),
        "seed": settings.seed,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "eval_time_s": seconds,
    }


class Measured(NamedTuple):
    """What a measurement gives :func:`evaluate_checkpoint` to write."""

    results: dict  # name -> value, written as eval/<name>
    provenance: dict
    subject: Subject  # the one the provenance describes (a sweep's: its largest NFE)
    extra: dict  # more top-level keys of evaluation.json (a sweep's "nfe_sweep")
    fingerprint: dict  # more settings the numbers depend on (a sweep's "nfe")


def measure(subject: Subject, settings: EvalSettings, extractor, info, path: Path) -> Measured:
    """The metrics ``settings`` asks for, each once (``path``: where the evaluation goes)."""
    results, provenance = {}, {}
    if set(settings.metrics) & set(FIDELITY):
        results, provenance = fidelity_results(subject, settings, extractor, info)
    results.update(model_results(subject, settings))
    return Measured(results, provenance, subject, {}, {})


Measure = Callable[[Subject, EvalSettings, Any, Any, Path], Measured]


def evaluate_checkpoint(
    ckpt: str, settings: EvalSettings, out: str | Path | None = None, measure: Measure = measure
) -> dict:
    """Evaluate ``ckpt`` (a run dir, .ckpt or ``latest``); write and return the evaluation dict:
    ``{"metrics": {"eval/<name>": ...}, "provenance": {...}, "settings": {...}}``.

    ``measure`` (default :func:`measure`) computes the numbers; another one (the NFE sweep of
    :mod:`genexp.nfe_sweep`) adds its own keys and settings to the same file."""
    settings.check()
    start = time.perf_counter()
    device = sampling.resolve_device(settings.device)
    target = evaluation_file(out)  # refused before any work
    extractor, info = first_extractor(settings, device)
    subject = load_subject(ckpt, settings, device)
    run_dir = sampling.output_dir(subject.loaded.path)
    path = target or evaluation_file(run_dir / layout.EVALUATION_JSON)
    log.info(
        "evaluating %s (%s) on %s against %s", subject.family, subject.loaded.path, device, subject.reference
    )
    measured = measure(subject, settings, extractor, info, path)
    subject, provenance = measured.subject, measured.provenance
    provenance.update(provenance_of(subject, settings, time.perf_counter() - start))
    evaluation = json_safe(
        {
            "metrics": {f"eval/{k}": v for k, v in measured.results.items()},
            "provenance": provenance,
            "settings": {**settings.fingerprint(), **measured.fingerprint},
            **measured.extra,
        }
    )
    try:
        atomic.write_json(path, evaluation)
    except OSError as err:
        raise write_failed("out", path, err) from None
    merge_into_metrics(run_dir / layout.METRICS_JSON, evaluation["metrics"], path)
    step, wandb_id = provenance.get("global_step"), provenance.get("wandb_id")
    logged = log_to_run_logger(subject.loaded.config, run_dir, evaluation["metrics"], step, wandb_id)
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
            f"{key}={path}: is a folder; pass {key}=<a file>.json (or {key}={path}/{layout.EVALUATION_JSON})"
        )
    example = f"<a writable folder>/{layout.EVALUATION_JSON}"
    writable_folder(key, path.parent, value=path, example=example, create=False)
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
        atomic.write_json(metrics_json, merged)
    except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        log.warning(
            "%s left as it was (%s: %s); the evaluation is in %s", metrics_json, type(err).__name__, err, path
        )


def format_metrics(metrics: dict) -> str:
    """One line: ``fid 12.3 | kid_mean 0.01 | ...`` (numbers only, provenance keys left out)."""
    parts = []
    for key, value in metrics.items():
        name = key.removeprefix("eval/")
        if name.startswith("fid_") or name in PROVENANCE_KEYS:
            continue
        parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return " | ".join(parts)
