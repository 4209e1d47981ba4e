"""The report as one HTML page: the tables of :mod:`genexp.report.columns`, then the gallery.

The page carries a small script that marks every image's load state in the DOM, so a headless
browser's DOM dump shows whether each image rendered (tests/test_report.py reads it).
"""

from __future__ import annotations

from html import escape

from genexp.report.columns import RUNS, SUMMARY, Column, NFESection, Page, cells, groups

# marks every image's load state in the DOM (data-loaded, data-natural-width) and the count on <body>,
# so a headless browser's DOM dump shows whether each image rendered
MARK_IMAGES = """<script>
function markImages() {
  let ok = 0;
  for (const img of document.images) {
    const loaded = img.complete && img.naturalWidth > 0;
    img.dataset.loaded = loaded ? "yes" : "no";
    img.dataset.naturalWidth = String(img.naturalWidth);
    if (loaded) ok++;
  }
  document.body.dataset.imagesLoaded = ok + "/" + document.images.length;
}
window.addEventListener("load", markImages);
</script>"""

STYLE = """<style>
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: right; }
th { background: #eef; } td:first-child, th:first-child { text-align: left; }
td.talk { text-align: center; background: #f6f6f6; font-weight: bold; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { border: 1px solid #ccc; }
figure img.samples { width: 240px; image-rendering: pixelated; }
figure img.nfe, figure img.sweep { max-width: 100%; }
pre { background: #f6f6f6; padding: 0.5em; font-size: 0.8em; max-height: 30em; overflow: auto; }
figcaption { font-size: 0.8em; }
.note { font-size: 0.85em; color: #555; max-width: 70em; }
</style>"""


def table(table_id: str, columns: list[Column], rows: list) -> str:
    """A table with a row of group headers above the columns' own when any column has a group."""
    out = [f'<table id="{table_id}">', "<thead>"]
    spans = groups(columns)
    if any(group for group, _ in spans):
        out.append("<tr>" + "".join(f'<th colspan="{n}">{escape(g)}</th>' for g, n in spans) + "</tr>")
    out.append("<tr>" + "".join(f"<th>{escape(c.header)}</th>" for c in columns) + "</tr></thead><tbody>")
    for row in rows:
        tds = "".join(
            f'<td class="{"talk" if column.rating else ""}">{escape(text)}</td>'
            for column, text in zip(columns, cells(columns, row), strict=True)
        )
        out.append(f"<tr>{tds}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _gallery(page: Page) -> list[str]:
    body = []
    for run, figs in page.gallery:
        body.append(f'<section class="run" id="run-{escape(run.name)}"><h3>{escape(run.name)}</h3>')
        if not figs:
            body.append('<p class="note">no sample grid or CSV log in this run</p>')
        for fig in figs:
            body.append(
                f'<figure><img class="{fig.kind}" src="{escape(fig.src)}" '
                f'alt="{escape(run.name)} {escape(fig.caption)}">'
                f"<figcaption>{escape(fig.caption)}</figcaption></figure>"
            )
        body.append("</section>")
    return body


def _nfe(section: NFESection | None) -> list[str]:
    """The quality-against-compute section; nothing when no run has a sweep."""
    if section is None:
        return []
    fig = section.figure
    return [
        '<h2 id="nfe">Quality against compute (NFE)</h2>',
        f'<figure><img class="{fig.kind}" src="{escape(fig.src)}" alt="{escape(fig.caption)}">'
        f"<figcaption>{escape(fig.caption)}</figcaption></figure>",
        table("nfe", section.columns, section.runs),
        '<ul class="note" id="nfe-crossings">',
        *(f"<li>{escape(line)}</li>" for line in section.crossings),
        "</ul>",
        f'<p class="note">{escape(section.note)}</p>',
    ]


def _best(section) -> list[str]:
    """The best trial: its objective, parameters, overrides and (folded) its whole config."""
    best = section.best
    if best is None:
        return ['<p class="note" id="best-trial">no trial has an objective yet</p>']
    out = [
        '<div id="best-trial">',
        f"<p><b>Best {'trial' if section.kind == 'search' else 'run'} {escape(best.label)}</b>: "
        f"{escape(section.objective)} = {best.value:.6g}"
        + (f" ({escape(best.run.name)})" if best.run else "")
        + "</p>",
        "<ul>"
        + "".join(f"<li><code>{escape(f'{k}={v}')}</code></li>" for k, v in best.params.items())
        + "</ul>",
    ]
    if section.best_overrides:
        out.append(f"<p>its overrides: <code>{escape(' '.join(section.best_overrides))}</code></p>")
    if section.best_config:
        out.append(
            "<details><summary>its config (.hydra/config.yaml)</summary>"
            f"<pre>{escape(section.best_config)}</pre></details>"
        )
    return [*out, "</div>"]


def _sweep(section) -> list[str]:
    """A search's or a grid's section: the best trial, the figures, every trial ranked."""
    if section is None:
        return []
    title = "Search" if section.kind == "search" else "Grid sweep"
    return [
        f'<h2 id="sweep">{title}</h2>',
        f'<p class="note">{escape(section.note)}</p>',
        *_best(section),
        *(
            f'<figure><img class="{fig.kind}" src="{escape(fig.src)}" alt="{escape(fig.caption)}">'
            f"<figcaption>{escape(fig.caption)}</figcaption></figure>"
            for fig in section.figures
        ),
        table("sweep", section.columns, section.trials),
    ]


def page(content: Page) -> str:
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{escape(content.title)}</title>",
            STYLE,
            MARK_IMAGES,
            "</head><body>",
            f"<h1>{escape(content.title)}</h1>",
            f'<p class="note">{escape(content.setup)}</p>',
            *_sweep(content.sweep),
            "<h2>Summary</h2>",
            table("summary", SUMMARY, content.families),
            f'<p class="note">{escape(content.notes)}</p>',
            "<h2>Runs</h2>",
            table("runs", RUNS, content.runs),
            *_nfe(content.nfe),
            "<h2>Samples and loss curves</h2>",
            *_gallery(content),
            "</body></html>",
        ]
    )
