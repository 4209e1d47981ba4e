"""The names of the files a run dir holds: one place, read by every command and the report.

A run dir (``outputs/<model>-<dataset>/<timestamp>/``) is written by ``genexp train`` and read back by
``sample``, ``evaluate``, ``compare``, ``report`` and resume; each of them names its files through
these constants so that a rename cannot leave a reader behind. Pure Python, imports nothing.
"""

from __future__ import annotations

from pathlib import Path

HYDRA_DIR = ".hydra"  # Hydra's record of the run: the composed config and the command-line overrides
CONFIG_YAML = "config.yaml"
OVERRIDES_YAML = "overrides.yaml"
HYDRA_YAML = "hydra.yaml"  # Hydra's own settings of the run (the job name, the sweep)
CHECKPOINTS = "checkpoints"
LAST_CKPT = "last.ckpt"  # the newest training state: what resume continues from
BEST_CKPT = "best.ckpt"  # the monitored best weights: what the run's own test scored
METRICS_JSON = "metrics.json"  # the run's results (fit, test, evaluation)
METRICS_CSV = "metrics.csv"  # the csv logger's curves, under CSV_DIR
CSV_DIR = "csv"
EVALUATION_JSON = "evaluation.json"  # genexp evaluate's full record
SAMPLES = "samples"  # sample grids and .npz files
COMPARE_FAILED = "compare_failed.json"  # genexp compare's mark on a run that failed
LOCK = ".genexp.lock"  # held while a process trains in the run dir (a search: in its sweep dir)
STUDY_JSON = "study.json"  # in a search's sweep dir: the study's trials, for genexp report


def config_yaml(run_dir: Path) -> Path:
    return Path(run_dir) / HYDRA_DIR / CONFIG_YAML


def overrides_yaml(run_dir: Path) -> Path:
    return Path(run_dir) / HYDRA_DIR / OVERRIDES_YAML


def last_ckpt(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / LAST_CKPT


def best_ckpt(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / BEST_CKPT
