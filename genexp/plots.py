"""Figures shared by `genexp evaluate` and `genexp report`: FID against the compute spent.

Pure Python (matplotlib is imported inside the function that draws, on the Agg backend, so a
command that never plots never loads it).
"""

from __future__ import annotations

import io
import math
from typing import NamedTuple


class NFECurve(NamedTuple):
    """One run's sweep: FID at each number of network evaluations, with the wall-clock cost.

    The three lists are aligned (one entry per NFE, ascending); a non-finite FID is skipped.
    """

    label: str
    nfe: list[float]
    ms_per_sample: list[float]
    fid: list[float]


def _points(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """The pairs a log axis can show: positive x, finite y."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    pairs = [(float(x), float(y)) for x, y in pairs if float(x) > 0 and math.isfinite(float(y))]
    return [x for x, _ in pairs], [y for _, y in pairs]


def nfe_figure(curves: list[NFECurve], title: str = "") -> bytes:
    """FID against NFE (log2 x axis) and against milliseconds per sample (log x axis), side by
    side, one line per curve on the same axes, as PNG bytes.

    The left panel is the trade-off a solver promises (error against network passes); the right is
    the one a user pays (error against wall-clock time), which also counts a solver's overhead.
    """
    import matplotlib  # here, not at module top: evaluate without nfe= never loads it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    panels = (
        (axes[0], "nfe", "NFE (network evaluations)", 2),
        (axes[1], "ms_per_sample", "wall-clock ms per sample", 10),
    )
    fids = [y for curve in curves for y in _points(curve.nfe, curve.fid)[1]]
    for ax, field, xlabel, base in panels:
        drawn = False
        for curve in curves:
            xs, ys = _points(getattr(curve, field), curve.fid)
            if xs:
                ax.plot(xs, ys, marker="o", label=curve.label)
                drawn = True
        if drawn:
            ax.set_xscale("log", base=base)
            if base == 10:
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            if min(fids) > 0 and max(fids) / min(fids) > 10:  # few-step FIDs are 10x the many-step ones
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            for axis in (ax.xaxis, ax.yaxis):  # plain numbers (16, not 2^4); no crowded minor labels
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())
        else:
            ax.text(0.5, 0.5, "no FID measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID")
        ax.grid(True, which="both", alpha=0.3)
    if any(_points(curve.nfe, curve.fid)[0] for curve in curves):
        axes[0].legend(fontsize=7, loc="upper right")  # one legend: the curves are the same runs
    axes[0].set_title("FID vs NFE", fontsize=9)
    axes[1].set_title("FID vs wall-clock", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    return png_bytes(fig)


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes, closed afterwards (tight layout)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
