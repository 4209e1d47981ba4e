"""The report as Markdown: the same tables (:mod:`genexp.report.columns`) and gallery as the HTML
page; Markdown has one header row, so a column's group prefixes its header (``Fidelity: FID ↓``)."""

from __future__ import annotations

from genexp.report.columns import RUNS, SUMMARY, Column, NFESection, Page, cells


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def header(columns: list[Column]) -> list[str]:
    return [f"{c.group}: {c.header}" if c.group else c.header for c in columns]


def table(columns: list[Column], rows: list) -> str:
    lines = ["| " + " | ".join(header(columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_escape(text) for text in cells(columns, row)) + " |" for row in rows]
    return "\n".join(lines)


def _nfe(section: NFESection | None) -> list[str]:
    """The quality-against-compute section; nothing when no run has a sweep."""
    if section is None:
        return []
    md = ["## Quality against compute (NFE)", "", f"![{section.figure.caption}]({section.figure.src})", ""]
    md += [table(section.columns, section.runs), ""]
    return md + [f"- {line}" for line in section.crossings] + ["", section.note, ""]


def _sweep(section) -> list[str]:
    """A search's or a grid's section: the best trial, the figures, every trial ranked."""
    if section is None:
        return []
    md = [f"## {'Search' if section.kind == 'search' else 'Grid sweep'}", "", section.note, ""]
    best = section.best
    if best is not None:
        md += [f"**Best {best.label}**: {section.objective} = {best.value:.6g}", ""]
        md += [f"- `{k}={v}`" for k, v in best.params.items()] + [""]
        if section.best_overrides:
            md += [f"its overrides: `{' '.join(section.best_overrides)}`", ""]
    md += [f"![{fig.caption}]({fig.src})" for fig in section.figures] + [""]
    return md + [table(section.columns, section.trials), ""]


def page(content: Page) -> str:
    md = [f"# {content.title}", "", content.setup, "", *_sweep(content.sweep), "## Summary", ""]
    md += [table(SUMMARY, content.families), "", content.notes, ""]
    md += ["## Runs", "", table(RUNS, content.runs), "", *_nfe(content.nfe)]
    md += ["## Samples and loss curves", ""]
    for run, figs in content.gallery:
        md += [f"### {run.name}", ""]
        md += [f"![{fig.caption}]({fig.src})" for fig in figs] or ["no sample grid or CSV log"]
        md.append("")
    return "\n".join(md)
