"""The report's "Quality against compute (NFE)" section, from each run's ``nfe_sweep``.

Few-step solvers trade fidelity for network evaluations, and which family wins depends on the
budget: one figure (:func:`genexp.plots.nfe_figure`: FID against NFE and against ms/sample), a
table with one column group per NFE, and for each pair of curves the NFE from which one overtakes
the other, computed from the rows at the NFEs both were asked for. Pure Python (matplotlib only
inside the figure).
"""

from __future__ import annotations

from itertools import combinations, groupby

from genexp.plots import NFECurve, nfe_figure
from genexp.report.collect import Run, Sweep, SweepRow
from genexp.report.columns import Column, Figure, NFESection, fmt

IMAGE = "images/nfe_sweep.png"  # in the report folder (genexp.report.files.OWNED_NAME lists it)
HOW = "genexp evaluate ckpt=<run> nfe='[4,8,16,32,64]'"  # how a run gets a sweep


def label(run: Run) -> str:
    """The curve's legend: ``<family label> · <solver or sampler> · <run name>``."""
    family = run.meta.label if run.meta else run.family
    return f"{family} · {run.sweep.name} · {run.name}"


def short_names(runs: list[Run]) -> list[str]:
    """``<model option>·<solver or sampler>`` for each run, with the run's name added where two
    runs would read alike (seeds of one family)."""
    names = [f"{run.family}·{run.sweep.name}" for run in runs]
    return [f"{n} ({run.name})" if names.count(n) > 1 else n for n, run in zip(names, runs, strict=True)]


def _nfes(values) -> str:
    return ", ".join(f"{n:g}" for n in values)


def crossing(a: str, sweep_a: Sweep, b: str, sweep_b: Sweep) -> str:
    """Where curve ``a`` and curve ``b`` cross, in one sentence: lower FID is better, compared at
    each NFE asked of both (a tie counts for neither)."""
    fid_a = {r.nfe_requested: r.fid for r in sweep_a.rows}
    fid_b = {r.nfe_requested: r.fid for r in sweep_b.rows}
    shared = sorted(fid_a.keys() & fid_b.keys())
    if not shared:
        return f"{a} and {b} share no NFE: not compared"
    ahead = [a if fid_a[n] < fid_b[n] else b if fid_b[n] < fid_a[n] else "" for n in shared]
    # runs of one leader: [(leader, [nfe, ...]), ...] in NFE order
    spans = [(who, [n for _, n in group]) for who, group in groupby(zip(ahead, shared), key=lambda p: p[0])]
    if len(spans) == 1:
        who = spans[0][0]
        if not who:
            return f"{a} and {b} tie at every NFE both have ({_nfes(shared)})"
        return f"{who} beats {b if who == a else a} at every NFE both have ({_nfes(shared)})"
    if len(spans) == 2 and all(who for who, _ in spans):
        (first, before), (second, after) = spans
        return (
            f"{second} beats {first} from NFE {after[0]:g} on "
            f"({first} is ahead up to NFE {before[-1]:g}: the curves cross between NFE {before[-1]:g} "
            f"and {after[0]:g})"
        )
    leaders = sorted({who for who in ahead}, key=[a, b, ""].index)
    parts = [
        f"{who or 'tie'} at NFE {_nfes(n for n, w in zip(shared, ahead, strict=True) if w == who)}"
        for who in leaders
    ]
    return f"{a} and {b} cross more than once: " + "; ".join(parts)


def _row(run: Run, nfe: float) -> SweepRow | None:
    return next((r for r in run.sweep.rows if r.nfe_requested == nfe), None)


def _fid_cell(run: Run, nfe: float) -> str:
    row = _row(run, nfe)
    if row is None:
        return "—"
    spent = f" (NFE {row.nfe:g})" if row.nfe != row.nfe_requested else ""
    return fmt(row.fid) + spent


def _ms_cell(run: Run, nfe: float) -> str:
    row = _row(run, nfe)
    return "—" if row is None else fmt(row.ms_per_sample)


def columns(nfes: list[float]) -> list[Column]:
    """family, solver or sampler, run, then FID and ms/sample under each NFE asked for."""
    out = [
        Column("family", lambda run: run.meta.label if run.meta else run.family),
        Column("solver / sampler", lambda run: f"{run.sweep.name} ({run.sweep.option})"),
        Column("run", lambda run: run.name),
    ]
    for n in nfes:
        out.append(Column("FID ↓", lambda run, n=n: _fid_cell(run, n), f"NFE {n:g}"))
        out.append(Column("ms/sample ↓", lambda run, n=n: _ms_cell(run, n), f"NFE {n:g}"))
    return out


def _note(runs: list[Run]) -> str:
    note = (
        "FID at each NFE the evaluation asked for (the NFE spent in brackets where the solver spent "
        "another number) and the wall-clock milliseconds per sample on the evaluation device; the figure "
        "draws FID against the NFE spent (left) and against ms/sample (right)."
    )
    missing = [run.name for run in runs if run.sweep is None and run.status == "finished"]
    if missing:
        note += f" No sweep in {', '.join(missing)}: {HOW} adds one."
    return note


def section(runs: list[Run]) -> tuple[dict[str, bytes], NFESection | None]:
    """The section's image file and content; ``({}, None)`` when no run has a sweep."""
    swept = sorted((r for r in runs if r.sweep is not None), key=lambda r: (label(r).lower(), r.name))
    if not swept:
        return {}, None
    curves = [
        NFECurve(
            label(run),
            nfe=[r.nfe for r in run.sweep.rows],
            ms_per_sample=[r.ms_per_sample for r in run.sweep.rows],
            fid=[r.fid for r in run.sweep.rows],
        )
        for run in swept
    ]
    names = short_names(swept)
    pairs = combinations(zip(names, swept, strict=True), 2)
    content = NFESection(
        figure=Figure(IMAGE, "FID against NFE and against ms/sample", "nfe"),
        columns=columns(sorted({r.nfe_requested for run in swept for r in run.sweep.rows})),
        runs=swept,
        crossings=[crossing(a, ra.sweep, b, rb.sweep) for (a, ra), (b, rb) in pairs],
        note=_note(runs),
    )
    return {IMAGE: nfe_figure(curves, "quality against compute")}, content
