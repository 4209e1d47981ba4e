"""``genexp evaluate``: FID/KID/precision-recall, bits/dim, reconstruction and speed of a trained run.

Writes ``<run dir>/evaluation.json`` (or ``out=``) and merges the metrics into the run's
``metrics.json`` under ``"eval"``; the evaluation itself is :mod:`genexp.evaluation`, shared with
``genexp compare``; ``nfe=[...]`` measures it at each NFE of the run's sampler or solver instead
(:mod:`genexp.nfe_sweep`). Settings: ``configs/evaluate.yaml`` and its ``eval/`` group.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from genexp import layout, nfe_sweep, progress
from genexp.errors import GenexpError
from genexp.evaluation import evaluate_checkpoint, evaluation_file, measure, settings_from_config


def run(cfg: DictConfig) -> tuple[dict, Path]:
    """Run ``genexp evaluate`` from its composed config; return the evaluation and the file it is in."""
    if not cfg.get("ckpt"):
        raise GenexpError("ckpt: missing; pass ckpt=<run dir|.ckpt|latest>")
    settings = settings_from_config(cfg)
    nfe = nfe_sweep.check_nfe(cfg.get("nfe"))  # before any work, like the settings
    out = cfg.get("out")
    settings, measured_by = nfe_sweep.for_sweep(settings, nfe) if nfe else (settings, measure)
    with progress.reporting(progress.auto()):
        evaluation = evaluate_checkpoint(str(cfg.ckpt), settings, out, measured_by)
    path = evaluation_file(out) or Path(evaluation["provenance"]["run_dir"]) / layout.EVALUATION_JSON
    return evaluation, path


evaluate = run  # the name tests and scripts call
