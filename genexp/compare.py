"""``genexp compare``: every family on one dataset, several seeds, one time budget; then evaluate and report.

Training is one Hydra multirun of ``genexp train`` in a subprocess (``logger=csv``, the same
``trainer.max_time`` for every run), one run dir per job: ``<out>/runs/<family>-seed<seed>/``.
Re-running the same command is cheap and resumable: runs with a ``metrics.json`` are skipped, runs
with a checkpoint but no ``metrics.json`` (interrupted) resume with ``ckpt_path=<run dir>``, runs
that failed (diverged: a non-finite loss, or any training error) are recorded in
``compare_failed.json`` and counted as such in the report (``retry_failed=true`` trains them
again). Every finished run is then evaluated (skipped when its ``evaluation.json`` has the same
settings and is newer than the checkpoint) and ``<out>/report/`` is written.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from genexp.errors import ConfigError, GenexpError, check_float, check_int

log = logging.getLogger("genexp")

# families that need more than a dataset to train (latent diffusion: a trained first stage)
NEEDS_SETUP = ("ldm",)
FAILED = "compare_failed.json"


def model_options() -> list[str]:
    """The options of the installed ``model/`` config group (every family there is, now)."""
    folder = resources.files("genexp.configs") / "model"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def default_families() -> list[str]:
    """Every model option but those that need extra setup (``ldm``)."""
    return [f for f in model_options() if f not in NEEDS_SETUP]


def max_time(minutes: float) -> str:
    """Minutes -> Lightning's ``DD:HH:MM:SS`` (at least one second)."""
    seconds = max(1, round(minutes * 60))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    mins, secs = divmod(rest, 60)
    return f"{days:02d}:{hours:02d}:{mins:02d}:{secs:02d}"


@dataclass
class Job:
    family: str
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name

    def state(self) -> str:
        """``finished`` | ``failed`` | ``partial`` (has a checkpoint) | ``new``."""
        if (self.run_dir / "metrics.json").is_file():
            return "finished"
        if (self.run_dir / FAILED).is_file():
            return "failed"
        if (self.run_dir / "checkpoints" / "last.ckpt").is_file():
            return "partial"
        return "new"

    def started(self) -> bool:
        return (self.run_dir / ".hydra").is_dir()


def genexp_command() -> list[str]:
    """The console script of this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "genexp.cli"]


def run_logged(cmd: list[str], label: str) -> tuple[int, list[str]]:
    """Run ``cmd``, passing its output on to the log line by line; return (exit code, last lines)."""
    log.info("%s: %s", label, " ".join(cmd[2:]))
    env = {**os.environ}
    env.pop("GENEXP_COMMAND", None)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
    ) as proc:
        try:
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                log.info("  %s", line)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        code = proc.wait()
    return code, list(tail)


def error_line(tail: list[str]) -> str:
    """The child's one-line genexp error, or its last line."""
    for line in reversed(tail):
        if "genexp: error:" in line:
            return line.split("genexp: error:", 1)[1].strip()
    for line in reversed(tail):
        if line.strip():
            return line.strip()[:500]
    return "training failed (no output)"


def mark_failed(job: Job, code: int, message: str) -> None:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"family": job.family, "seed": job.seed, "returncode": code, "error": message}
    (job.run_dir / FAILED).write_text(json.dumps(payload, indent=2) + "\n")
    log.warning("%s failed: %s", job.name, message)


def failure(job: Job) -> str:
    try:
        return json.loads((job.run_dir / FAILED).read_text()).get("error", "?")
    except (OSError, json.JSONDecodeError):
        return "?"


def interrupted(code: int) -> bool:
    """Killed by a signal or Ctrl-C: resumable, not a failure of the run."""
    return code < 0 or code in (130, 137, 143)


@dataclass
class CompareResult:
    out: Path
    jobs: list[Job]
    trained: list[str]
    skipped: list[str]
    failed: list[str]
    evaluated: list[str]
    html: Path
    markdown: Path


def train_args(value) -> list[str]:
    """``train_args``: a list of overrides, or one string of them separated by spaces (easier to type:
    ``train_args='data.batch_size=128 trainer.precision=bf16-mixed'``)."""
    if not value:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(a) for a in value]


def check_config(cfg: DictConfig) -> tuple[list[str], list[int]]:
    try:
        seeds = check_int("seeds", cfg.seeds, minimum=1)
        check_float("budget_minutes", cfg.budget_minutes, positive=True)
    except ConfigError as err:
        raise GenexpError(str(err)) from None
    options = model_options()
    families = cfg.get("families")
    if families is None:
        families = default_families()
    elif isinstance(families, str):
        families = [f.strip() for f in families.split(",") if f.strip()]
    else:
        families = [str(f) for f in families]
    unknown = [f for f in families if f not in options]
    if unknown or not families:
        raise GenexpError(f"families={families}: each must be one of {', '.join(options)} (the model/ group)")
    return list(dict.fromkeys(families)), list(range(seeds))


def train_jobs(cfg: DictConfig, jobs: list[Job], common: list[str]) -> tuple[list[str], list[str]]:
    """Train what is not finished; return (trained, failed) run names."""
    trained: list[str] = []
    retry = bool(cfg.get("retry_failed"))
    for job in jobs:
        if job.state() == "failed" and retry:
            (job.run_dir / FAILED).unlink()
    cli = genexp_command()

    new = [j for j in jobs if j.state() == "new"]
    families = list(dict.fromkeys(j.family for j in new))
    seeds = list(dict.fromkeys(j.seed for j in new))
    if new and len(new) == len(families) * len(seeds):  # a full grid: one Hydra multirun
        runs = new[0].run_dir.parent
        code, tail = run_logged(
            [
                *cli,
                "train",
                "-m",
                f"model={','.join(families)}",
                f"seed={','.join(map(str, seeds))}",
                *common,
                f"hydra.sweep.dir={runs}",
                "hydra.sweep.subdir=${hydra:runtime.choices.model}-seed${seed}",
            ],
            f"training {len(new)} runs ({', '.join(families)} x seeds {', '.join(map(str, seeds))})",
        )
        if code and interrupted(code):
            raise GenexpError("training was interrupted; run the same command again to resume")
        for job in new:
            if job.state() == "finished":
                trained.append(job.name)
            elif code and job.started():  # this job stopped the sweep (or failed within it)
                mark_failed(job, code, error_line(tail))

    for job in jobs:  # interrupted runs, and what a failed sweep left unstarted
        state = job.state()
        if state == "partial":
            cmd, label = [*cli, "train", f"ckpt_path={job.run_dir}"], f"resuming {job.name}"
        elif state == "new":
            cmd = [
                *cli,
                "train",
                f"model={job.family}",
                f"seed={job.seed}",
                *common,
                f"hydra.run.dir={job.run_dir}",
            ]
            label = f"training {job.name}"
        else:
            continue
        code, tail = run_logged(cmd, label)
        if code and interrupted(code):
            raise GenexpError("training was interrupted; run the same command again to resume")
        if job.state() == "finished":
            trained.append(job.name)
        elif not job.started():  # refused before a run dir existed: the command itself is wrong
            raise GenexpError(f"training {job.name} did not start: {error_line(tail)}")
        else:
            mark_failed(job, code, error_line(tail))
    failed = [j.name for j in jobs if j.state() == "failed"]
    return trained, failed


def up_to_date(job: Job, fingerprint: dict) -> bool:
    """An ``evaluation.json`` with these settings, newer than the run's checkpoint, and merged into
    its ``metrics.json`` (which a resumed run rewrites)."""
    path = job.run_dir / "evaluation.json"
    ckpt = job.run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file() or not ckpt.is_file():
        return False
    try:
        stored = json.loads(path.read_text()).get("settings")
        merged = "eval" in json.loads((job.run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return stored == fingerprint and merged and path.stat().st_mtime >= ckpt.stat().st_mtime


def has_sampler(job: Job) -> bool:
    """Whether the run's family has a ``model.sampler`` (diffusion)."""
    import yaml

    try:
        config = yaml.safe_load((job.run_dir / ".hydra" / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return "sampler" in (config.get("model") or {})


def evaluate_jobs(cfg: DictConfig, jobs: list[Job]) -> list[str]:
    """Evaluate every finished run whose evaluation is missing or stale; return the names evaluated."""
    from genexp.evaluate import evaluate_checkpoint, settings_from_config, write_json

    chosen = settings_from_config(cfg)
    done = []
    for job in jobs:
        settings = chosen
        if chosen.sampler is not None and not has_sampler(job):  # sampler=... is for diffusion runs only
            settings = dataclasses.replace(chosen, sampler=None)
        fingerprint = settings.fingerprint()
        if job.state() != "finished" or up_to_date(job, fingerprint):
            continue
        log.info("evaluating %s (%s)", job.name, ", ".join(settings.metrics))
        try:
            evaluate_checkpoint(str(job.run_dir), settings)
            done.append(job.name)
        except (GenexpError, RuntimeError, ValueError) as err:  # e.g. a diverged model's NaN samples
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("%s: evaluation failed: %s", job.name, first)
            write_json(job.run_dir / "evaluation.json", {"error": first, "settings": fingerprint})
    return done


def compare(cfg: DictConfig, group_args: list[str] | None = None) -> CompareResult:
    """Run ``genexp compare`` from its composed config (``configs/compare.yaml``).

    Args:
        group_args: the train overrides that pick the dataset and accelerator (``dataset=mnist5k``,
            ``accelerator=cpu``, ``dataset.x=...``); the CLI passes the user's choices of those
            groups and the ``dataset.*`` overrides.
    """
    from genexp.report import write_report

    families, seeds = check_config(cfg)
    group_args = list(group_args or ["dataset=mnist5k", "accelerator=auto"])
    dataset = next((a.split("=", 1)[1] for a in group_args if a.startswith("dataset=")), "mnist5k")
    out = Path(cfg.out).expanduser() if cfg.get("out") else Path("compare") / dataset
    out = out.resolve()
    runs = out / "runs"
    jobs = [Job(f, s, runs / f"{f}-seed{s}") for f, s in itertools.product(families, seeds)]
    common = [
        *group_args,
        "logger=csv",
        f"trainer.max_time={max_time(float(cfg.budget_minutes))}",
        # the budget alone ends training, even mid-epoch (then validation, checkpoint and test run)
        "trainer.max_epochs=-1",
        "trainer.min_epochs=0",
        *train_args(cfg.get("train_args")),
    ]
    skipped = []
    for job in jobs:
        state = job.state()
        if state == "finished" or (state == "failed" and not cfg.get("retry_failed")):
            skipped.append(job.name)
            why = "" if state == "finished" else f": {failure(job)}; retry_failed=true trains it again"
            log.info("skipping %s (%s%s)", job.name, state, why)
    start = time.perf_counter()
    trained, failed = train_jobs(cfg, jobs, common)
    log.info(
        "training: %d trained, %d skipped, %d failed (%.0fs)",
        len(trained),
        len(skipped),
        len(failed),
        time.perf_counter() - start,
    )
    evaluated = evaluate_jobs(cfg, jobs)
    meta = {
        "dataset": dataset,
        "families": families,
        "seeds": seeds,
        "budget_minutes": float(cfg.budget_minutes),
        "train_overrides": common,
        "evaluation": OmegaConf.to_container(cfg.eval, resolve=True) if cfg.get("eval") else {},
    }
    (out / "compare.json").write_text(json.dumps(meta, indent=2) + "\n")
    html, markdown = write_report(out, out / "report")
    return CompareResult(out, jobs, trained, skipped, failed, evaluated, html, markdown)
