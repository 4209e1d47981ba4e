"""One run directory per job, however many processes run it.

Under ``srun`` or ``torchrun`` every rank runs the Hydra app itself, so a ``${now:...}`` run dir
would differ between ranks that start a second apart. The last part of the run dir comes from the
launcher instead: ``slurm-<job id>`` (a requeued job finds its directory again), ``torchrun-<rdzv
id>``; a run started by hand gets its timestamp, claimed with ``os.mkdir`` so that two runs started
in the same second get distinct dirs (``<timestamp>_1``). Rank 0 alone writes ``.hydra/`` and
``train.log``; rank r > 0 logs to ``train_ddp_process_<r>.log``, the name Lightning's own DDP
launcher gives its child processes.

Pure Python (no torch at import): ``genexp.cli`` registers the resolvers before Hydra composes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from genexp import layout
from genexp.errors import GenexpError

TIMESTAMP = "%Y-%m-%d_%H-%M-%S"
# Lightning's rule: a SLURM job with such a name is an interactive allocation whose processes
# are not started by srun (its SLURMEnvironment is not used then either)
INTERACTIVE_JOB_NAMES = ("bash", "interactive")
# SLURM's special step ids (batch script, extern, interactive) are not numbered srun steps
_LAST_NUMBERED_STEP = 0xFFFFFFF0
_STORE_TIMEOUT_S = 120  # rank 0 claims the dir while composing its config: seconds
SEARCH_ROOTS = ("outputs", "multirun")  # where ``latest`` looks for runs, under the working directory


def run_dirs(roots: tuple[str, ...] = SEARCH_ROOTS) -> list[Path]:
    """Every training run dir under ``roots``: a folder whose ``.hydra/config.yaml`` Hydra wrote."""
    pattern = f"**/{layout.HYDRA_DIR}/{layout.CONFIG_YAML}"
    return [p.parent.parent for root in roots for p in Path(root).glob(pattern)]


def newest_run(roots: tuple[str, ...] = SEARCH_ROOTS) -> Path | None:
    """``latest``: the run dir started or resumed last (Hydra rewrites its config then); None if none."""
    runs = [r for r in run_dirs(roots) if layout.overrides_yaml(r).is_file()]
    return max(runs, key=lambda r: layout.config_yaml(r).stat().st_mtime) if runs else None


def run_dir_of(ckpt: Path) -> Path | None:
    """The run dir that holds ``ckpt`` (``<run>/checkpoints/<name>.ckpt``); None for a checkpoint
    kept anywhere else (a loose copy has no run whose files belong to it)."""
    parent = Path(ckpt).parent
    return parent.parent if parent.name == layout.CHECKPOINTS else None


def slurm_run_name(env: Mapping[str, str] = os.environ) -> str | None:
    """``slurm-<job id>`` (an array task: ``slurm-<array job id>_<task id>``) in a SLURM batch job.

    The name is the same on every rank and after a requeue. A batch script's second and later
    ``srun`` steps are other runs: they get ``.<step>`` appended. None outside SLURM and in an
    interactive allocation (``salloc``: every command there shares the job id).
    """
    if "SLURM_JOB_ID" not in env or env.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
        return None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job = env["SLURM_JOB_ID"]
    step = env.get("SLURM_STEP_ID", "")
    if step.isdigit() and 0 < int(step) < _LAST_NUMBERED_STEP:
        job += f".{step}"
    return f"slurm-{job}"


def process_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's global rank when a launcher started it (torchrun's ``RANK``, srun's
    ``SLURM_PROCID``), before Lightning sets anything up; 0 otherwise. Lightning's own DDP
    children get their run dir and job name on the command line instead."""
    if "TORCHELASTIC_RUN_ID" in env:
        return int(env.get("RANK", "0"))
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in INTERACTIVE_JOB_NAMES:
        return int(env.get("SLURM_PROCID", "0"))
    return 0


def launched_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's rank as its launcher set it: torchrun, srun, or Lightning's own DDP children
    (``LOCAL_RANK`` on one node, ``NODE_RANK`` across nodes); 0 in the process a user started."""
    return max(process_rank(env), int(env.get("LOCAL_RANK", "0")), int(env.get("NODE_RANK", "0")))


def is_restart(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this job ran before: a requeued SLURM job or a torchrun restart."""
    return any(int(env.get(k) or 0) >= 1 for k in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"))


def claim_dir(parent: Path, name: str) -> Path:
    """Create ``parent/name`` atomically and return it; ``name_1``, ``name_2``, ... if it exists."""
    parent.mkdir(parents=True, exist_ok=True)
    suffix = 0
    while True:
        path = parent / (name if suffix == 0 else f"{name}_{suffix}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            suffix += 1


def _shared_through_torchrun_store(key: str, make) -> str:
    """Rank 0 calls ``make()`` once; every rank reads its result from torchrun's agent store
    (``MASTER_ADDR:MASTER_PORT``), which outlives worker restarts, so a restart gets it again."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=_STORE_TIMEOUT_S),
    )
    key = f"genexp/run_dir/{key}"
    if process_rank() == 0 and not store.check([key]):
        store.set(key, make())
    return store.get(key).decode()


def run_dir(parent: str) -> str:
    """The ``genexp_run_dir`` resolver: ``<parent>/<this job's name>`` (see the module doc)."""
    env = os.environ
    run_id = env.get("TORCHELASTIC_RUN_ID")  # first: torchrun may itself run inside a SLURM job
    if run_id is not None and run_id != "none":
        return f"{parent}/torchrun-{run_id}"

    def claim() -> str:
        return str(claim_dir(Path(parent), time.strftime(TIMESTAMP)))

    if run_id == "none":
        # torchrun without --rdzv-id (or --standalone): no shared name, so rank 0 claims one
        if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            raise GenexpError(
                "torchrun without a run id: pass --rdzv-id=<unique id> (or --standalone) so every "
                "rank finds the same run dir"
            )
        return _shared_through_torchrun_store(parent, claim)
    slurm = slurm_run_name(env)
    if slurm is not None:
        return f"{parent}/{slurm}"
    return claim()


def job_name(name: str) -> str:
    """The ``genexp_job_name`` resolver: ``name`` on rank 0 (its log is ``<name>.log``), else
    ``<name>_ddp_process_<rank>``, as Lightning names its DDP children."""
    rank = process_rank()
    return name if rank == 0 else f"{name}_ddp_process_{rank}"


def on_rank_zero(value):
    """The ``genexp_rank_zero`` resolver: ``value`` on rank 0, None elsewhere (``hydra.output_subdir``:
    only rank 0 writes ``.hydra/``)."""
    return value if process_rank() == 0 else None


def slurm_tasks(devices) -> int:
    """The ``genexp_slurm_tasks`` resolver: ``trainer.devices`` as srun tasks per node (an int).

    ``auto`` (``accelerator=ddp``) counts the GPUs of the submitting machine, taken to be a node like
    the ones it submits to; a login node without GPUs cannot know, so the run is refused."""
    if devices == "auto":
        import torch  # only when a SLURM sweep resolves its launcher, never for tab completion

        count = torch.cuda.device_count()
        if count > 0:
            return count
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise GenexpError(
            f"trainer.devices={devices}: hydra/launcher=slurm starts one task per device and needs "
            "their number (this machine has no GPU to count); pass trainer.devices=<GPUs per node>, "
            "e.g. trainer.devices=8"
        )
    return devices


def slurm_gpus(accelerator, devices) -> int | None:
    """The ``genexp_slurm_gpus`` resolver: GPUs per node to request (none for a CPU run)."""
    return None if str(accelerator) == "cpu" else slurm_tasks(devices)


RESOLVERS = {
    "genexp_run_dir": run_dir,
    "genexp_job_name": job_name,
    "genexp_rank_zero": on_rank_zero,
    "genexp_slurm_tasks": slurm_tasks,
    "genexp_slurm_gpus": slurm_gpus,
}


def register_resolvers() -> None:
    """Register the resolvers above with OmegaConf (idempotent). Cached: a config resolves its run
    dir once, and Hydra copies that cache into each sweep job's config (also into submitit jobs)."""
    from omegaconf import OmegaConf

    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "genexp_run_dir")
