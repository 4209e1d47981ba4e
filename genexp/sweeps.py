"""What every ``-m`` sweep shares (a search, a grid, a compare's training): the objective its jobs
return, the wandb group, job type and tags of each job, and one ``wandb sync`` for the whole sweep.

- The objective (:mod:`genexp.objective`): what ``genexp train`` returns to Hydra's sweeper.
- wandb (:func:`wandb_sweep_kwargs`): ``group=<sweep id>`` (the sweep dir, e.g.
  ``multirun/vae_optuna-mnist5k``), ``job_type=<model option>`` and a tag per override of the job,
  unless the logger config sets them, so the wandb UI shows a sweep as one group.
- :class:`SweepEnd` (``hydra.callbacks.sweep_end`` in ``configs/train.yaml``): after a sweep, one
  command that uploads every offline wandb run in it.

Light (Hydra and OmegaConf only, no torch): Hydra builds the callback on every start.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("genexp")

# the search recipes' sweeper (configs/hparams_search/): a trial's error fails that trial alone
SEARCH_SWEEPER = "hydra_plugins.genexp_search.optuna_sweeper.OptunaSweeper"
WANDB_TAG_CHARS = 64  # wandb refuses longer tags
WANDB_GROUP_CHARS = 128


def register_sweeper() -> None:
    """Make Hydra know the search sweeper even where its plugin scan cannot list it (an editable
    install maps ``hydra_plugins.genexp_search`` through an import hook that ``pkgutil`` cannot walk)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.genexp_search.optuna_sweeper import OptunaSweeper

    Plugins.instance().register(OptunaSweeper)
    # importing optuna (Hydra builds the sampler first) logs a line per plugin of alembic, its storage's
    # schema migrations, at INFO
    logging.getLogger("alembic").setLevel(logging.WARNING)


def multirun_config() -> Any:
    """Hydra's config of this job when it runs in a ``-m`` sweep, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    return hydra if hydra.mode == RunMode.MULTIRUN else None


def in_search() -> bool:
    """Whether this job is a trial of a search (its sweeper records a failed trial and goes on)."""
    hydra = multirun_config()
    return hydra is not None and str(hydra.sweeper.get("_target_")) == SEARCH_SWEEPER


def sweep_id(sweep_dir: str | Path) -> str:
    """The sweep dir as the wandb group: relative to the working dir when inside it
    (``multirun/vae_optuna-mnist5k``, ``compare/mnist5k/runs``), else its last two parts."""
    path = Path(sweep_dir).expanduser().resolve()
    try:
        name = str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        name = "/".join(path.parts[-2:])
    return name[-WANDB_GROUP_CHARS:]


def override_tags(overrides: list[str]) -> list[str]:
    """One tag per override of the job (``optimizer.lr=0.0012``), cut to wandb's tag length."""
    tags = [str(o)[:WANDB_TAG_CHARS] for o in overrides if str(o).strip()]
    return list(dict.fromkeys(tags))


def wandb_sweep_kwargs(node: DictConfig) -> dict:
    """``WandbLogger`` arguments that group a sweep's jobs (none outside a ``-m`` sweep); a
    ``group`` or ``job_type`` the logger config sets wins, its ``tags`` come first."""
    hydra = multirun_config()
    if hydra is None:
        return {}
    kwargs: dict[str, Any] = {}
    if node.get("group") is None:
        kwargs["group"] = sweep_id(hydra.sweep.dir)
    if node.get("job_type") is None:
        kwargs["job_type"] = str(hydra.runtime.choices.get("model") or "train")
    tags = [str(t) for t in (node.get("tags") or [])]
    kwargs["tags"] = list(dict.fromkeys([*tags, *override_tags(list(hydra.overrides.task))]))
    return kwargs


def offline_runs(sweep_dir: Path) -> list[Path]:
    """The offline wandb runs under a sweep's run dirs (``<job>/wandb/offline-run-*``)."""
    return sorted(p for p in Path(sweep_dir).glob("*/wandb/offline-run-*") if p.is_dir())


def sync_command(sweep_dir: Path) -> str | None:
    """One ``wandb sync`` for every offline run of the sweep (a shell glob), or None if none."""
    if not offline_runs(sweep_dir):
        return None
    return f"wandb sync {shlex.quote(os.path.abspath(sweep_dir))}/*/wandb/offline-run-*"


class SweepEnd(Callback):
    """After a ``-m`` sweep: how to upload its offline wandb runs, in one command."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        command = sync_command(Path(config.hydra.sweep.dir))
        if command:
            count = len(offline_runs(Path(config.hydra.sweep.dir)))
            log.info("wandb: %d offline runs in this sweep; upload them all with: %s", count, command)
