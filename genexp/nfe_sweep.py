"""``genexp evaluate nfe='[4,8,16,32,64]'``: FID/KID/precision-recall and speed at each NFE.

A solver or sampler that trades error for network evaluations (NFE) is judged by the curve, not one
point (DDIM, Song et al. 2021, table 1; DPM-Solver, Lu et al. 2022, fig. 4; EDM, Karras et al. 2022,
fig. 2): the run's ``sampler`` (diffusion) or ``solver`` (flow matching) is rebuilt once per NFE with
the step count whose NFE is the largest within it (the class's ``steps_for_nfe``), every model is
built before any is sampled (so every refusal comes first), and each is measured as a single
``genexp evaluate`` with that step count would measure it: the same seed, one feature extractor.
The top-level metrics are the largest NFE's; ``"nfe_sweep"`` holds every row, and
``<file stem>_nfe.png`` plots FID against NFE and against wall-clock time per sample.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import OmegaConf

from genexp import atomic, families, sampling
from genexp.checks import write_failed
from genexp.errors import GenexpError
from genexp.evaluation import (
    FIDELITY,
    EvalSettings,
    Measure,
    Measured,
    Subject,
    extractor_for,
    fidelity_results,
    model_results,
)
from genexp.metrics.sampling import sampling_speed
from genexp.plots import NFECurve, nfe_figure

log = logging.getLogger("genexp")

NFE_MAX = 100_000
STEPPED = ("sampler", "solver")  # the sample options whose node has a step count
FIX = {  # the options whose classes define steps_for_nfe
    "sampler": "pass sampler=ddim|dpm_solver_pp|heun",
    "solver": "pass solver=euler|midpoint|heun|rk4",
}
EXAMPLE = "pass nfe='[4,8,16,32,64]' (or leave nfe out)"
SPEED_KEYS = ("samples_per_sec", "ms_per_sample")
ROW_KEYS = {"fid": ("fid",), "kid": ("kid_mean", "kid_std"), "pr": ("precision", "recall")}  # per metric


def check_nfe(value: Any) -> tuple[int, ...] | None:
    """``nfe``: None, or integers in 1..NFE_MAX (one alone = a list of one), deduplicated, ascending."""
    if value is None:
        return None
    values = list(value) if isinstance(value, list | tuple) or OmegaConf.is_list(value) else [value]
    if not values:
        raise GenexpError(f"nfe=[]: empty; {EXAMPLE}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= NFE_MAX:
            shown = list(values) if len(values) > 1 or value != v else v
            raise GenexpError(
                f"nfe={shown}: {v!r} is not a network-evaluation count (an integer in 1..{NFE_MAX}); {EXAMPLE}"
            )
    return tuple(sorted(set(values)))


def stepped_option(subject: Subject, nfe: tuple[int, ...]) -> str:
    """``sampler`` or ``solver``: the family's sample option that has a step count (its
    ``family.sample_options``; a family outside genexp's configs: the node its model config has)."""
    family = families.of_model_config(subject.loaded.config.model)
    model = subject.loaded.config.model
    options = family.sample_options if family else STEPPED
    option = families.active_node(family, model)  # a family sampling by either node: the one in use
    if option in options:
        return option
    raise GenexpError(
        f"nfe={list(nfe)}: {subject.family} has no sampler or solver whose steps set its NFE (nfe applies to "
        "a family whose family.sample_options name sampler or solver); drop the nfe option"
    )


def stepped_class(node: dict, option: str) -> type:
    """The class a ``sampler``/``solver`` node names, through the registry only: a config never
    makes genexp import a name genexp does not register (genexp.build.REGISTRY)."""
    from genexp.build import REGISTRY, refusal

    target = node.get("_target_")
    if not isinstance(target, str) or target not in REGISTRY:
        raise refusal(f"model.{option}", target)
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


class Point(NamedTuple):
    """One NFE of the sweep, built: the step count it buys and the model sampling with it."""

    nfe_requested: int
    steps: int
    subject: Subject  # the run's subject with this NFE's model (on the CPU until measured)


def build_points(subject: Subject, nfe: tuple[int, ...]) -> tuple[str, str, list[Point]]:
    """(option, class name, points): every NFE's step count and model, before any is sampled."""
    option = stepped_option(subject, nfe)
    node = OmegaConf.to_container(subject.loaded.config.model[option], resolve=False)
    cls = stepped_class(node, option)
    name = cls.__name__
    if not hasattr(cls, "steps_for_nfe"):
        raise GenexpError(
            f"nfe={list(nfe)}: the run's {option} {name} has no step count to set (its NFE is fixed or "
            f"adaptive); {FIX[option]} to sweep the NFE, or drop the nfe option"
        )
    key = getattr(cls, "steps_key", "steps")  # the node key that sets its steps (Langevin: steps_per_scale)
    # steps_for_nfe sees the node's other arguments over the model's scalar keys (the NFE of
    # annealed Langevin counts the model's sigma levels)
    model = OmegaConf.to_container(subject.loaded.config.model, resolve=False)
    others = {k: v for k, v in model.items() if not isinstance(v, dict | list)}
    others.update({k: v for k, v in node.items() if k not in ("_target_", "_partial_", key)})
    points = []
    for n in nfe:
        steps = int(cls.steps_for_nfe(n, **others))
        if steps < 1:
            least = next(m for m in range(n + 1, NFE_MAX + 1) if cls.steps_for_nfe(m, **others) >= 1)
            raise GenexpError(
                f"nfe={list(nfe)}: {name} cannot take one step within {n} network evaluations (its first "
                f"step costs {least}); pass nfe values >= {least}"
            )
        try:
            loaded = sampling.load_for_sampling(str(subject.loaded.path), **{option: {**node, key: steps}})
        except GenexpError as err:
            raise GenexpError(
                f"nfe={list(nfe)}: {n} network evaluations mean {option}.{key}={steps}, refused ({err}); "
                "pass smaller nfe values"
            ) from None
        points.append(Point(n, steps, subject._replace(loaded=loaded, model=loaded.model)))
    return option, name, points


def measure_point(point: Point, settings: EvalSettings, extractor, info) -> tuple[dict, dict]:
    """(fidelity results, speed) of one NFE's model, on the subject's device."""
    subject = point.subject._replace(model=point.subject.model.to(point.subject.device))
    results = {}
    if set(settings.metrics) & set(FIDELITY):
        results, _ = fidelity_results(subject, settings, extractor, info)
    speed = sampling_speed(
        subject.model,
        settings.speed_batch_size,
        settings.speed_repeats,
        subject.device,
        subject.kwargs,
        settings.seed,
    )
    return results, speed


def row_of(point: Point, results: dict, speed: dict, settings: EvalSettings) -> dict:
    """One ``nfe_sweep`` row: the NFE asked and spent, the steps, the metrics asked, the speed."""
    spent = (sampling.sampler_description(point.subject.loaded.config, point.subject.model) or {}).get("nfe")
    row = {"nfe_requested": point.nfe_requested, "nfe": spent, "steps": point.steps}
    asked = [key for metric in FIDELITY if metric in settings.metrics for key in ROW_KEYS[metric]]
    row.update({k: results[k] for k in asked if k in results})
    row.update({k: speed[k] for k in SPEED_KEYS})
    return row


def progress_line(row: dict, largest: int, name: str) -> str:
    """``nfe 8/64 (EulerSolver steps=8): fid 13.9 | 12.2 samples/s``."""
    fid = f"fid {row['fid']:.4g} | " if isinstance(row.get("fid"), float) else ""
    return (
        f"nfe {row['nfe_requested']}/{largest} ({name} steps={row['steps']}, {row['nfe']} spent): "
        f"{fid}{row['samples_per_sec']:.4g} samples/s"
    )


def plot_file(path: Path) -> Path:
    """The figure beside the evaluation file: ``evaluation.json`` -> ``evaluation_nfe.png``."""
    return path.with_name(f"{path.stem}_nfe.png")


def write_plot(path: Path, rows: list[dict], label: str) -> Path:
    """FID against NFE and against ms per sample (genexp.plots), written atomically beside ``path``."""
    curve = NFECurve(
        label,
        [float(r["nfe"]) for r in rows],
        [float(r["ms_per_sample"]) for r in rows],
        [float(r["fid"]) if isinstance(r.get("fid"), float) else float("nan") for r in rows],
    )
    target = plot_file(path)
    try:
        atomic.write_bytes(target, nfe_figure([curve], title=label))
    except OSError as err:
        raise write_failed("out", target, err) from None
    return target


def sweep(
    subject: Subject, settings: EvalSettings, extractor, info, path: Path, nfe: tuple[int, ...], given: dict
) -> Measured:
    """Every NFE measured in ascending order (a :data:`genexp.evaluation.Measure`); the top-level
    results are the largest NFE's, with bits/dim and reconstruction measured once."""
    option, name, points = build_points(subject, nfe)
    if set(settings.metrics) & set(FIDELITY):
        extractor, info = extractor_for(subject, settings, extractor, info)
    rows, results, speed = [], {}, {}
    for point in points:
        results, speed = measure_point(point, settings, extractor, info)
        rows.append(row_of(point, results, speed, settings))
        log.info(progress_line(rows[-1], nfe[-1], name))
        if point is not points[-1]:
            point.subject.model.to("cpu")  # one model on the device at a time
    largest = points[-1].subject._replace(model=points[-1].subject.model.to(subject.device))
    once = EvalSettings(**{**vars(settings), "metrics": tuple(m for m in settings.metrics if m != "speed")})
    results = {**results, **model_results(largest, once)}  # bits/dim, recon: the same at every NFE
    if "speed" in settings.metrics:
        results.update(speed)
    results["nfe"] = rows[-1]["nfe"]
    table = {"option": option, "name": name, "rows": rows}
    provenance = {"feature_extractor": info} if set(settings.metrics) & set(FIDELITY) else {}
    provenance["nfe_plot"] = str(write_plot(path, rows, f"{subject.family} {name}"))
    return Measured(results, provenance, largest, {"nfe_sweep": table}, {**given, "nfe": list(nfe)})


def for_sweep(settings: EvalSettings, nfe: tuple[int, ...]) -> tuple[EvalSettings, Measure]:
    """(the settings the run is loaded with, the :data:`genexp.evaluation.Measure` that sweeps ``nfe``).

    A ``sampler``/``solver`` the user gave is loaded at steps=1: each NFE sets its own steps, and the
    group's default (DDIM's 50) may not fit a short schedule. The fingerprint keeps the node as given."""
    given = {k: getattr(settings, k) for k in STEPPED if getattr(settings, k)}
    loading = {k: {**node, "steps": 1} for k, node in given.items() if "steps" in node}
    return dataclasses.replace(settings, **loading), functools.partial(sweep, nfe=nfe, given=given)
