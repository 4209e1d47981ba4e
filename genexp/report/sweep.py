"""The report's sweep section, when the folder is one sweep: its trials ranked by the objective.

- A search (``genexp train -m hparams_search=<recipe>``) leaves ``study.json`` in its sweep dir
  (:mod:`genexp.search`): the best trial's parameters, overrides and config, every trial sorted by
  the objective, the objective against each searched parameter and the optimisation history.
- A grid (``genexp train -m a=1,2 b=x,y``) leaves Hydra's ``multirun.yaml``: the same table, over the
  overrides that differ between its runs, and the objective per value of each.

The objective is each run's :func:`genexp.objective.objective_key` (``objective``, else the test split's
monitor metric) read from its ``metrics.json``. Pure Python (matplotlib only inside the figures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from genexp import layout
from genexp.objective import objective_key, objective_value
from genexp.plots import png_bytes
from genexp.report.collect import Run, as_dict, number, read_json
from genexp.report.columns import Column, Figure, fmt

PARAMS_IMAGE = "images/sweep_params.png"  # genexp.report.files.OWNED_NAME lists both
HISTORY_IMAGE = "images/sweep_history.png"
MULTIRUN_YAML = "multirun.yaml"  # Hydra writes it in a grid sweep's dir
MAX_PANELS = 9  # parameters plotted, at most


@dataclass
class Trial:
    """One row of the sweep table: a search's trial, or one run of a grid."""

    label: str  # "#3" (a trial's number) or the run dir's name
    state: str  # a trial's state (COMPLETE, FAIL, RUNNING) or a run's (finished, failed, unfinished)
    value: float | None  # the objective
    params: dict[str, Any]
    run: Run | None = None
    error: str = ""
    key: str = ""  # the objective's name, where a grid's runs have different ones (families' monitors)

    @property
    def done(self) -> bool:
        return self.value is not None and math.isfinite(self.value)


@dataclass
class SweepSection:
    kind: str  # search | grid
    objective: str
    direction: str  # minimize | maximize
    keys: list[str]  # the searched parameters, or the overrides that differ between runs
    trials: list[Trial]  # best first; unfinished and failed ones last
    columns: list[Column]
    figures: list[Figure]
    note: str
    space: dict = field(default_factory=dict)  # study.json's search space: each axis (log, categorical)
    best_overrides: list[str] = field(default_factory=list)
    best_config: str = ""

    @property
    def best(self) -> Trial | None:
        return self.trials[0] if self.trials and self.trials[0].done else None


def _value_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _columns(kind: str, keys: list[str], objective: str, direction: str) -> list[Column]:
    first = "trial" if kind == "search" else "run"
    arrow = " ↑" if direction == "maximize" else " ↓"
    return [
        Column(first, lambda t: t.label),
        Column("state", lambda t: t.state),
        Column(
            f"{objective}{arrow}" if objective else "objective",
            lambda t: f"{t.key} {fmt(t.value, 5)}" if t.key else fmt(t.value, 5),
        ),
        *(Column(key, lambda t, key=key: _value_cell(t.params.get(key, "—"))) for key in keys),
        Column("run dir", lambda t: t.run.name if t.run else "—"),
        Column("note", lambda t: t.error),
    ]


def ranked(trials: list[Trial], direction: str) -> list[Trial]:
    """Best first (the direction's way), then the trials without an objective, by label order."""
    sign = -1.0 if direction == "maximize" else 1.0
    done = sorted((t for t in trials if t.done), key=lambda t: sign * t.value)
    return done + [t for t in trials if not t.done]


def _run_of(path: Any, root: Path, runs: dict[Path, Run]) -> Run | None:
    """The run a trial's recorded run dir names: by path, else by its name under ``root`` (a sweep
    dir that was moved or copied)."""
    if not isinstance(path, str) or not path:
        return None
    recorded = Path(path)
    return runs.get(recorded.resolve()) or runs.get((root / recorded.name).resolve())


def read_search(root: Path, study: dict, runs: list[Run]) -> SweepSection:
    """The section of a search from its ``study.json``."""
    by_path = {run.path.resolve(): run for run in runs}
    space = as_dict(study.get("search_space"))
    direction = "maximize" if study.get("direction") == "maximize" else "minimize"
    trials = []
    for raw in study.get("trials") if isinstance(study.get("trials"), list) else []:
        raw = as_dict(raw)
        trials.append(
            Trial(
                label=f"#{raw.get('number', '?')}",
                state=str(raw.get("state", "?")),
                value=number(raw.get("value")),
                params=as_dict(raw.get("params")),
                run=_run_of(raw.get("run_dir"), root, by_path),
                error=str(raw.get("error") or ""),
            )
        )
    objective = str(study.get("objective") or "")
    keys = [str(k) for k in space] or sorted({k for t in trials for k in t.params})
    failed = sum(t.state == "FAIL" for t in trials)
    note = (
        f"Optuna study {study.get('study_name', '?')} ({study.get('sampler', '?')}, {direction} {objective}): "
        f"{len(trials)} trials of {study.get('n_trials', '?')}, {failed} failed; storage {study.get('storage', '?')}. "
        "Rerun the same genexp train -m command to continue it."
    )
    return _section("search", objective, direction, keys, trials, note, space)


def _overrides(run: Run) -> dict[str, str]:
    try:
        listed = yaml.safe_load(layout.overrides_yaml(run.path).read_text(encoding="utf-8")) or []
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    pairs = [str(o).split("=", 1) for o in listed if isinstance(o, str) and "=" in o]
    return {k.lstrip("+~"): v for k, v in pairs}


def read_grid(root: Path, runs: list[Run]) -> SweepSection:
    """The section of a grid sweep: the overrides that differ between its runs."""
    configs = {run.path: _config(run) for run in runs}
    overrides = {run.path: _overrides(run) for run in runs}
    keys = sorted({k for o in overrides.values() for k in o})
    keys = [k for k in keys if len({o.get(k) for o in overrides.values()}) > 1]
    objectives = {objective_key(configs[run.path]) for run in runs}
    objective = objectives.pop() if len(objectives) == 1 else ""
    direction = "minimize"
    trials = [
        Trial(
            label=run.name,
            state=run.status,
            value=objective_value(configs[run.path], run.metrics) if run.metrics else None,
            params={k: _parsed(overrides[run.path].get(k, "—")) for k in keys},
            run=run,
            error=run.error,
            key="" if objective else objective_key(configs[run.path]),
        )
        for run in runs
    ]
    note = f"Grid sweep of {len(runs)} runs over {', '.join(keys) or 'no differing override'}" + (
        f"; ranked by {objective} ({direction})."
        if objective
        else "; the runs' objectives differ (not ranked)."
    )
    return _section("grid", objective, direction, keys, trials, note, {})


def _config(run: Run) -> dict:
    try:
        value = yaml.safe_load(layout.config_yaml(run.path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def _parsed(text: str) -> Any:
    """An override's value as a number where it is one (for the plot's axis), else the text."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _section(kind, objective, direction, keys, trials, note, space) -> SweepSection:
    trials = ranked(trials, direction) if objective else trials
    columns = _columns(kind, keys, objective, direction)
    section = SweepSection(kind, objective, direction, keys, trials, columns, [], note, space)
    best = section.best
    if best is not None and best.run is not None:
        section.best_overrides = [f"{k}={v}" for k, v in _overrides(best.run).items()]
        try:
            section.best_config = layout.config_yaml(best.run.path).read_text(encoding="utf-8")
        except OSError:
            section.best_config = ""
    return section


def read_section(root: Path, runs: list[Run]) -> SweepSection | None:
    """The sweep section of ``root``: a search (``study.json``), a grid (``multirun.yaml``), or None."""
    study = read_json(root / layout.STUDY_JSON, "the report shows no search section")
    if study is not None:
        return read_search(root, study, runs)
    if (root / MULTIRUN_YAML).is_file() and len(runs) > 1:
        return read_grid(root, runs)
    return None


def section_files(root: Path, runs: list[Run]) -> tuple[dict[str, bytes], SweepSection | None]:
    """The section and its figures (``{relative path: PNG bytes}``)."""
    section = read_section(root, runs)
    # no figure without values, nor where they measure different things (a grid over families)
    if section is None or not section.objective or not any(t.done for t in section.trials):
        return {}, section
    files = {PARAMS_IMAGE: params_figure(section)}
    section.figures.append(
        Figure(PARAMS_IMAGE, f"{section.objective or 'objective'} against each parameter", "sweep")
    )
    if section.kind == "search":
        files[HISTORY_IMAGE] = history_figure(section)
        section.figures.append(Figure(HISTORY_IMAGE, "optimisation history", "sweep"))
    return files, section


def _order(value: Any) -> tuple:
    """Numbers before text, each in its own order (a grid's 2, 8, 16, not "16", "2", "8")."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _pyplot():
    import matplotlib  # here, not at module top: a report without a sweep never loads it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def params_figure(section: SweepSection) -> bytes:
    """The objective against each parameter (a scatter; categories and text values as positions),
    the best trial in red."""
    plt = _pyplot()
    keys = section.keys[:MAX_PANELS] or ["(none)"]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), dpi=80, squeeze=False)
    done = [t for t in section.trials if t.done]
    for ax, key in zip(axes.flat, keys):
        values = [t.params.get(key) for t in done]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        spec = as_dict(section.space.get(key))
        if numeric and spec.get("type") != "categorical":
            xs = [float(v) for v in values]
            if spec.get("log") or (min(xs) > 0 and max(xs) / min(xs) > 100):
                ax.set_xscale("log")
        else:
            choices = (
                spec.get("choices") if isinstance(spec.get("choices"), list) else sorted(values, key=_order)
            )
            order = list(dict.fromkeys(map(str, [*choices, *values])))
            xs = [order.index(str(v)) for v in values]
            ax.set_xticks(range(len(order)), order, fontsize=7)
        ax.scatter(xs, [t.value for t in done], s=18, c=["red" if t is section.best else "C0" for t in done])
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(section.objective or "objective", fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    return png_bytes(fig)


def history_figure(section: SweepSection) -> bytes:
    """Each trial's objective by trial number and the best so far (the optimisation history)."""
    plt = _pyplot()
    trials = sorted((t for t in section.trials if t.done), key=lambda t: int(t.label.lstrip("#")))
    numbers = [int(t.label.lstrip("#")) for t in trials]
    values = [t.value for t in trials]
    pick = max if section.direction == "maximize" else min
    best = [pick(values[: i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(5.5, 2.8), dpi=80)
    ax.scatter(numbers, values, s=18, label="trial")
    ax.step(numbers, best, where="post", color="red", label="best so far")
    failed = [int(t.label.lstrip("#")) for t in section.trials if t.state == "FAIL" and t.label[1:].isdigit()]
    for n in failed:
        ax.axvline(n, color="grey", alpha=0.3, lw=4)
    ax.set_xlabel("trial" + (" (grey: failed)" if failed else ""), fontsize=8)
    ax.set_ylabel(section.objective, fontsize=8)
    ax.legend(fontsize=7)
    return png_bytes(fig)
