"""Two-stage latent diffusion in one command (``experiment=ldm_two_stage``): train the first stage
(an AE/VAE) into ``model.first_stage``, then the latent model on it.

The first stage is an ordinary ``genexp train`` run: its config is composed from
``first_stage_train``'s overrides with this run's data, seed, logger and devices, and trained by the
command's own ``run``, passed in (so this module imports no command).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from genexp import layout
from genexp.errors import GenexpError

log = logging.getLogger("genexp")

# what the first stage takes from this run: the same data, seed, logger and hardware
FIRST_STAGE_SHARED = ("dataset", "data", "seed", "logger", "performance")
FIRST_STAGE_TRAINER = ("accelerator", "devices", "strategy", "precision", "num_nodes")


def finished(run_dir: Path) -> bool:
    """A run that wrote its results and its last checkpoint: a first stage to reuse as it is."""
    return (run_dir / layout.METRICS_JSON).is_file() and layout.last_ckpt(run_dir).is_file()


def compose_first_stage(cfg: DictConfig) -> DictConfig:
    """The first stage's own config: ``first_stage_train``'s overrides on ``train.yaml``, with this
    run's shared nodes and trainer devices, writing into ``model.first_stage``."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = [str(o) for o in cfg.first_stage_train]
    try:
        if GlobalHydra.instance().is_initialized():
            sub = compose(config_name="train", overrides=overrides)
        else:
            with initialize_config_module(config_module="genexp.configs", version_base="1.3"):
                sub = compose(config_name="train", overrides=overrides)
    except Exception as err:  # noqa: BLE001 - a bad override in first_stage_train, as one line
        first = str(err).strip().splitlines()[0]
        raise GenexpError(f"first_stage_train: {first}") from None
    OmegaConf.set_struct(sub, False)
    for key in FIRST_STAGE_SHARED:
        sub[key] = cfg[key]
    for key in FIRST_STAGE_TRAINER:
        if key in cfg.trainer:
            sub.trainer[key] = cfg.trainer[key]
    sub.paths.output_dir = str(cfg.model.first_stage)
    sub.ckpt_path = None
    sub.first_stage_train = None
    return sub


def train_first_stage(cfg: DictConfig, train: Callable[[DictConfig], dict]) -> None:
    """When ``first_stage_train`` lists overrides and ``model.first_stage`` holds no finished run
    yet, ``train`` that run there first. A finished first stage is reused, so re-running or
    resuming the command does not train it again."""
    target = Path(str(cfg.model.first_stage))
    if finished(target):
        log.info("first stage: reusing the finished run in %s", target)
        return
    log.info(
        "first stage: training `genexp train %s` into %s", " ".join(map(str, cfg.first_stage_train)), target
    )
    train(compose_first_stage(cfg))
