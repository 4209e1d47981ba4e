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
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from genexp import atomic, families, layout, progress
from genexp.errors import GenexpError
from genexp.signals import Interrupted, block, signal_name

log = logging.getLogger("genexp")

FAILED = layout.COMPARE_FAILED
MAX_SEEDS = 1000
MAX_BUDGET_MINUTES = 14 * 24 * 60  # two weeks a run: beyond that a typo, not a plan
# seconds a stopped compare gives its training run to save last.ckpt (SLURM kills 30 s after SIGTERM)
STOP_GRACE_S = 20.0


def default_families() -> list[str]:
    """Every model option but those that need a first stage (compare trains one stage per run)."""
    return [name for name in families.names() if not families.get(name).needs_first_stage]


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
        if (self.run_dir / layout.METRICS_JSON).is_file():
            return "finished"
        if (self.run_dir / FAILED).is_file():
            return "failed"
        if layout.last_ckpt(self.run_dir).is_file():
            return "partial"
        return "new"

    def started(self) -> bool:
        return (self.run_dir / layout.HYDRA_DIR).is_dir()


def genexp_command() -> list[str]:
    """The console script of this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "genexp.cli"]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the compare process dies, even by SIGKILL (Linux
    ``PR_SET_PDEATHSIG``; elsewhere a no-op), so no training run outlives it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# a multirun's job start, "#3 : model=vae seed=1 <the common overrides>": compare puts model and seed first
JOB_START = re.compile(r"\[HYDRA\]\s+#(\d+) : (.+)$")


class JobClock:
    """Which job of a training sweep is running, and when the sweep should end: a line per job start.

    Before any job has finished the ETA is the budget alone (``≥``: evaluation and test come on
    top); from then on, the mean time of the finished jobs (``~``)."""

    def __init__(self, total: int, budget_s: float):
        self.total, self.budget_s = total, budget_s
        self.start = time.monotonic()

    def line(self, text: str) -> str | None:
        """The progress line for a child's output line that starts job k (else None)."""
        match = JOB_START.search(text)
        if match is None:
            return None
        done = int(match.group(1))
        elapsed = time.monotonic() - self.start
        per_job, sign = (elapsed / done, "~") if done else (self.budget_s, "≥")
        eta = progress.duration(per_job * (self.total - done))
        return (
            f"compare: job {done + 1}/{self.total} ({' '.join(match.group(2).split()[:2])}) | "
            f"{progress.duration(elapsed)} elapsed, ETA {sign}{eta}"
        )


def run_logged(cmd: list[str], label: str, clock: JobClock | None = None) -> tuple[int, list[str]]:
    """Run ``cmd``, passing its output on to the log line by line; return (exit code, last lines).
    ``clock``: a line of which job of how many, and the ETA, when a multirun starts a job.

    The child runs in its own process group; a stop signal here (genexp.signals) is passed on to
    that group, the child gets :data:`STOP_GRACE_S` to save and exit, then the group is killed."""
    log.info("%s: %s", label, " ".join(cmd[2:]))
    env = {**os.environ}
    env.pop("GENEXP_COMMAND", None)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        bufsize=1,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    ) as proc:
        try:
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                log.info("  %s", line)
                started = clock.line(line) if clock is not None else None
                if started:
                    log.info("%s", started)
        except (Interrupted, KeyboardInterrupt) as err:
            signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
            code = stop_child(proc, signum)
            raise Interrupted(
                signum,
                f"stopped by {signal_name(signum)}: passed it on to the training run (pid {proc.pid}), "
                f"which exited with status {code}; run the same command again to resume",
            ) from None
        code = proc.wait()
    return code, list(tail)


def stop_child(proc: subprocess.Popen, signum: int) -> int:
    """Send ``signum`` to the child's process group, wait up to :data:`STOP_GRACE_S` (reading its
    output, or it would block on a full pipe), then SIGKILL the group. Returns its exit status."""
    block()  # a second signal must not leave the child orphaned half-way through this
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)
    try:
        out, _ = proc.communicate(timeout=STOP_GRACE_S)
        for line in (out or "").splitlines()[-20:]:
            log.info("  %s", line.rstrip())
    except subprocess.TimeoutExpired:
        log.warning(
            "the training run did not stop within %.0f s of %s: killing it", STOP_GRACE_S, signal_name(signum)
        )
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what else is left in its group (data workers)
    return proc.wait()


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
    payload = {"family": job.family, "seed": job.seed, "returncode": code, "error": message}
    atomic.write_json(job.run_dir / FAILED, payload)
    log.warning("%s failed: %s", job.name, message)


def failure(job: Job) -> str:
    try:
        return json.loads((job.run_dir / FAILED).read_text()).get("error", "?")
    except (OSError, json.JSONDecodeError):
        return "?"


def interrupted(code: int) -> bool:
    """Preempted (75, last.ckpt saved), killed by a signal or Ctrl-C: resumable, not a failure."""
    return code < 0 or code in (75, 130, 137, 143)


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
    if not (OmegaConf.is_list(value) or isinstance(value, list | tuple)):
        raise GenexpError(
            f"train_args={value}: must be overrides for genexp train, e.g. train_args='data.batch_size=128'"
        )
    return [str(a) for a in value]


def check_config(cfg: DictConfig) -> tuple[list[str], list[int]]:
    """The families and seeds to train; every key refused in one line before anything runs."""
    seeds, budget = cfg.get("seeds"), cfg.get("budget_minutes")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS:
        raise GenexpError(
            f"seeds={seeds}: must be a whole number of seeds from 1 to {MAX_SEEDS}; e.g. seeds=3"
        )
    if (
        isinstance(budget, bool)
        or not isinstance(budget, int | float)
        or not 0 < budget <= MAX_BUDGET_MINUTES
    ):
        raise GenexpError(
            f"budget_minutes={budget}: must be a number of minutes above 0 and at most "
            f"{MAX_BUDGET_MINUTES} (two weeks); e.g. budget_minutes=5"
        )
    chosen = parse_families(cfg.get("families"))
    extra = train_args(cfg.get("train_args"))
    staged = [f for f in chosen if families.get(f).needs_first_stage]
    given = any(a.lstrip("+").startswith("model.first_stage=") for a in extra)
    if staged and not (given and len(chosen) == 1):
        raise GenexpError(
            f"families=[{','.join(chosen)}]: {', '.join(staged)} needs a trained first stage (model.first_stage), "
            "which compare does not train; train both stages with genexp train experiment=ldm_two_stage, "
            f"or compare it alone on one: families=[{staged[0]}] train_args='model.first_stage=<AE/VAE run dir>'"
        )
    return chosen, list(range(seeds))


def parse_families(value) -> list[str]:
    """``families``: a list or a comma-separated string of ``model/`` options (null: the defaults)."""
    options = families.names()
    if value is None:
        return default_families()
    if isinstance(value, str):
        chosen = [f.strip() for f in value.split(",") if f.strip()]
    elif OmegaConf.is_list(value) or isinstance(value, list | tuple):
        chosen = [str(f) for f in value]
    else:
        chosen = [str(value)]
    unknown = [f for f in chosen if f not in options]
    if unknown or not chosen:
        defaults = default_families()
        example = f"{defaults[0]},{defaults[-1]}"  # two of them, the first and the last
        raise GenexpError(
            f"families=[{','.join(chosen)}]: {', '.join(unknown) or 'empty'} is not a model option; "
            f"pick from {', '.join(options)}, e.g. families=[{example}]"
        )
    return list(dict.fromkeys(chosen))


def sweep(new: list[Job], common: list[str], budget_s: float) -> list[str]:
    """Train ``new`` (a full family x seed grid) as one Hydra multirun; return the finished names.
    A job the sweep started but did not finish is marked failed; unstarted ones are left new."""
    names = list(dict.fromkeys(j.family for j in new))
    seeds = list(dict.fromkeys(j.seed for j in new))
    code, tail = run_logged(
        [
            *genexp_command(),
            "train",
            "-m",
            f"model={','.join(names)}",
            f"seed={','.join(map(str, seeds))}",
            *common,
            f"hydra.sweep.dir={new[0].run_dir.parent}",
            "hydra.sweep.subdir=${hydra:runtime.choices.model}-seed${seed}",
        ],
        f"training {len(new)} runs ({', '.join(names)} x seeds {', '.join(map(str, seeds))})",
        JobClock(len(new), budget_s),
    )
    if code and interrupted(code):
        raise GenexpError("training was interrupted; run the same command again to resume")
    trained = []
    for job in new:
        if job.state() == "finished":
            trained.append(job.name)
        elif code and job.started():  # this job stopped the sweep (or failed within it)
            mark_failed(job, code, error_line(tail))
    return trained


def train_one(job: Job, common: list[str], place: str = "") -> bool:
    """Resume a partial run or train a new one alone; True when it finished. A run that failed is
    marked; one refused before its run dir existed means the command itself is wrong (raised)."""
    if job.state() == "partial":
        cmd, label = [*genexp_command(), "train", f"ckpt_path={job.run_dir}"], f"resuming {job.name}{place}"
    else:
        args = [f"model={job.family}", f"seed={job.seed}", *common, f"hydra.run.dir={job.run_dir}"]
        cmd, label = [*genexp_command(), "train", *args], f"training {job.name}{place}"
    code, tail = run_logged(cmd, label)
    if code and interrupted(code):
        raise GenexpError("training was interrupted; run the same command again to resume")
    if job.state() == "finished":
        return True
    if not job.started():
        raise GenexpError(f"training {job.name} did not start: {error_line(tail)}")
    mark_failed(job, code, error_line(tail))
    return False


def train_jobs(cfg: DictConfig, jobs: list[Job], common: list[str]) -> tuple[list[str], list[str]]:
    """Train what is not finished; return (trained, failed) run names."""
    if cfg.get("retry_failed"):
        for job in jobs:
            if job.state() == "failed":
                (job.run_dir / FAILED).unlink()
    new = [j for j in jobs if j.state() == "new"]
    grid = len({j.family for j in new}) * len({j.seed for j in new})
    budget_s = 60 * float(cfg.budget_minutes)
    trained = sweep(new, common, budget_s) if new and len(new) == grid else []
    # interrupted runs, and what a failed sweep left unstarted
    left = [j for j in jobs if j.state() in ("partial", "new")]
    for k, job in enumerate(left, 1):
        if train_one(job, common, f" (run {k}/{len(left)})"):
            trained.append(job.name)
    failed = [j.name for j in jobs if j.state() == "failed"]
    return trained, failed


def up_to_date(job: Job, fingerprint: dict) -> bool:
    """An ``evaluation.json`` with these settings, newer than the run's checkpoint, and merged into
    its ``metrics.json`` (which a resumed run rewrites)."""
    path = job.run_dir / layout.EVALUATION_JSON
    ckpt = layout.last_ckpt(job.run_dir)
    if not path.is_file() or not ckpt.is_file():
        return False
    try:
        stored = json.loads(path.read_text()).get("settings")
        merged = "eval" in json.loads((job.run_dir / layout.METRICS_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return stored == fingerprint and merged and path.stat().st_mtime >= ckpt.stat().st_mtime


def has_sampler(job: Job) -> bool:
    """Whether the run's family takes a ``sampler`` (diffusion: a ``model.sampler`` node)."""
    return "sampler" in families.get(job.family).sample_options


def evaluate_jobs(cfg: DictConfig, jobs: list[Job]) -> list[str]:
    """Evaluate every finished run whose evaluation is missing or stale; return the names evaluated."""
    from genexp.evaluation import evaluate_checkpoint, settings_from_config

    chosen = settings_from_config(cfg)
    done = []
    for job in progress.track(jobs, "compare: evaluating runs"):
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
            atomic.write_json(job.run_dir / layout.EVALUATION_JSON, {"error": first, "settings": fingerprint})
    return done


def run(cfg: DictConfig, group_args: list[str] | None = None) -> CompareResult:
    """Run ``genexp compare`` from its composed config (``configs/compare.yaml``).

    Args:
        group_args: the train overrides that pick the dataset and accelerator (``dataset=mnist5k``,
            ``accelerator=cpu``, ``dataset.x=...``); the CLI passes the user's choices of those
            groups and the ``dataset.*`` overrides.
    """
    from genexp.report import write_report

    chosen, seeds = check_config(cfg)
    group_args = list(group_args or ["dataset=mnist5k", "accelerator=auto"])
    dataset = next((a.split("=", 1)[1] for a in group_args if a.startswith("dataset=")), "mnist5k")
    out = Path(cfg.out).expanduser() if cfg.get("out") else Path("compare") / dataset
    out = out.resolve()
    runs = out / "runs"
    jobs = [Job(f, s, runs / f"{f}-seed{s}") for f, s in itertools.product(chosen, seeds)]
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
    with progress.reporting(progress.auto()):
        evaluated = evaluate_jobs(cfg, jobs)
    meta = {
        "dataset": dataset,
        "families": chosen,
        "seeds": seeds,
        "budget_minutes": float(cfg.budget_minutes),
        "train_overrides": common,
        "evaluation": OmegaConf.to_container(cfg.eval, resolve=True) if cfg.get("eval") else {},
    }
    atomic.write_json(out / "compare.json", meta)
    html, markdown = write_report(out, out / "report")
    return CompareResult(out, jobs, trained, skipped, failed, evaluated, html, markdown)


compare = run  # the name tests and scripts call
