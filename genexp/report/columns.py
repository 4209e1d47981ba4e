"""What the report shows, once: each table as a list of columns, and the page's content.

A column is its header, the group it sits under (the talk's aspects) and how its cell is computed
from a row; the HTML and Markdown renderers both walk these lists, so a column added here appears
in both and the two cannot drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from genexp.report.collect import (
    COMPARE_JSON,
    DIVERSITY_COLLAPSE,
    RECALL_COLLAPSE,
    FamilyRow,
    Run,
    number,
    read_json,
)

if TYPE_CHECKING:
    from genexp.report.sweep import SweepSection

TALK = "talk"  # the header of a column that holds the talk's mark


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Any], str]  # the row (a FamilyRow or a Run) -> the cell's text
    group: str = ""  # the header over a run of columns ("Fidelity"); "" for none
    rating: bool = False  # the talk's ○/△/× mark, not a measured value


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}g}"


def fmt_pm(pair: tuple[float | None, float | None] | str) -> str:
    if isinstance(pair, str):
        return pair
    mean, std = pair
    if mean is None:
        return "—"
    return fmt(mean) + (f" ± {fmt(std, 2)}" if std is not None else "")


def _talk(aspect: str, group: str) -> Column:
    return Column(TALK, lambda row: row.ratings[aspect], group, rating=True)


def _mean(header: str, key: str, group: str) -> Column:
    return Column(header, lambda row: fmt(row.mean(key)), group)


LIKELIHOOD, STABILITY, FIDELITY, SPEED = "Likelihood", "Learning stability", "Fidelity", "Generation speed"
# the talk's Summary table, one group per aspect, measured values beside its marks
SUMMARY: list[Column] = [
    Column("family", lambda row: f"{row.label} ({row.family})"),
    Column("runs finished", lambda row: f"{row.finished}/{len(row.runs)}"),
    Column("test bpd ↓", lambda row: fmt_pm(row.bpd), LIKELIHOOD),
    _talk("likelihood", LIKELIHOOD),
    Column("FID std over seeds ↓", lambda row: fmt(row.fid[1]), STABILITY),
    Column("diverged", lambda row: str(row.diverged), STABILITY),
    Column("collapsed", lambda row: str(row.collapsed), STABILITY),
    _talk("stability", STABILITY),
    Column("FID ↓", lambda row: fmt(row.fid[0]), FIDELITY),
    _mean("KID ↓", "kid_mean", FIDELITY),
    _mean("precision ↑", "precision", FIDELITY),
    _mean("recall ↑", "recall", FIDELITY),
    _talk("fidelity", FIDELITY),
    _mean("samples/s ↑", "samples_per_sec", SPEED),
    _talk("speed", SPEED),
]


def _eval(header: str, key: str) -> Column:
    return Column(header, lambda run: fmt(run.eval(key)))


def _note(run: Run) -> str:
    state = "diverged" if run.diverged else "collapsed" if run.collapsed else ""
    return "; ".join(p for p in (run.error or state, run.sampling) if p)


RUNS: list[Column] = [
    Column("run", lambda run: run.name),
    Column("family", lambda run: run.family),
    Column("seed", lambda run: fmt(run.seed)),
    Column("status", lambda run: run.status),
    Column("epochs", lambda run: fmt(run.metrics.get("epochs"))),
    Column("steps", lambda run: fmt(run.metrics.get("global_step"))),
    Column("fit s", lambda run: fmt(number(run.metrics.get("fit_time_s")), 3)),
    Column("bpd", lambda run: fmt(run.bpd)),
    _eval("FID", "fid"),
    _eval("KID", "kid_mean"),
    _eval("precision", "precision"),
    _eval("recall", "recall"),
    _eval("diversity", "diversity"),
    _eval("samples/s", "samples_per_sec"),
    Column("note", _note),
]


def cells(columns: list[Column], row: Any) -> list[str]:
    return [column.cell(row) for column in columns]


def summary_cells(row: FamilyRow) -> list[str]:
    """The summary table's cells for one family, in column order (see :data:`SUMMARY`)."""
    return cells(SUMMARY, row)


def groups(columns: list[Column]) -> list[tuple[str, int]]:
    """``[(group, number of adjacent columns)]``: the row of headers above the columns' own."""
    spans: list[tuple[str, int]] = []
    for column in columns:
        if spans and spans[-1][0] == column.group:
            spans[-1] = (column.group, spans[-1][1] + 1)
        else:
            spans.append((column.group, 1))
    return spans


class Figure(NamedTuple):
    src: str  # relative to the report folder
    caption: str
    kind: str  # samples | curves | nfe (the image's CSS class)


@dataclass
class NFESection:
    """Quality against compute: every run's FID-vs-NFE sweep in one figure, a table (a column
    group per NFE) and, for each pair of curves, where one overtakes the other
    (:mod:`genexp.report.nfe` builds it)."""

    figure: Figure
    columns: list[Column]
    runs: list[Run]  # those with a sweep, one table row each
    crossings: list[str]
    note: str


@dataclass
class Page:
    """Everything on the page, rendered alike by ``html.page`` and ``markdown.page``."""

    title: str
    setup: str
    notes: str
    families: list[FamilyRow]
    runs: list[Run]
    gallery: list[tuple[Run, list[Figure]]]
    nfe: NFESection | None = None  # None: no run has a sweep, and the section is left out
    sweep: SweepSection | None = None  # the folder is one -m sweep: its trials ranked (genexp.report.sweep)


def provenance(runs: list[Run]) -> str:
    """How FID was computed (features, sample and reference counts), from the evaluations."""
    seen = []
    for run in runs:
        m = run.evaluation.get("metrics") or {}
        if "eval/fid_num_samples" in m:
            line = (
                f"FID/KID/precision/recall in {m.get('eval/fid_features', '?')} feature space, "
                f"{m.get('eval/fid_num_samples')} samples against {m.get('eval/fid_num_real')} real images "
                f"({m.get('eval/fid_reference', '?')})"
            )
            if line not in seen:
                seen.append(line)
    return "; ".join(seen) or "no evaluations yet (run genexp evaluate, or genexp compare)"


def notes(rows: list[FamilyRow], runs: list[Run]) -> str:
    """What the summary's columns measure; which families the talk leaves unrated comes from their
    metadata."""
    unrated = [row.label for row in rows if row.meta is None or not row.meta.rated]
    names = ", ".join(unrated[:-1]) + (" and " if len(unrated) > 1 else "") + (unrated[-1] if unrated else "")
    not_rated = f"; {names} {'is' if len(unrated) == 1 else 'are'} not rated there: —" if unrated else ""
    return (
        f"Measured values beside the talk's ○/△/× ratings (its Summary table{not_rated}). "
        "Likelihood: mean ± std of bits/dim on the test split "
        "(an exact value for flows and autoregressive models, an upper bound for variational and diffusion "
        "models; n/a for families without one). "
        "Learning stability: the standard deviation of FID across seeds, the runs that diverged "
        "(failed, or non-finite metrics or samples) and the runs that collapsed "
        f"(recall < {RECALL_COLLAPSE} or sample diversity < {DIVERSITY_COLLAPSE} of the data's). "
        f"Fidelity: means over seeds; {provenance(runs)}. Generation speed: samples per second at a fixed batch "
        "on the evaluation device."
    )


def setup_line(root: Path, runs: list[Run], families: int) -> str:
    meta = read_json(root / COMPARE_JSON, "the setup line leaves out the seeds and budget") or {}
    line = f"{len(runs)} runs of {families} families"
    seeds, budget = meta.get("seeds"), number(meta.get("budget_minutes"))
    if seeds is not None and budget is not None:
        line += f", seeds {seeds}, {budget:g} min budget each"
    return line + f"; generated {time.strftime('%Y-%m-%d %H:%M')}"
