"""Checks of a ``genexp train`` config that are cheaper before anything is built: each fails in one
line naming the key and the fix (the constructors and :mod:`genexp.preflight` check the rest).

Lightning and Hydra are imported only by :func:`refuse_ddp_sweep`, which reads their launchers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from genexp import preflight
from genexp.build import check_config
from genexp.errors import ConfigError, GenexpError, check_float, check_int
from genexp.objective import check_objective


def validate(cfg: DictConfig) -> None:
    """Every check of a run config before it is built (:func:`genexp.commands.train.run` calls this)."""
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
    check_objective(cfg)  # what a sweep's sweeper receives: one number of metrics.json
    refuse_ddp_sweep(cfg)
    refuse_missing_gpu(cfg)


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
