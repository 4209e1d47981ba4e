"""The report's images: each run's last sample grid, copied, and its loss curves, plotted."""

from __future__ import annotations

import logging

from genexp.plots import png_bytes
from genexp.report.collect import Run, read_curves
from genexp.report.columns import Figure

log = logging.getLogger("genexp")

CURVE_KEYS = ("val/fid", "val/bpd", "val/loss", "val/mse", "val/energy")


def _draw(name: str, train: dict, val: dict) -> bytes:
    import matplotlib  # here, not at module top: a report without curves never loads it

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
    fig.suptitle(name, fontsize=9)
    return png_bytes(fig)


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
    return _draw(run.name, train, val)


def gallery_files(runs: list[Run]) -> tuple[dict[str, bytes], list[tuple[Run, list[Figure]]]]:
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
                figs.append(Figure(name, f"samples after epoch {epoch}", "samples"))
            except OSError as err:
                log.warning("report: skipping %s (%s)", run.grid, err.strerror or type(err).__name__)
        curves = plot_curves(run)
        if curves is not None:
            name = f"images/{run.name}_curves.png"
            files[name] = curves
            figs.append(Figure(name, "loss curves", "curves"))
        gallery.append((run, figs))
    return files, gallery
