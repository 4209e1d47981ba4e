"""The comparison report: the talk's summary table with measured values, from existing run dirs.

``write_report(root)`` finds every run dir under ``root`` (a ``genexp compare`` dir, a Hydra sweep
dir, or any folder of run dirs), reads each run's ``metrics.json``, ``evaluation.json`` (with its
FID-vs-NFE sweep, if any), CSV log and sample grids (:mod:`.collect`), and writes ``index.html``
and ``report.md`` (plus ``images/``) into the report folder: one column spec (:mod:`.columns`)
rendered twice (:mod:`.html`, :mod:`.markdown`), with every run's sweep in one figure and table
(:mod:`.nfe`), and, when the folder is one ``-m`` sweep, its trials ranked by the objective
(:mod:`.sweep`: a search's best trial, parameter scatter and history; a grid's metric per value). Families are grouped by their ``model`` option, labelled and rated from their
metadata (:mod:`genexp.families`); every number is an aggregate over seeds.

Only files the report wrote itself are written, replaced or removed (:mod:`.files`: its manifest);
a run file that cannot be read (a corrupt ``metrics.json``) is skipped with a warning naming it.
Imports neither Lightning nor Hydra (matplotlib only when it plots).
"""

from __future__ import annotations

import logging
from pathlib import Path

from genexp.errors import GenexpError
from genexp.report import html, markdown
from genexp.report.collect import find_run_dirs, read_run, summarize
from genexp.report.columns import Page, notes, setup_line
from genexp.report.files import MANIFEST, check_overwrites, commit_files, owned_files, report_folder
from genexp.report.gallery import gallery_files
from genexp.report.nfe import section as nfe_section
from genexp.report.sweep import section_files

__all__ = ["MANIFEST", "write_report"]

log = logging.getLogger("genexp")


def _run_dirs(root: Path, out: Path) -> list[Path]:
    """The run dirs under ``root``, less any inside the report folder itself."""
    if not root.is_dir():
        raise GenexpError(f"report: {root}: no such folder")
    paths = [p for p in find_run_dirs(root) if out not in p.parents and p != out]
    if not paths:
        raise GenexpError(f"report: no run dirs (with .hydra/config.yaml) under {root}")
    return paths


def write_report(root: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``index.html`` and ``report.md`` for the runs under ``root``; return their paths.

    Only files the report owns are written or replaced (:mod:`genexp.report.files`)."""
    root = Path(root).expanduser().resolve()
    out = Path(out).expanduser().resolve() if out else root / "report"
    paths = _run_dirs(root, out)
    report_folder(out)
    runs = [read_run(p) for p in paths]
    rows = summarize(runs)
    files, gallery = gallery_files(runs)
    nfe_files, nfe = nfe_section(runs)
    files.update(nfe_files)
    sweep_files, sweep = section_files(root, runs)  # a search's or a grid's ranking of its trials
    files.update(sweep_files)
    content = Page(
        title=f"genexp comparison — {', '.join(sorted({r.dataset for r in runs}))}",
        setup=setup_line(root, runs, len(rows)),
        notes=notes(rows, runs),
        families=rows,
        runs=runs,
        gallery=gallery,
        nfe=nfe,
        sweep=sweep,
    )
    files["index.html"] = (html.page(content) + "\n").encode("utf-8")
    files["report.md"] = markdown.page(content).encode("utf-8")
    owned = owned_files(out)
    check_overwrites(out, files, owned)
    commit_files(out, files, owned)
    log.info("report: %d runs, %d families -> %s", len(runs), len(rows), out / "index.html")
    return out / "index.html", out / "report.md"
