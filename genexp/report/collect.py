"""The report's input: find the run dirs under a folder and read each one, tolerating bad files.

A report of many runs must not stop at one hand-edited or half-written file: an unreadable
``metrics.json`` or ``evaluation.json`` is skipped with a warning naming it, and the run is listed
with what could be read. Pure Python (no torch, Lightning or Hydra).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from genexp import families, layout
from genexp.families import ASPECTS, NOT_RATED, Family

log = logging.getLogger("genexp")

# a finished run counts as collapsed when its samples cover almost none of the data
RECALL_COLLAPSE = 0.05  # recall (Kynkaanniemi et al. 2019) below this
DIVERSITY_COLLAPSE = 0.2  # pixel-space diversity ratio (genexp.metrics.diversity) below this
NA = "n/a"  # a metric the family cannot have (genexp evaluate writes it too)
CSV_LOG = Path(layout.CSV_DIR) / layout.METRICS_CSV  # the csv logger's file in a run dir
COMPARE_JSON = "compare.json"  # in a genexp compare dir: the seeds and budget


def read_json(path: Path, consequence: str = "it is left out") -> dict | None:
    """A JSON object from ``path``; None if missing, or (with a warning naming the file) unreadable,
    corrupt or not an object: one bad file must not stop a report of many runs."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(value, dict):
            raise ValueError(f"a JSON {type(value).__name__}, not an object")
        return value
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.warning("report: skipping %s (%s: %s); %s", path, type(err).__name__, err, consequence)
        return None


def _read_yaml(path: Path) -> dict:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as err:
        log.warning(
            "report: skipping %s (%s); the run's family and seed are guessed", path, type(err).__name__
        )
        return {}
    return value if isinstance(value, dict) else {}


def as_dict(value: Any) -> dict:
    """``value`` if it is a mapping, else {} (a hand-edited file may hold anything)."""
    return value if isinstance(value, dict) else {}


def number(value: Any) -> float | None:
    """A finite number, or None (missing, ``n/a``, ``nan`` strings)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _nonfinite(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in ("nan", "inf", "-inf")
    return isinstance(value, float) and not math.isfinite(value)


class SweepRow(NamedTuple):
    """One NFE of a sweep: the NFE asked for, the NFE spent (an adaptive or second-order solver may
    spend another number) and what it cost and scored there."""

    nfe_requested: float
    nfe: float
    fid: float
    ms_per_sample: float


@dataclass(frozen=True)
class Sweep:
    """``evaluation.json``'s ``nfe_sweep``: the run's solver or sampler (its class name) and its rows,
    ascending by NFE spent."""

    option: str  # solver | sampler
    name: str
    rows: tuple[SweepRow, ...]


def _sweep_row(raw: Any) -> SweepRow | str:
    """A row of finite numbers, or why not (a hand-edited file may hold anything). The NFE spent
    stands in for the NFE asked, and the reverse, where a row holds only one of them."""
    raw = as_dict(raw)
    requested, spent = number(raw.get("nfe_requested")), number(raw.get("nfe"))
    values = {
        "nfe": spent if spent is not None else requested,
        "fid": number(raw.get("fid")),
        "ms_per_sample": number(raw.get("ms_per_sample")),
    }
    missing = [k for k, v in values.items() if v is None]
    if missing:
        return f"no finite {', '.join(missing)}"
    return SweepRow(values["nfe"] if requested is None else requested, **values)


def read_sweep(value: Any, path: Path) -> Sweep | None:
    """The ``nfe_sweep`` of the evaluation at ``path``; None when absent. Rows that are not finite
    numbers (or repeat an NFE) are skipped with a warning naming the file; a sweep with no row
    left is left out with one."""
    if value is None:
        return None
    node = as_dict(value)
    raw_rows = node.get("rows")
    if not isinstance(raw_rows, list):
        log.warning("report: skipping %s's nfe_sweep (no list of rows); no NFE curve for this run", path)
        return None
    rows: dict[float, SweepRow] = {}
    for i, raw in enumerate(raw_rows):
        row = _sweep_row(raw)
        if isinstance(row, SweepRow) and row.nfe_requested in rows:
            row = f"NFE {row.nfe_requested:g} again"
        if isinstance(row, str):
            log.warning("report: skipping row %d of %s's nfe_sweep (%s)", i, path, row)
            continue
        rows[row.nfe_requested] = row
    if not rows:
        log.warning(
            "report: skipping %s's nfe_sweep (no row with finite numbers); no NFE curve for this run", path
        )
        return None
    option, name = node.get("option"), node.get("name")
    return Sweep(
        option=option if option in ("solver", "sampler") else "?",
        name=name if isinstance(name, str) and name else "?",
        rows=tuple(sorted(rows.values(), key=lambda r: (r.nfe, r.nfe_requested))),
    )


@dataclass
class Run:
    """One run dir, as read from disk; ``meta`` is its family's metadata where genexp knows it."""

    path: Path
    family: str
    seed: int | None
    dataset: str
    status: str  # finished | failed | unfinished
    error: str = ""
    metrics: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    grid: Path | None = None
    csv: Path | None = None
    meta: Family | None = None
    sweep: Sweep | None = None  # the evaluation's FID against NFE (genexp evaluate nfe=[...])

    @property
    def name(self) -> str:
        return self.path.name

    def eval(self, key: str) -> Any:
        return as_dict(self.evaluation.get("metrics")).get(f"eval/{key}")

    @property
    def sampling(self) -> str:
        """How the evaluation sampled, where it matters (a diffusion sampler, temperature, truncation)."""
        sampling = as_dict(as_dict(self.evaluation.get("provenance")).get("sampling"))
        parts = [f"{k} {v:g}" for k, v in sampling.items() if k != "sampler" and isinstance(v, int | float)]
        sampler = sampling.get("sampler")
        if isinstance(sampler, dict):
            steps = sampler.get("steps")
            parts.insert(0, f"{sampler.get('name', '?')}" + (f" ({steps} steps)" if steps else ""))
        return ", ".join(parts)

    @property
    def bpd(self) -> float | str | None:
        """Evaluated bits/dim, else the run's test/bpd; ``n/a`` for a family without a likelihood:
        its evaluation says so, or its test metrics hold no ``test/bpd``."""
        value = self.eval("bpd")
        if value == NA:
            return NA
        if number(value) is not None:
            return float(value)
        test = as_dict(self.metrics.get("test"))
        if "test/bpd" in test:
            return number(test["test/bpd"])
        return NA if test else None

    @property
    def diverged(self) -> bool:
        """Failed (a non-finite loss stops a run), or non-finite test metrics, samples or FID."""
        if self.status == "failed":
            return True
        test = as_dict(self.metrics.get("test"))
        if any(_nonfinite(v) for v in test.values()):
            return True
        return bool(self.eval("nonfinite_samples")) or _nonfinite(self.eval("fid"))

    @property
    def collapsed(self) -> bool:
        if self.status != "finished" or self.diverged:
            return False
        recall, diversity = number(self.eval("recall")), number(self.eval("diversity"))
        return (recall is not None and recall < RECALL_COLLAPSE) or (
            diversity is not None and diversity < DIVERSITY_COLLAPSE
        )


def find_run_dirs(root: Path) -> list[Path]:
    """Run dirs (holding ``.hydra/config.yaml``) at or below ``root`` (a few levels)."""
    pattern = f"**/{layout.HYDRA_DIR}/{layout.CONFIG_YAML}"
    found = [p.parent.parent for p in root.glob(pattern) if len(p.relative_to(root).parts) <= 6]
    return sorted(set(found))


def _family_of(choice: Any, model: dict) -> tuple[str, Family | None]:
    """The run's model option (Hydra's choice, else its class name) and that family's metadata:
    the installed option of that name, else the family whose ``_target_`` the stored config names."""
    target = str(model.get("_target_", "?"))
    name = str(choice or target.rsplit(".", 1)[-1].lower())
    meta = families.get(name) if name in families.names() else families.of_model_config(model)
    return name, meta


def _status(metrics: dict | None, failed: dict | None) -> tuple[str, str]:
    if metrics:
        return "finished", ""
    if failed:
        return "failed", str(failed.get("error", ""))
    return "unfinished", ""


def read_run(path: Path) -> Run:
    config = _read_yaml(layout.config_yaml(path))
    runtime = as_dict(
        as_dict(_read_yaml(path / layout.HYDRA_DIR / layout.HYDRA_YAML).get("hydra")).get("runtime")
    )
    choices = as_dict(runtime.get("choices"))
    family, meta = _family_of(choices.get("model"), as_dict(config.get("model")))
    dataset = str(
        choices.get("dataset") or str(as_dict(config.get("dataset")).get("_target_", "?")).rsplit(".", 1)[-1]
    )
    metrics = read_json(path / layout.METRICS_JSON, "the run is listed as unfinished")
    status, error = _status(metrics, read_json(path / layout.COMPARE_FAILED))
    evaluation = read_json(path / layout.EVALUATION_JSON, "the run's evaluation is left out") or {}
    if evaluation.get("error"):
        error = f"evaluation: {evaluation['error']}"
    grids = sorted((path / layout.SAMPLES).glob("epoch_*_samples.png"))
    csv_path = path / CSV_LOG
    return Run(
        path=path,
        family=family,
        seed=config.get("seed") if isinstance(config.get("seed"), int) else None,
        dataset=dataset,
        status=status,
        error=error,
        metrics=metrics or {},
        evaluation=evaluation,
        grid=grids[-1] if grids else None,
        csv=csv_path if csv_path.is_file() else None,
        meta=meta,
        sweep=read_sweep(evaluation.get("nfe_sweep"), path / layout.EVALUATION_JSON),
    )


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class FamilyRow:
    """The talk's four columns, measured, for one family (aggregated over its runs)."""

    family: str
    runs: list[Run]

    @property
    def meta(self) -> Family | None:
        return next((r.meta for r in self.runs if r.meta is not None), None)

    @property
    def label(self) -> str:
        return self.meta.label if self.meta else self.family

    @property
    def ratings(self) -> dict[str, str]:
        """The talk's mark for each aspect (:data:`genexp.families.ASPECTS`); — where not rated."""
        return dict(self.meta.ratings) if self.meta else dict.fromkeys(ASPECTS, NOT_RATED)

    def values(self, key: str) -> list[float]:
        return [v for r in self.runs if r.status == "finished" and (v := number(r.eval(key))) is not None]

    @property
    def finished(self) -> int:
        return sum(r.status == "finished" for r in self.runs)

    @property
    def bpd(self) -> tuple[float | None, float | None] | str:
        values = [r.bpd for r in self.runs if r.status == "finished"]
        numbers = [v for v in values if isinstance(v, float)]
        if not numbers:
            return NA if NA in values else (None, None)
        return mean_std(numbers)

    @property
    def fid(self) -> tuple[float | None, float | None]:
        return mean_std(self.values("fid"))

    @property
    def diverged(self) -> int:
        return sum(r.diverged for r in self.runs)

    @property
    def collapsed(self) -> int:
        return sum(r.collapsed for r in self.runs)

    def mean(self, key: str) -> float | None:
        return mean_std(self.values(key))[0]


def summarize(runs: list[Run]) -> list[FamilyRow]:
    """One row per family, ordered by label (so related families sit together: the flows, the
    autoregressive models), then by name."""
    rows = [FamilyRow(f, [r for r in runs if r.family == f]) for f in {r.family for r in runs}]
    return sorted(rows, key=lambda row: (row.label.lower(), row.family))


def read_curves(path: Path) -> dict[str, list[tuple[float, float]]]:
    """``{column: [(x, value)]}`` from a Lightning CSV log; train columns against step, val against
    epoch. A log that cannot be read gives no curves and a warning naming it."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return _curves(csv.DictReader(f))
    except (OSError, ValueError, csv.Error) as err:
        log.warning(
            "report: skipping %s (%s: %s); no loss curves for this run", path, type(err).__name__, err
        )
        return {}


def _curves(rows) -> dict[str, list[tuple[float, float]]]:
    """Finite values of the train/ and val/ columns of a CSV log's rows, against step or epoch."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        for key, raw in row.items():
            if not key or not raw or not (key.startswith("train/") or key.startswith("val/")):
                continue
            axis = row.get("step") if key.startswith("train/") else row.get("epoch")
            try:
                x, y = float(axis), float(raw)
            except (TypeError, ValueError):
                continue
            if math.isfinite(y):
                curves.setdefault(key, []).append((x, y))
    return curves
