"""A sweep's objective: the one number of a run's ``metrics.json`` that ``genexp train`` returns to
Hydra's sweeper (a search optimises it; the report sorts a sweep's runs by it).

The config's ``objective`` names it: ``test/<metric>`` (``test/bpd``, ``test/loss``) or a top-level
number such as ``fit_time_s``; null means the family's ``monitor.metric`` on the test split. One rule,
read by the CLI, :mod:`genexp.validate`, the search sweeper and the report. Pure Python.
"""

from __future__ import annotations

import math
from typing import Any

from genexp.errors import GenexpError

# metrics.json's top-level numbers an objective may name (the test metrics are ``test/<name>``)
TOP_LEVEL_OBJECTIVES = ("fit_time_s", "wall_time_s", "train_img_per_sec", "num_parameters", "global_step")


def objective_key(cfg: Any) -> str:
    """The metrics.json key a sweep optimises: ``objective``, else the test split's monitor metric."""
    given = cfg.get("objective")
    if given is not None:
        return str(given)
    monitor = cfg.get("monitor") or {}
    return str(monitor.get("metric", "val/loss")).replace("val/", "test/", 1)


def check_objective(cfg: Any) -> str:
    """``objective`` is null, a ``test/<metric>`` key or one of :data:`TOP_LEVEL_OBJECTIVES`."""
    key = objective_key(cfg)
    if (key.startswith("test/") and len(key) > len("test/")) or key in TOP_LEVEL_OBJECTIVES:
        return key
    raise GenexpError(
        f"objective={key}: a sweep optimises one number of metrics.json: test/<metric> (e.g. test/bpd, "
        f"test/loss) or one of {', '.join(TOP_LEVEL_OBJECTIVES)}; null takes the test split's monitor.metric"
    )


def objective_value(cfg: Any, metrics: dict | None, required: bool = False) -> float | None:
    """The objective's value in ``metrics`` (what ``metrics.json`` holds): a float (``nan`` for a
    diverged run's non-finite metric, which metrics.json writes as a string); None when the run has
    no such value, or, ``required`` (a search's trial), a GenexpError naming the keys it has."""
    key = objective_key(cfg)
    test = (metrics or {}).get("test") or {}
    value = test.get(key) if key.startswith("test/") else (metrics or {}).get(key)
    if value is None or isinstance(value, bool):
        if not required:
            return None
        raise GenexpError(
            f"objective={key}: this run's metrics.json has no such number (its test metrics: "
            f"{', '.join(sorted(test)) or 'none'}); pick one of them with objective=<key>"
        )
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
