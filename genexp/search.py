"""Optuna search through Hydra (``genexp train -m hparams_search=<recipe>``): a study kept in SQLite
beside its trials' run dirs, which the same command continues where it stopped.

hydra-optuna-sweeper (1.3) reads the search space (``hydra.sweeper.params``), builds the sampler and
turns a trial into overrides; :class:`StudySweeper` keeps that and replaces its loop:

- ``n_trials`` is the size of the study: a rerun runs only the trials still missing (the plugin's
  loop runs ``n_trials`` more on every call, restarting Hydra's job numbers);
- trial *k* runs as job *k* (``hydra.job.num``), so its run dir is its own on every rerun;
- a trial a killed sweep left running is run again under its own number and parameters, resumed from
  its run dir's ``last.ckpt`` when it has one, and told once: never counted twice;
- a failed trial (an error, a diverged run, a non-finite objective) is told FAIL and the sweep goes on;
- the sampler's seed moves on by the trials already in the study, so a rerun does not draw the
  parameters of the first call's first trials again;
- a search space that names a key (or group) the config lacks fails before any trial, in one line;
- ``study.json`` (every trial: number, state, objective, parameters, run dir) is rewritten after each
  trial: ``genexp report`` reads it, and needs no optuna.

The plugin's helpers (``_impl``) are private to it: pyproject pins the plugin to 1.3.x.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra_plugins.hydra_optuna_sweeper import _impl
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    IntLogUniformDistribution,
    LogUniformDistribution,
)
from optuna.trial import TrialState

from genexp import atomic, layout
from genexp.errors import GenexpError
from genexp.hydra_errors import describe
from genexp.objective import check_objective
from genexp.runlock import run_lock

log = logging.getLogger("genexp")

FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
RUN_DIR = "genexp_run_dir"  # trial user attributes genexp sets (the others are the plugin's fixed params)
ERROR = "genexp_error"
OWN_ATTRS = (RUN_DIR, ERROR)


class StudySweeper(_impl.OptunaSweeperImpl):
    """hydra-optuna-sweeper's configuration and helpers, genexp's resumable loop (module doc)."""

    def sweep(self, arguments: list[str]) -> None:
        space, fixed = self.parsed_space(list(arguments))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with run_lock(
            sweep_dir,
            key="hydra.sweep.dir",
            fix="wait until that search ends (or stop it), then run the same command to continue it",
        ):
            study = self.open_study(sweep_dir)
            record = Record(study, sweep_dir, self.summary(space))
            record.write()
            self.resume_interrupted(study, record)
            while (left := self.n_trials - finished(study)) > 0:
                trials = [study.ask() for _ in range(min(max(1, self.n_jobs), left))]
                overrides = self._configure_trials(trials, space, fixed)
                self.run_batch(study, trials, overrides, record)
            record.finish(self.config.hydra.sweep.dir)

    def parsed_space(self, arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, Any]]:
        """The plugin's search space (``params``, command-line sweeps) and fixed overrides, checked."""
        self._process_searchspace_config()
        space, fixed = _impl.create_params_from_overrides([*self._parse_sweeper_params_config(), *arguments])
        space = {**(self.search_space_distributions or {}), **space}
        if isinstance(self.sampler, functools.partial) and self.sampler.func is optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
        for name in fixed:
            space.pop(name, None)
        if len(self._get_directions()) != 1:
            raise GenexpError(
                f"hydra.sweeper.direction={self.direction}: genexp's search optimises one objective; "
                "give one direction (minimize or maximize)"
            )
        check_objective(self.config)
        self.check_composes(space, fixed)
        return space, fixed

    def check_composes(self, space: dict[str, BaseDistribution], fixed: dict[str, Any]) -> None:
        """Compose and check a trial's config before any trial runs (each parameter at its first
        value, and each other choice of a categorical one): a key the config lacks, a group option it
        does not have, a value genexp refuses, fails here, in one line."""
        first = {name: first_value(d) for name, d in space.items()}
        points = [first] + [
            {**first, name: choice}
            for name, d in space.items()
            if isinstance(d, CategoricalDistribution)
            for choice in d.choices[1:]
        ]
        from genexp.validate import validate

        for point in points:
            overrides = [f"{k}={v}" for k, v in {**point, **fixed}.items()]
            try:
                composed = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            except HydraException as err:
                line = describe(err) or str(err).strip().splitlines()[0]
                raise GenexpError(f"hydra.sweeper.params: {line}") from None
            try:  # what a trial checks before it trains: a missing option of an optional group, say
                with as_job(composed, Path(str(self.config.hydra.sweep.dir))) as task:
                    validate(task)
            except GenexpError as err:
                raise GenexpError(
                    f"hydra.sweeper.params at {' '.join(overrides[: len(point)])}: {err}"
                ) from None

    def open_study(self, sweep_dir: Path) -> optuna.Study:
        """The study (created, or loaded from ``storage`` to continue), its sampler's seed moved on."""
        if self.storage is None:
            log.warning("hydra.sweeper.storage=null: the study lives in memory, and a rerun starts it again")
        direction = self._get_directions()[0]
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its banners: the line below says it once
        study = optuna.create_study(
            study_name=self.study_name or sweep_dir.name,
            storage=self.storage,
            sampler=self.sampler,
            direction=direction,
            load_if_exists=True,
        )
        if study.direction.name.lower() != str(direction).lower():
            raise GenexpError(
                f"hydra.sweeper.direction={direction}: the study {study.study_name} in {self.storage} "
                f"was made to {study.direction.name.lower()}; keep its direction or name a new study"
            )
        done = len(study.trials)
        log.info("study %s (%s): %d trials so far", study.study_name, self.storage or "in memory", done)
        if done:
            study.sampler = reseeded(self.config.hydra.sweeper.get("sampler"), done) or study.sampler
        return study

    def summary(self, space: dict[str, BaseDistribution]) -> dict:
        """What ``study.json`` says of the search besides its trials."""
        return {
            "objective": check_objective(self.config),
            "direction": str(self._get_directions()[0]).lower(),
            "n_trials": self.n_trials,
            "storage": str(self.storage),
            "sampler": type(self.sampler).__name__,
            "search_space": {name: describe_distribution(d) for name, d in space.items()},
        }

    def resume_interrupted(self, study: optuna.Study, record: Record) -> None:
        """Run each trial a killed sweep left running again, under its own number (and run dir)."""
        for frozen in [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]:
            trial = optuna.trial.Trial(study, frozen._trial_id)  # the running trial, to tell it once
            if not frozen.params and record.summary["search_space"]:
                trial.set_user_attr(ERROR, "interrupted before its parameters were drawn")
                study.tell(trial, state=TrialState.FAIL)
                continue
            overrides = [f"{k}={v}" for k, v in frozen.params.items()]
            overrides += [f"{k}={v}" for k, v in frozen.user_attrs.items() if k not in OWN_ATTRS]
            run_dir = job_dir(Path(str(self.config.hydra.sweep.dir)), frozen.number)
            last = layout.last_ckpt(run_dir) if run_dir else None
            if last is not None and last.is_file():
                overrides.append(f"ckpt_path={last}")
            how = f"resuming it from {last}" if last is not None and last.is_file() else "running it again"
            log.info("trial %d was interrupted: %s", frozen.number, how)
            self.run_batch(study, [trial], [tuple(overrides)], record)

    def run_batch(self, study: optuna.Study, trials: list, overrides: list, record: Record) -> None:
        """Launch ``trials`` as jobs numbered like them, tell each its result, raise past the
        failure rate. A trial whose job could not even start (a bad override) is told FAIL."""
        numbers = [t.number for t in trials]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            for trial, override in zip(trials, overrides):
                self.run_batch(study, [trial], [override], record)
            return
        try:
            returns = self.launcher.launch(overrides, initial_job_idx=numbers[0])
        except Exception as err:
            for trial in trials:
                trial.set_user_attr(ERROR, one_line(err))
                study.tell(trial, state=TrialState.FAIL)
            record.write()
            raise
        failures = [line for trial, ret in zip(trials, returns) if (line := tell(study, trial, ret))]
        record.write()
        if failures and len(failures) / len(trials) > self.max_failure_rate:
            raise GenexpError(
                f"{len(failures)} of {len(trials)} trials failed (hydra.sweeper.max_failure_rate="
                f"{self.max_failure_rate}): {failures[0]}"
            )


@contextlib.contextmanager
def as_job(composed: DictConfig, sweep_dir: Path) -> Iterator[DictConfig]:
    """A composed trial config as Hydra's ``run_job`` hands it to the task (its Hydra config set,
    the ``hydra`` node removed), for :func:`genexp.validate.validate`; nothing is written."""
    from hydra.core.hydra_config import HydraConfig

    instance = HydraConfig.instance()
    previous = instance.cfg
    with open_dict(composed):
        composed.hydra.runtime.output_dir = str(sweep_dir.resolve() / "preflight")
        composed.hydra.job.num = -1
    instance.set_config(composed)
    task = composed.copy()
    with open_dict(task):
        del task["hydra"]
    try:
        yield task
    finally:
        instance.cfg = previous


def tell(study: optuna.Study, trial: optuna.trial.Trial, ret: JobReturn) -> str:
    """Tell ``trial`` its job's objective (COMPLETE) or failure (FAIL); the failure's line, or ""."""
    output_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
    if output_dir:
        trial.set_user_attr(RUN_DIR, str(output_dir))
    value, error = objective_of(ret)
    if error:
        trial.set_user_attr(ERROR, error)
        study.tell(trial, state=TrialState.FAIL)
        log.warning("trial %d failed: %s", trial.number, error)
        return error
    try:
        study.tell(trial, value)  # optuna stores the value and state even when the sampler raises after
    except RuntimeError as err:  # the grid sampler stops its study once the grid is done: no optimize() here
        if "Study.stop" not in str(err):
            raise
    log.info("trial %d: %.6g %s", trial.number, value, " ".join(f"{k}={v}" for k, v in trial.params.items()))
    return ""


def objective_of(ret: JobReturn) -> tuple[float, str]:
    """A job's objective and "", or nan and why it is none (the job's error, a diverged run)."""
    try:
        value = ret.return_value  # a failed job's exception, raised again here (Hydra logs its overrides)
    except Exception as err:  # noqa: BLE001 - any error of a trial fails that trial alone
        return math.nan, one_line(err)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan, f"the run returned {value!r}, not a number"
    if not math.isfinite(value):
        return value, f"the objective is {value} (a diverged run)"
    return value, ""


def finished(study: optuna.Study) -> int:
    return sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def first_value(distribution: BaseDistribution) -> Any:
    """A value of the distribution to compose a config with (its first choice, or its low end)."""
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[0]
    return distribution.low


def describe_distribution(distribution: BaseDistribution) -> dict:
    """``{"type": float|int|categorical, "log": bool, ...}`` for study.json (the report's axes)."""
    if isinstance(distribution, CategoricalDistribution):
        return {"type": "categorical", "choices": list(distribution.choices)}
    kind = "float" if isinstance(distribution.low, float) else "int"
    log_scale = isinstance(distribution, LogUniformDistribution | IntLogUniformDistribution)
    return {"type": kind, "low": distribution.low, "high": distribution.high, "log": log_scale}


def reseeded(node: DictConfig | None, offset: int) -> Any:
    """The sampler of ``node`` with ``seed + offset`` (None when it has no seed, or is a partial such
    as the grid sampler): a continued study draws new parameters, reproducibly."""
    from genexp.build import instantiate

    if node is None or node.get("seed") is None or node.get("_partial_"):
        return None
    node = node.copy()
    node.seed = int(node.seed) + offset
    return instantiate(node, "hydra.sweeper.sampler")


def job_dir(sweep_dir: Path, number: int) -> Path | None:
    """The run dir of job ``number`` under ``sweep_dir``: the one whose ``.hydra/hydra.yaml`` (data,
    written as the job starts) has that ``hydra.job.num``; None if it never started."""
    found = []
    for path in sweep_dir.glob(f"*/{layout.HYDRA_DIR}/{layout.HYDRA_YAML}"):
        try:
            job = ((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("job") or {}
        except (OSError, ValueError, yaml.YAMLError, AttributeError):
            continue
        if job.get("num") == number:
            found.append(path.parent.parent)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class Record:
    """``<sweep dir>/study.json``: the study as the report reads it, rewritten after each trial."""

    def __init__(self, study: optuna.Study, sweep_dir: Path, summary: dict):
        self.study, self.path, self.summary = study, sweep_dir / layout.STUDY_JSON, summary

    def trials(self) -> list[dict]:
        return [trial_record(t) for t in self.study.get_trials(deepcopy=False)]

    def write(self) -> None:
        atomic.write_json(
            self.path, {"study_name": self.study.study_name, **self.summary, "trials": self.trials()}
        )

    def finish(self, sweep_dir: str) -> None:
        """The plugin's ``optimization_results.yaml`` and a line on the best trial."""
        try:
            best = self.study.best_trial
        except ValueError:
            log.warning("study %s: no trial completed; see %s", self.study.study_name, self.path)
            return
        results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
        atomic.write_bytes(Path(sweep_dir) / "optimization_results.yaml", yaml.safe_dump(results).encode())
        log.info(
            "study %s: best trial %d, %s %.6g (%s); report: genexp report %s",
            self.study.study_name,
            best.number,
            self.summary["objective"],
            best.value,
            " ".join(f"{k}={v}" for k, v in best.params.items()),
            sweep_dir,
        )


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def trial_record(trial: optuna.trial.FrozenTrial) -> dict:
    value = trial.value if trial.state == TrialState.COMPLETE else None
    seconds = (
        (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else None
    )
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": value,
        "params": dict(trial.params),
        "run_dir": trial.user_attrs.get(RUN_DIR),
        "error": trial.user_attrs.get(ERROR),
        "started": _iso(trial.datetime_start),
        "seconds": seconds,
    }
