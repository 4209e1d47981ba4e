"""``genexp train``: check the config, lock the run dir, find the resume point, build the run, fit
and test it, and write ``metrics.json``.

:func:`run` reads top to bottom in that order. What is built comes from :mod:`genexp.build` (every
``_target_`` through its registry, so a config or a checkpoint's stored config cannot run arbitrary
code); the checks before it from :mod:`genexp.validate`; two-stage latent diffusion from
:mod:`genexp.two_stage`. The errors of fit and test become one line in :func:`translated_errors`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from genexp import atomic, layout, progress
from genexp.build import Run, build_run, is_wandb
from genexp.checkpoints import check_weights_fit, read
from genexp.errors import GenexpError
from genexp.lit.callbacks import EpochSummary, Throughput, WaitProgress
from genexp.lit.loggers import finish_wandb
from genexp.lit.preemption import Preempted
from genexp.resume import requeue_checkpoint, resolve_checkpoint
from genexp.rundir import launched_rank
from genexp.runlock import run_lock
from genexp.two_stage import train_first_stage
from genexp.validate import check_callback_dirs, check_writable, validate

log = logging.getLogger("genexp")


def run(cfg: DictConfig) -> dict:
    """Fit, test and write ``metrics.json``; return the metrics. Raises GenexpError for user errors.

    The run dir is locked for the whole call (:mod:`genexp.runlock`): a second writer is refused."""
    start = time.perf_counter()
    quiet_third_party()
    if launched_rank() > 0:  # rank 0 reports the run; the others keep warnings and errors only
        log.setLevel(logging.WARNING)
    validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    check_writable(output_dir)
    check_callback_dirs(cfg)
    lock = run_lock(output_dir) if launched_rank() == 0 else contextlib.nullcontext()
    with lock, progress.reporting(progress.auto(launched_rank() == 0)):
        resumed = resume_point(cfg, output_dir)
        if cfg.get("first_stage_train"):
            train_first_stage(cfg, run)
        return fit_and_test(cfg, output_dir, resumed, start)


train = run  # the name tests, scripts and the CLI call


class Resumed(NamedTuple):
    path: Path
    state_dict: dict
    global_step: int
    wandb_id: str | None


def resume_point(cfg: DictConfig, output_dir: Path) -> Resumed | None:
    """The checkpoint this run continues from (``ckpt_path``, or a requeued job's own), checked."""
    # a requeued SLURM job (or restarted torchrun) is back in its run dir: continue from there
    requeued = None if cfg.get("ckpt_path") else requeue_checkpoint(output_dir)
    if not (cfg.get("ckpt_path") or requeued):
        return None
    ckpt_path = requeued or resolve_checkpoint(str(cfg.ckpt_path))
    resumed = read(ckpt_path)
    meta = resumed["genexp"]
    stored = (meta.get("config") or {}).get("model", {}).get("_target_")
    if stored and stored != cfg.model.get("_target_"):
        raise GenexpError(
            f"ckpt_path={ckpt_path}: a checkpoint of {stored}, but model is {cfg.model._target_}; "
            "pass the same model (or the run dir, which replays its overrides)"
        )
    log.info("resuming from %s%s", ckpt_path, " (a restarted job, back in its run dir)" if requeued else "")
    step = resumed.get("global_step")
    wandb_id = meta.get("wandb_id")
    return Resumed(
        ckpt_path,
        resumed["state_dict"],
        step if isinstance(step, int) else -1,
        wandb_id if isinstance(wandb_id, str) else None,
    )


def fit_and_test(cfg: DictConfig, output_dir: Path, resumed: Resumed | None, start: float) -> dict:
    """Build the run, fit it (from ``resumed``), test its best weights and write the results."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    throughput = Throughput()
    built = build_run(
        cfg, output_dir, resumed.wandb_id if resumed else None, [throughput, EpochSummary(), WaitProgress()]
    )
    if resumed is not None:
        check_weights_fit(built.module, resumed.state_dict, resumed.path)
        resumed = resumed._replace(state_dict={})  # Lightning loads its own copy in fit
    log_run(built, output_dir)
    trainer = built.trainer
    with translated_errors(cfg, output_dir), finishing(built.logger):
        fit_start = time.perf_counter()
        trainer.fit(
            built.module,
            datamodule=built.datamodule,
            ckpt_path=str(resumed.path) if resumed else None,
            weights_only=True,
        )
        fit_time = time.perf_counter() - fit_start
        if resumed is not None and trainer.global_step == resumed.global_step:
            finished = finished_results(output_dir, trainer.global_step)
            if finished is not None:
                return finished
        best = own_best_checkpoint(trainer.checkpoint_callback)
        test = trainer.test(
            built.module,
            datamodule=built.datamodule,
            ckpt_path=best or None,
            weights_only=True,
            verbose=False,
        )
    times = {"train_img_per_sec": throughput.img_per_sec, "fit_time_s": fit_time, "start": start}
    return write_results(cfg, built, output_dir, test[0] if test else {}, best, times)


@contextlib.contextmanager
def translated_errors(cfg: DictConfig, output_dir: Path) -> Iterator[None]:
    """Fit's and test's failures that are the user's or the machine's, as one line with the fix."""
    try:
        yield
    except pl.utilities.exceptions.SIGTERMException:
        # Lightning's own SIGTERM flag, where genexp.signals' handler is not installed (train() called
        # in-process): its test loop stops at the next batch, and would exit with 0
        raise Preempted(
            "stopped by SIGTERM during the test: the checkpoints are complete, metrics.json is not "
            f"written; resume with: genexp train ckpt_path={output_dir}"
        ) from None
    except pl.utilities.exceptions.MisconfigurationException as err:
        # the monitored metric is only known once the first validation has logged its metrics
        logged = re.search(r"returned metrics: \[(.*?)\]", str(err))
        if "could not find the monitored key" not in str(err) or not logged:
            raise
        names = [n.strip(" '") for n in logged.group(1).split(",") if n.strip(" '").startswith("val/")]
        raise GenexpError(
            f"monitor.metric={cfg.get('monitor', {}).get('metric')}: the run logs no such metric; "
            f"pick one of {', '.join(names)}"
        ) from None
    except torch.cuda.OutOfMemoryError:
        size = int(cfg.data.batch_size)
        raise GenexpError(
            f"out of GPU memory with data.batch_size={size}: try data.batch_size={max(1, size // 2)} "
            "(or trainer.precision=bf16-mixed, a smaller model); checkpoints already saved are kept"
        ) from None
    except (OSError, RuntimeError) as err:
        refused = atomic.write_refusal(err)
        if refused is None:
            raise
        raise GenexpError(
            f"cannot write {refused.filename or output_dir}: {refused.strerror}; "
            f"{'free space or ' if atomic.is_full(refused) else ''}"
            "write elsewhere with paths.log_dir=<folder> (the last complete checkpoint is kept)"
        ) from None


@contextlib.contextmanager
def finishing(logger: Any) -> Iterator[None]:
    """Close a wandb run however fit and test end (a multirun's next job starts a new one)."""
    try:
        yield
    finally:
        if logger and is_wandb(logger):
            finish_wandb(logger)


def own_best_checkpoint(checkpoint) -> str:
    """``best.ckpt`` as this run's checkpoint callback knows it, if it is this run's own file ("" if
    none: the weights trained here are tested), the rule :func:`genexp.checkpoints.weights_of` reads.

    Lightning restores ``best_model_path`` from the checkpoint it resumes from, which may be a copy
    of another run's: testing that path would score another run's weights (or fail once it is gone)."""
    best = str(getattr(checkpoint, "best_model_path", "") or "") if checkpoint else ""
    folder = getattr(checkpoint, "dirpath", None)
    if not best or not folder:
        return ""
    own = Path(folder) / Path(best).name  # a run dir that was moved finds its best.ckpt where it is now
    if own.is_file():  # written into this run's own folder: this run's (never a path from elsewhere)
        return str(own)
    log.warning(
        "the resumed checkpoint's best.ckpt (%s) is not this run's: testing the weights trained here", best
    )
    return ""


def finished_results(output_dir: Path, step: int) -> dict | None:
    """A resumed run that had nothing left to train keeps the results it has (``metrics.json``)."""
    path = output_dir / layout.METRICS_JSON
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # stopped before its test: test it now
    if not isinstance(metrics, dict):
        return None
    log.info(
        "nothing left to train: the run already reached its budget at step %d; its results are kept in %s "
        "(raise trainer.max_epochs, trainer.max_steps or trainer.max_time to train on)",
        step,
        path,
    )
    return metrics


def num_parameters(model: torch.nn.Module) -> int:
    """Trained parameters only (a GAN's EMA copy of G is not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def log_run(built: Run, output_dir: Path) -> None:
    dataset = built.dataset
    log.info(
        "model %s: %.2fM parameters; data %s %dx%dx%d; output %s",
        type(built.model).__name__,
        num_parameters(built.model) / 1e6,
        type(dataset).__name__,
        dataset.channels,
        dataset.image_size,
        dataset.image_size,
        output_dir,
    )


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_results(cfg: DictConfig, built: Run, output_dir: Path, test: dict, best: str, times: dict) -> dict:
    """``metrics.json`` (rank 0 writes it), logged in one line; the metrics are returned."""
    trainer = built.trainer
    metrics = {
        "model": type(built.model).__name__,
        "dataset": type(built.dataset).__name__,
        "seed": cfg.seed,
        "test": {k: _scalar(v) for k, v in test.items()},
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "num_parameters": num_parameters(built.model),
        "train_img_per_sec": times["train_img_per_sec"],
        "fit_time_s": times["fit_time_s"],
        "wall_time_s": time.perf_counter() - times["start"],
        "best_checkpoint": best or None,
        "output_dir": str(output_dir),
    }
    path = output_dir / layout.METRICS_JSON
    if trainer.is_global_zero:
        atomic.write_json(path, metrics)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics["test"].items() if isinstance(v, float))
    log.info(
        "test: %s | %d steps in %.1fs (%.0f img/s) | %s",
        summary,
        trainer.global_step,
        metrics["fit_time_s"],
        metrics["train_img_per_sec"],
        path,
    )
    return metrics


class _DropTips(logging.Filter):
    """Drop Lightning's advertising tips from the run log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_third_party() -> None:
    """Silence the library warnings a genexp run triggers on purpose, and Lightning's tips."""
    import warnings

    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # the training order resumes mid-epoch (genexp/data/order.py), though Lightning cannot tell
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
    warnings.filterwarnings("ignore", message=r".*is an invalid version and will not be supported.*")
    # latent diffusion keeps its frozen first stage in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
