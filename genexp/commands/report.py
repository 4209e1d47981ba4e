"""``genexp report <dir> [--out F]``: the comparison report from existing run dirs.

The work is :mod:`genexp.report` (collection, one column spec, HTML and Markdown, the manifest that
keeps the user's files safe); this command is its entry, importing neither Lightning nor Hydra, so
``genexp report`` starts in well under a second.
"""

from __future__ import annotations

from pathlib import Path

from genexp.report import write_report

__all__ = ["run", "write_report"]


def run(root: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``index.html`` and ``report.md`` for the run dirs under ``root`` (into ``out``, by
    default ``<root>/report``); return their paths."""
    return write_report(root, out)
