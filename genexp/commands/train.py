"""Compose the run from the config and execute it.

Every ``_target_`` goes through :func:`genexp.build.instantiate`, which constructs only registered
targets, so a config (or a checkpoint's stored config) cannot run arbitrary code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from genexp import atomic
from genexp.build import build_model_and_first_stage, check_targets, instantiate, plain_config  # noqa: F401
from genexp.checkpoints import check_weights_fit, read
from genexp.errors import ConfigError, GenexpError, check_float, check_int
from genexp.lit.callbacks import EpochSummary, Throughput
from genexp.lit.checkpointing import AtomicCheckpointIO, Preempted, ResumePosition, slurm_plugins
from genexp.lit.divergence import DivergenceGuard
from genexp.lit.gan_module import GANModule
from genexp.lit.loggers import finish_wandb, prepare_wandb_kwargs
from genexp.lit.module import GenerativeModule
from genexp.lit.performance import Performance, clips_under_amp
from genexp.lit.rng_state import RNGState

log = logging.getLogger("genexp")


class _DropTips(logging.Filter):
    """Drop Lightning's advertising tips from the run log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_third_party() -> None:
    import warnings

    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # the training order resumes mid-epoch (genexp/data/order.py), though Lightning cannot tell
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
    warnings.filterwarnings("ignore", message=r".*is an invalid version and will not be supported.*")
    # latent diffusion keeps its frozen first stage in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def validate(cfg: DictConfig) -> None:
    """Checks that are cheaper before anything is built (the constructors check the rest)."""
    from genexp import preflight
    from genexp.build import check_config

    # a broken ${...} or a deleted group, with its fix, before any value is read
    values = preflight.interpolations(cfg)
    check_config(cfg)  # every _target_ anywhere in the run is registered, before any is imported or built
    preflight.check(cfg, values)
    try:
        check_int("seed", cfg.get("seed"), minimum=0)
        check_float("optimizer.lr", cfg.optimizer.get("lr"), positive=True)
        check_int("data.batch_size", cfg.data.batch_size, minimum=1)
        trainer = cfg.trainer
        for key in ("max_epochs", "max_steps"):
            if trainer.get(key) is not None:
                check_int(f"trainer.{key}", trainer.get(key), minimum=-1)
    except ConfigError as err:
        raise GenexpError(str(err)) from None
    refuse_ddp_sweep(cfg)
    refuse_missing_gpu(cfg)


def launched_rank() -> int:
    """This process's rank as its launcher set it: torchrun, srun, or Lightning's own DDP children
    (``LOCAL_RANK`` on one node, ``NODE_RANK`` across nodes); 0 in the process a user started."""
    from genexp.rundir import process_rank

    return max(process_rank(), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("NODE_RANK", "0")))


def refuse_missing_gpu(cfg: DictConfig) -> None:
    """``accelerator=gpu`` on a machine without CUDA: say so, instead of Lightning's backend error."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise GenexpError(
            f"trainer.accelerator={accelerator}: no CUDA GPU is visible here; "
            "use accelerator=cpu (or accelerator=auto, which takes a GPU when there is one)"
        )


def refuse_ddp_sweep(cfg: DictConfig) -> None:
    """Lightning's ``ddp`` launcher re-runs the command line in each rank, which replays a whole
    Hydra sweep there (a known Lightning/Hydra pitfall): refuse it with the fix."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from pytorch_lightning.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    if TorchElasticEnvironment.detect() or SLURMEnvironment.detect():
        return  # srun/torchrun started every rank (hydra/launcher=slurm): Lightning launches nothing
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if (
        strategy.startswith("ddp")
        and not strategy.startswith("ddp_spawn")
        and cfg.trainer.get("devices") != 1
    ):
        raise GenexpError(
            f"trainer.strategy={strategy} with a -m sweep would replay the sweep in every process; "
            "use trainer.strategy=ddp_spawn for local sweeps, or hydra/launcher=slurm (srun starts the ranks)"
        )


def check_writable(output_dir: Path) -> None:
    """A run dir that cannot be written fails now, not at the first checkpoint or sample grid."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(output_dir, os.W_OK | os.X_OK)
    except OSError as err:
        writable, reason = False, err.strerror
    else:
        reason = "permission denied"
    if not writable:
        raise GenexpError(
            f"paths.output_dir={output_dir}: cannot write there ({reason}); "
            "pick a writable folder with paths.log_dir=<folder> or hydra.run.dir=<folder>"
        )


def check_callback_dirs(cfg: DictConfig) -> None:
    """A callback's folder (``<run>/checkpoints``, ``<run>/samples``) that is a file fails now, not
    at the first checkpoint write after an epoch of training."""
    for name, node in (cfg.get("callbacks") or {}).items():
        folder = node.get("dirpath") if isinstance(node, DictConfig) else None
        if folder and Path(str(folder)).exists() and not Path(str(folder)).is_dir():
            raise GenexpError(
                f"callbacks.{name}.dirpath={folder}: a file, not a folder; move or delete that file, "
                "or write the run elsewhere with paths.log_dir=<folder>"
            )


def own_best_checkpoint(checkpoint) -> str:
    """``best.ckpt`` as this run's checkpoint callback knows it, if it is this run's own file.

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
    path = output_dir / "metrics.json"
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


FIRST_STAGE_SHARED = ("dataset", "data", "seed", "logger", "performance")
FIRST_STAGE_TRAINER = ("accelerator", "devices", "strategy", "precision", "num_nodes")


def train_first_stage(cfg: DictConfig) -> None:
    """Two-stage latent diffusion in one command: when ``first_stage_train`` lists overrides and
    ``model.first_stage`` holds no finished run yet, train that run there first (same dataset,
    data, seed, logger and devices as this run). A finished first stage is reused, so re-running
    or resuming the command does not train it again."""
    target = Path(str(cfg.model.first_stage))
    if (target / "metrics.json").is_file() and (target / "checkpoints" / "last.ckpt").is_file():
        log.info("first stage: reusing the finished run in %s", target)
        return
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = [str(o) for o in cfg.first_stage_train]
    log.info("first stage: training `genexp train %s` into %s", " ".join(overrides), target)
    try:
        if GlobalHydra.instance().is_initialized():
            sub = compose(config_name="train", overrides=overrides)
        else:
            with initialize_config_module(config_module="genexp.configs", version_base="1.3"):
                sub = compose(config_name="train", overrides=overrides)
    except Exception as err:  # a bad override in first_stage_train
        first = str(err).strip().splitlines()[0]
        raise GenexpError(f"first_stage_train: {first}") from None
    OmegaConf.set_struct(sub, False)
    for key in FIRST_STAGE_SHARED:
        sub[key] = cfg[key]
    for key in FIRST_STAGE_TRAINER:
        if key in cfg.trainer:
            sub.trainer[key] = cfg.trainer[key]
    sub.paths.output_dir = str(target)
    sub.ckpt_path = None
    sub.first_stage_train = None
    train(sub)


def build_logger(cfg: DictConfig, output_dir: Path, wandb_id: str | None):
    node = cfg.get("logger")
    if not node:
        return False
    kwargs = {}
    if str(node.get("_target_", "")).endswith("WandbLogger"):
        kwargs = prepare_wandb_kwargs({}, wandb_id)
    return instantiate(node, "logger", **kwargs)


@rank_zero_only
def write_json(path: Path, payload: dict) -> None:
    atomic.write_json(path, payload)


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def train(cfg: DictConfig) -> dict:
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
    from genexp.runlock import run_lock

    with run_lock(output_dir) if launched_rank() == 0 else contextlib.nullcontext():
        return _train(cfg, output_dir, start)


class Resumed(NamedTuple):
    path: Path
    state_dict: dict
    global_step: int
    wandb_id: str | None


def resume_point(cfg: DictConfig, output_dir: Path) -> Resumed | None:
    """The checkpoint this run continues from (``ckpt_path``, or a requeued job's own), checked."""
    from genexp.resume import requeue_checkpoint, resolve_checkpoint

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


def _train(cfg: DictConfig, output_dir: Path, start: float) -> dict:
    resumed = resume_point(cfg, output_dir)
    ckpt_path = resumed.path if resumed else None
    wandb_id = resumed.wandb_id if resumed else None
    if cfg.get("first_stage_train"):
        train_first_stage(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # speed options (configs/performance/): the Trainer's precision, the optimizer's kernels, device
    # data here; channels_last and compile as its callback hooks, in every process
    performance = instantiate(cfg.performance, "performance") if cfg.get("performance") else Performance()
    precision = performance.trainer_precision(
        cfg.trainer.get("precision"),
        cfg.trainer.get("accelerator", "auto"),
        cfg.trainer.get("strategy", "auto"),
    )
    dataset = instantiate(cfg.dataset, "dataset")
    datamodule = instantiate(cfg.data, "data", dataset=dataset, device_data=performance.device_data)
    model, first_stage = build_model_and_first_stage(cfg)
    clipped_amp = clips_under_amp(precision, cfg.trainer.get("gradient_clip_val"), model)
    optimizer = performance.optimizer(instantiate(cfg.optimizer, "optimizer"), clipped_amp)
    try:  # a dry build so a bad optimizer setting fails now, not after the first epoch
        optimizer([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise GenexpError(f"optimizer: {err}") from None
    scheduler = instantiate(cfg.lr_scheduler, "lr_scheduler") if cfg.get("lr_scheduler") else None

    config = plain_config(cfg)
    if first_stage is not None:  # the checkpoint rebuilds its first stage without the original run
        config["model"]["first_stage"] = first_stage
    # the family's contract picks the glue: adversarial families (d_loss/g_loss) train two networks
    module_class = GANModule if hasattr(model, "d_loss") else GenerativeModule
    divergence = instantiate(cfg.divergence, "divergence") if cfg.get("divergence") else DivergenceGuard()
    module = module_class(
        model=model, optimizer=optimizer, scheduler=scheduler, config=config, divergence=divergence
    )
    if resumed is not None:
        check_weights_fit(module, resumed.state_dict, ckpt_path)
        resumed = resumed._replace(state_dict={})  # Lightning loads its own copy in fit
    callbacks: list[pl.Callback] = [
        instantiate(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items() if node
    ]
    throughput = Throughput()
    callbacks += [throughput, EpochSummary()]
    # before the configured callbacks: its setup converts the model before an EMA copies it
    callbacks.insert(0, performance)
    # exact resume (docs/reliability.md): the random streams' hooks run before other callbacks
    # draw random numbers; the step checkpoint saves after the EMA has taken the step
    callbacks.insert(0, RNGState(test_seed=int(cfg.seed)))
    callbacks.append(ResumePosition())  # a run stopped by max_steps/max_time resumes its epoch
    step_checkpoint = instantiate(cfg.checkpoint, "checkpoint") if cfg.get("checkpoint") else None
    callbacks += [divergence, *([step_checkpoint] if step_checkpoint else [])]
    # a Rich bar in a terminal, plain epoch lines otherwise; trainer.enable_progress_bar decides if set
    progress = cfg.trainer.get("enable_progress_bar")
    progress = sys.stdout.isatty() if progress is None else bool(progress)
    if progress:
        from pytorch_lightning.callbacks import RichProgressBar

        # redrawing every batch costs ~5 ms a step on CPU; every few batches reads the same
        callbacks.append(
            RichProgressBar(refresh_rate=max(1, min(10, int(cfg.trainer.get("log_every_n_steps") or 1))))
        )
    checkpointing = any(isinstance(cb, pl.callbacks.ModelCheckpoint) for cb in callbacks)
    logger = build_logger(cfg, output_dir, wandb_id)
    if logger:
        logger.log_hyperparams(config)
        if type(logger).__name__ == "WandbLogger":
            module.wandb_id = getattr(logger, "version", None)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=logger,
        enable_progress_bar=progress,
        enable_checkpointing=checkpointing,  # callbacks=none means no checkpoints, not Lightning's default ones
        # atomic, finite-only checkpoint writes; under SLURM genexp, not Lightning, handles preemption
        plugins=[AtomicCheckpointIO(), *slurm_plugins(bool(step_checkpoint and step_checkpoint.preemption))],
        precision=precision,
    )

    # trained parameters only (a GAN's EMA copy of G is not counted)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "model %s: %.2fM parameters; data %s %dx%dx%d; output %s",
        type(model).__name__,
        num_params / 1e6,
        type(dataset).__name__,
        dataset.channels,
        dataset.image_size,
        dataset.image_size,
        output_dir,
    )
    fit_start = time.perf_counter()
    try:
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True
        )
        fit_time = time.perf_counter() - fit_start
        if resumed is not None and trainer.global_step == resumed.global_step:
            finished = finished_results(output_dir, trainer.global_step)
            if finished is not None:
                return finished
        best = own_best_checkpoint(trainer.checkpoint_callback)
        test = trainer.test(
            module, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False
        )
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
        full = refused.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        raise GenexpError(
            f"cannot write {refused.filename or output_dir}: {refused.strerror}; {'free space or ' if full else ''}"
            "write elsewhere with paths.log_dir=<folder> (the last complete checkpoint is kept)"
        ) from None
    finally:
        if logger and type(logger).__name__ == "WandbLogger":
            finish_wandb(logger)
    metrics = {
        "model": type(model).__name__,
        "dataset": type(dataset).__name__,
        "seed": cfg.seed,
        "test": {k: _scalar(v) for k, v in (test[0] if test else {}).items()},
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "num_parameters": num_params,
        "train_img_per_sec": throughput.img_per_sec,
        "fit_time_s": fit_time,
        "wall_time_s": time.perf_counter() - start,
        "best_checkpoint": best or None,
        "output_dir": str(output_dir),
    }
    write_json(output_dir / "metrics.json", metrics)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics["test"].items() if isinstance(v, float))
    log.info(
        "test: %s | %d steps in %.1fs (%.0f img/s) | %s",
        summary,
        trainer.global_step,
        fit_time,
        throughput.img_per_sec,
        output_dir / "metrics.json",
    )
    return metrics
