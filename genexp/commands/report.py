"""The comparison report: the talk's summary table with measured values, from existing run dirs.

``write_report(root)`` finds every run dir under ``root`` (a ``genexp compare`` dir, a Hydra sweep
dir, or any folder of run dirs), reads each run's ``metrics.json``, ``evaluation.json``, CSV log
and sample grids, and writes ``index.html`` and ``report.md`` (plus ``images/``) into the report
folder. Families are grouped by their ``model`` option; every number is an aggregate over seeds.

The report folder may hold the user's own files: the report writes, replaces and removes only the
files it wrote itself, listed with their SHA-256 in ``.genexp-report.json`` (its manifest), and
refuses, before writing anything, to overwrite a file it did not write (or one changed since). A
run file that cannot be read (a corrupt ``metrics.json``) is skipped with a warning naming it.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import html
import io
import json
import logging
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from genexp import atomic
from genexp.errors import GenexpError

log = logging.getLogger("genexp")

ASPECTS = ("likelihood", "stability", "fidelity", "speed")
# the talk's closing "Summary" table (seed/talk.txt, section 4): likelihood, learning stability,
# fidelity, generation speed; the AE and latent diffusion are not rated there
TALK_RATINGS: dict[str, tuple[str, str, str, str]] = {
    "vae": ("△", "○", "△", "○"),
    "ddpm": ("○", "○", "○", "×"),
    "realnvp": ("○", "△", "△", "○"),
    "glow": ("○", "△", "△", "○"),
    "gan": ("×", "×", "○", "○"),
}
NOT_RATED = ("—", "—", "—", "—")
LABELS = {
    "ae": "Autoencoder",
    "vae": "Variational autoencoder",
    "gan": "GAN",
    "realnvp": "Normalizing flow, RealNVP",
    "glow": "Normalizing flow, Glow",
    "ddpm": "Diffusion, DDPM",
    "ldm": "Latent diffusion",
    "pixelcnn": "Autoregressive, gated PixelCNN",
    "pixel_transformer": "Autoregressive, pixel Transformer",
}
# a finished run counts as collapsed when its samples cover almost none of the data
RECALL_COLLAPSE = 0.05  # recall (Kynkaanniemi et al. 2019) below this
DIVERSITY_COLLAPSE = 0.2  # pixel-space diversity ratio (genexp.metrics.diversity) below this
NA = "n/a"
CURVE_KEYS = ("val/fid", "val/bpd", "val/loss", "val/mse", "val/energy")


MANIFEST = ".genexp-report.json"  # in the report folder: the files the report wrote, with their SHA-256
OWNED_NAME = re.compile(r"index\.html|report\.md|images/[^/\\]+_(samples|curves)\.png")


def _read_json(path: Path, consequence: str = "it is left out") -> dict | None:
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


def _dict(value: Any) -> dict:
    """``value`` if it is a mapping, else {} (a hand-edited file may hold anything)."""
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    """A finite number, or None (missing, ``n/a``, ``nan`` strings)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _nonfinite(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in ("nan", "inf", "-inf")
    return isinstance(value, float) and not math.isfinite(value)


@dataclass
class Run:
    """One run dir, as read from disk."""

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

    @property
    def name(self) -> str:
        return self.path.name

    def eval(self, key: str) -> Any:
        return _dict(self.evaluation.get("metrics")).get(f"eval/{key}")

    @property
    def sampling(self) -> str:
        """How the evaluation sampled, where it matters (a diffusion sampler, temperature, truncation)."""
        sampling = _dict(_dict(self.evaluation.get("provenance")).get("sampling"))
        parts = [f"{k} {v:g}" for k, v in sampling.items() if k != "sampler" and isinstance(v, int | float)]
        sampler = sampling.get("sampler")
        if isinstance(sampler, dict):
            steps = sampler.get("steps")
            parts.insert(0, f"{sampler.get('name', '?')}" + (f" ({steps} steps)" if steps else ""))
        return ", ".join(parts)

    @property
    def bpd(self) -> float | str | None:
        """Evaluated bits/dim, else the run's test/bpd, ``n/a`` for families without a likelihood."""
        value = self.eval("bpd")
        if value == NA:
            return NA
        if _number(value) is not None:
            return float(value)
        return _number(_dict(self.metrics.get("test")).get("test/bpd"))

    @property
    def diverged(self) -> bool:
        """Failed (a non-finite loss stops a run), or non-finite test metrics, samples or FID."""
        if self.status == "failed":
            return True
        test = _dict(self.metrics.get("test"))
        if any(_nonfinite(v) for v in test.values()):
            return True
        return bool(self.eval("nonfinite_samples")) or _nonfinite(self.eval("fid"))

    @property
    def collapsed(self) -> bool:
        if self.status != "finished" or self.diverged:
            return False
        recall, diversity = _number(self.eval("recall")), _number(self.eval("diversity"))
        return (recall is not None and recall < RECALL_COLLAPSE) or (
            diversity is not None and diversity < DIVERSITY_COLLAPSE
        )


def find_run_dirs(root: Path) -> list[Path]:
    """Run dirs (holding ``.hydra/config.yaml``) at or below ``root`` (a few levels)."""
    found = [
        p.parent.parent for p in root.glob("**/.hydra/config.yaml") if len(p.relative_to(root).parts) <= 6
    ]
    return sorted(set(found))


def read_run(path: Path) -> Run:
    config = _read_yaml(path / ".hydra" / "config.yaml")
    runtime = _dict(_dict(_read_yaml(path / ".hydra" / "hydra.yaml").get("hydra")).get("runtime"))
    choices = _dict(runtime.get("choices"))
    target = str(_dict(config.get("model")).get("_target_", "?"))
    family = str(choices.get("model") or target.rsplit(".", 1)[-1].lower())
    dataset = str(
        choices.get("dataset") or str(_dict(config.get("dataset")).get("_target_", "?")).rsplit(".", 1)[-1]
    )
    seed = config.get("seed") if isinstance(config.get("seed"), int) else None
    metrics = _read_json(path / "metrics.json", "the run is listed as unfinished")
    failed = _read_json(path / "compare_failed.json")
    status, error = (
        ("finished", "")
        if metrics
        else ("failed", str((failed or {}).get("error", "")))
        if failed
        else ("unfinished", "")
    )
    evaluation = _read_json(path / "evaluation.json", "the run's evaluation is left out") or {}
    if evaluation.get("error"):
        error = f"evaluation: {evaluation['error']}"
    grids = sorted((path / "samples").glob("epoch_*_samples.png"))
    csv_path = path / "csv" / "metrics.csv"
    return Run(
        path=path,
        family=family,
        seed=seed,
        dataset=dataset,
        status=status,
        error=error,
        metrics=metrics or {},
        evaluation=evaluation,
        grid=grids[-1] if grids else None,
        csv=csv_path if csv_path.is_file() else None,
    )


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class FamilyRow:
    """The talk's four columns, measured, for one family (aggregated over its runs)."""

    family: str
    runs: list[Run]

    def values(self, key: str) -> list[float]:
        return [v for r in self.runs if r.status == "finished" and (v := _number(r.eval(key))) is not None]

    @property
    def finished(self) -> int:
        return sum(r.status == "finished" for r in self.runs)

    @property
    def bpd(self) -> tuple[float | None, float | None] | str:
        values = [r.bpd for r in self.runs if r.status == "finished"]
        numbers = [v for v in values if isinstance(v, float)]
        if not numbers:
            return NA if any(v == NA for v in values) or self.family in ("gan", "ae") else (None, None)
        return _mean_std(numbers)

    @property
    def fid(self) -> tuple[float | None, float | None]:
        return _mean_std(self.values("fid"))

    @property
    def diverged(self) -> int:
        return sum(r.diverged for r in self.runs)

    @property
    def collapsed(self) -> int:
        return sum(r.collapsed for r in self.runs)

    def mean(self, key: str) -> float | None:
        return _mean_std(self.values(key))[0]

    @property
    def talk(self) -> tuple[str, str, str, str]:
        return TALK_RATINGS.get(self.family, NOT_RATED)


def summarize(runs: list[Run]) -> list[FamilyRow]:
    order = list(LABELS)
    families = sorted(
        {r.family for r in runs}, key=lambda f: (order.index(f) if f in order else len(order), f)
    )
    return [FamilyRow(f, [r for r in runs if r.family == f]) for f in families]


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


def summary_cells(row: FamilyRow) -> list[str]:
    """The summary table's cells for one family, in column order (see SUMMARY_HEADER)."""
    fid_mean, fid_std = row.fid
    talk = row.talk
    return [
        f"{LABELS.get(row.family, row.family)} ({row.family})",
        f"{row.finished}/{len(row.runs)}",
        fmt_pm(row.bpd),
        talk[0],
        fmt(fid_std),
        str(row.diverged),
        str(row.collapsed),
        talk[1],
        fmt(fid_mean),
        fmt(row.mean("kid_mean")),
        fmt(row.mean("precision")),
        fmt(row.mean("recall")),
        talk[2],
        fmt(row.mean("samples_per_sec")),
        talk[3],
    ]


SUMMARY_GROUPS = [
    ("", 2),
    ("Likelihood", 2),
    ("Learning stability", 4),
    ("Fidelity", 5),
    ("Generation speed", 2),
]
SUMMARY_HEADER = [
    "family",
    "runs finished",
    "test bpd ↓",
    "talk",
    "FID std over seeds ↓",
    "diverged",
    "collapsed",
    "talk",
    "FID ↓",
    "KID ↓",
    "precision ↑",
    "recall ↑",
    "talk",
    "samples/s ↑",
    "talk",
]


def grouped_header() -> list[str]:
    """The summary header with each column's group (Markdown has one header row): ``Fidelity: FID ↓``."""
    groups = [g for g, n in SUMMARY_GROUPS for _ in range(n)]
    return [f"{g}: {h}" if g else h for g, h in zip(groups, SUMMARY_HEADER)]


RUN_HEADER = [
    "run",
    "family",
    "seed",
    "status",
    "epochs",
    "steps",
    "fit s",
    "bpd",
    "FID",
    "KID",
    "precision",
    "recall",
    "diversity",
    "samples/s",
    "note",
]


def run_cells(run: Run) -> list[str]:
    m = run.metrics
    state = "diverged" if run.diverged else "collapsed" if run.collapsed else ""
    note = "; ".join(p for p in (run.error or state, run.sampling) if p)
    return [
        run.name,
        run.family,
        fmt(run.seed),
        run.status,
        fmt(m.get("epochs")),
        fmt(m.get("global_step")),
        fmt(_number(m.get("fit_time_s")), 3),
        fmt(run.bpd),
        fmt(run.eval("fid")),
        fmt(run.eval("kid_mean")),
        fmt(run.eval("precision")),
        fmt(run.eval("recall")),
        fmt(run.eval("diversity")),
        fmt(run.eval("samples_per_sec")),
        note,
    ]


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


def plot_curves(run: Run) -> bytes | None:
    """Training losses against step and validation metrics against epoch, side by side, as PNG
    bytes (None: no CSV log, or nothing in it to plot)."""
    if run.csv is None:
        return None
    curves = read_curves(run.csv)
    train = {k: v for k, v in curves.items() if k.startswith("train/") and k.endswith("loss")}
    val = {k: v for k, v in curves.items() if k in CURVE_KEYS}
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8), dpi=80)
    for ax, group, xlabel in ((axes[0], train, "step"), (axes[1], val, "epoch")):
        for key, points in sorted(group.items()):
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=key, marker="." if len(points) < 30 else None)
        ax.set_xlabel(xlabel)
        values = [y for points in group.values() for _, y in points]
        if values and min(values) > 0 and max(values) / min(values) > 100:  # bpd beside mse, say
            ax.set_yscale("log")
        if group:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no values logged", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_title("training loss", fontsize=9)
    axes[1].set_title("validation", fontsize=9)
    fig.suptitle(run.name, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


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


def _html_table(table_id: str, header: list[str], rows: list[list[str]], groups=None) -> str:
    out = [f'<table id="{table_id}">', "<thead>"]
    if groups:
        out.append("<tr>" + "".join(f'<th colspan="{n}">{html.escape(g)}</th>' for g, n in groups) + "</tr>")
    out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead><tbody>")
    for row in rows:
        cells = "".join(
            f'<td class="{"talk" if header[i] == "talk" else ""}">{html.escape(c)}</td>'
            for i, c in enumerate(row)
        )
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


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
figcaption { font-size: 0.8em; }
.note { font-size: 0.85em; color: #555; max-width: 70em; }
</style>"""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def report_folder(out: Path) -> Path:
    """``out``, created if missing; refused in one line before any work when it cannot hold the report."""
    if out.exists() and not out.is_dir():
        raise GenexpError(f"--out={out}: is a file, not a folder; pass --out <a folder> (created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GenexpError(
            f"--out={out}: cannot create it ({err.strerror}); pass --out <a writable folder>"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise GenexpError(f"--out={out}: the folder is read-only; pass --out <a writable folder>")
    return out


def owned_files(out: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of the files the last report in ``out`` wrote (its manifest)."""
    manifest = _read_json(out / MANIFEST, "files there count as the user's") or {}
    files = _dict(manifest.get("files"))
    # only names the report writes: a hand-made manifest cannot point it at other files
    return {str(k): str(v) for k, v in files.items() if OWNED_NAME.fullmatch(str(k))}


def _is_owned(path: Path, digest: str | None) -> bool:
    """Whether ``path`` is a file the report wrote and nobody changed since."""
    if digest is None or not path.is_file() or path.is_symlink():
        return False
    try:
        return _sha256(path.read_bytes()) == digest
    except OSError:
        return False


def check_overwrites(out: Path, files: dict[str, bytes], owned: dict[str, str]) -> None:
    """Refuse, before anything is written, to replace a file the report did not write (a user's
    photo in ``images/``, an ``index.html`` of their own) or one changed since it wrote it."""
    for rel in ["images", *files]:
        path = out / rel
        if rel == "images":
            if path.exists() and not path.is_dir():
                raise GenexpError(
                    f"--out={out}: images is a file, and the report puts its images in an images/ folder; "
                    "move it away or pass --out <another folder>"
                )
            continue
        if not (path.exists() or path.is_symlink()):
            continue
        if _is_owned(path, owned.get(rel)) or (path.is_file() and path.read_bytes() == files[rel]):
            continue
        raise GenexpError(
            f"--out={out}: {rel} exists and genexp report did not write it (or it was changed since), so it "
            "is not overwritten; move it away or pass --out <another folder>"
        )


def commit_files(out: Path, files: dict[str, bytes], owned: dict[str, str]) -> None:
    """Write ``files`` atomically, remove the report's own files of last time that it no longer
    writes (runs gone from the folder), then the manifest; a failed write is one line."""
    rel = MANIFEST
    try:
        for rel, data in files.items():
            atomic.write_bytes(out / rel, data)
        for rel, digest in owned.items():
            if rel not in files and _is_owned(out / rel, digest):
                (out / rel).unlink()
        rel = MANIFEST
        manifest = {"written_by": "genexp report", "files": {k: _sha256(v) for k, v in files.items()}}
        atomic.write_json(out / MANIFEST, manifest)
    except OSError as err:
        fix = "free space there or pass --out <another folder>"
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            fix = "pass --out <a writable folder>"
        raise GenexpError(
            f"--out={out}: cannot write {rel} ({err.strerror or type(err).__name__}); {fix}"
        ) from None


def gallery_files(runs: list[Run]) -> tuple[dict[str, bytes], list[tuple[Run, list[tuple[str, str, str]]]]]:
    """The images of every run (its last sample grid, its loss curves) and each run's figures."""
    files: dict[str, bytes] = {}
    gallery = []
    for run in runs:
        figs = []
        if run.grid is not None:
            name = f"images/{run.name}_samples.png"
            try:
                files[name] = run.grid.read_bytes()
                epoch = run.grid.stem.split("_")[1].lstrip("0") or "0"
                figs.append((name, f"samples after epoch {epoch}", "samples"))
            except OSError as err:
                log.warning("report: skipping %s (%s)", run.grid, err.strerror or type(err).__name__)
        curves = plot_curves(run)
        if curves is not None:
            name = f"images/{run.name}_curves.png"
            files[name] = curves
            figs.append((name, "loss curves", "curves"))
        gallery.append((run, figs))
    return files, gallery


def setup_line(root: Path, runs: list[Run], families: int) -> str:
    meta = _read_json(root / "compare.json", "the setup line leaves out the seeds and budget") or {}
    line = f"{len(runs)} runs of {families} families"
    seeds, budget = meta.get("seeds"), _number(meta.get("budget_minutes"))
    if seeds is not None and budget is not None:
        line += f", seeds {seeds}, {budget:g} min budget each"
    return line + f"; generated {time.strftime('%Y-%m-%d %H:%M')}"


def write_report(root: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``index.html`` and ``report.md`` for the runs under ``root``; return their paths.

    Only files the report owns are written or replaced (module docstring)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise GenexpError(f"report: {root}: no such folder")
    out = Path(out).expanduser().resolve() if out else root / "report"
    paths = [p for p in find_run_dirs(root) if out not in p.parents and p != out]
    if not paths:
        raise GenexpError(f"report: no run dirs (with .hydra/config.yaml) under {root}")
    report_folder(out)
    runs = [read_run(p) for p in paths]
    rows = summarize(runs)
    files, gallery = gallery_files(runs)
    datasets = sorted({r.dataset for r in runs})
    title = f"genexp comparison — {', '.join(datasets)}"
    setup = setup_line(root, runs, len(rows))
    summary_rows = [summary_cells(r) for r in rows]
    run_rows = [run_cells(r) for r in runs]
    notes = (
        "Measured values beside the talk's ○/△/× ratings (its Summary table; the AE and latent diffusion "
        "are not rated there: —). Likelihood: mean ± std of bits/dim on the test split "
        "(an exact value for flows, an upper bound for VAE and diffusion; n/a for families without one). "
        "Learning stability: the standard deviation of FID across seeds, the runs that diverged "
        "(failed, or non-finite metrics or samples) and the runs that collapsed "
        f"(recall < {RECALL_COLLAPSE} or sample diversity < {DIVERSITY_COLLAPSE} of the data's). "
        f"Fidelity: means over seeds; {provenance(runs)}. Generation speed: samples per second at a fixed batch "
        "on the evaluation device."
    )
    tables = (summary_rows, run_rows, notes)
    files["index.html"] = (html_page(title, setup, tables, gallery) + "\n").encode("utf-8")
    files["report.md"] = markdown_page(title, setup, tables, gallery).encode("utf-8")
    owned = owned_files(out)
    check_overwrites(out, files, owned)
    commit_files(out, files, owned)
    html_path = out / "index.html"
    log.info("report: %d runs, %d families -> %s", len(runs), len(rows), html_path)
    return html_path, out / "report.md"


def html_page(title: str, setup: str, tables: tuple, gallery: list) -> str:
    summary_rows, run_rows, notes = tables
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape(setup)}</p>',
        "<h2>Summary</h2>",
        _html_table("summary", SUMMARY_HEADER, summary_rows, SUMMARY_GROUPS),
        f'<p class="note">{html.escape(notes)}</p>',
        "<h2>Runs</h2>",
        _html_table("runs", RUN_HEADER, run_rows),
        "<h2>Samples and loss curves</h2>",
    ]
    for run, figs in gallery:
        body.append(f'<section class="run" id="run-{html.escape(run.name)}"><h3>{html.escape(run.name)}</h3>')
        if not figs:
            body.append('<p class="note">no sample grid or CSV log in this run</p>')
        for src, caption, kind in figs:
            body.append(
                f'<figure><img class="{kind}" src="{html.escape(src)}" alt="{html.escape(run.name)} {html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        body.append("</section>")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            STYLE,
            MARK_IMAGES,
            "</head><body>",
            *body,
            "</body></html>",
        ]
    )


def markdown_page(title: str, setup: str, tables: tuple, gallery: list) -> str:
    summary_rows, run_rows, notes = tables
    md = [
        f"# {title}",
        "",
        setup,
        "",
        "## Summary",
        "",
        _md_table(grouped_header(), summary_rows),
        "",
        notes,
        "",
        "## Runs",
        "",
        _md_table(RUN_HEADER, run_rows),
        "",
        "## Samples and loss curves",
        "",
    ]
    for run, figs in gallery:
        md.append(f"### {run.name}")
        md.append("")
        md += [f"![{caption}]({src})" for src, caption, _ in figs] or ["no sample grid or CSV log"]
        md.append("")
    return "\n".join(md)
