"""The GPU check: every family trains, is scored and resumes on CUDA with every speed option on, then DDP.

For every model option (``configs/model/*.yaml``, read through ``genexp.families``: no family is
named here), in a worker process of its own (``python scripts/gpu_check.py --worker ...``, so one
failure or hang does not stop the others and its one-line error goes into the table), the real
genexp commands run one after another, exactly as the CLI runs them (``genexp.cli.main``):

1. ``genexp train model=<family> accelerator=gpu trainer.max_steps=50 performance.compile=true
   performance.channels_last=true performance.device_data=true`` on mnist5k (the default data), with
   no logger, validation, test or sample grids, ``last.ckpt`` kept. The precision is
   ``performance.precision=auto``, as genexp resolves it for that run (bf16-mixed on a GPU with
   native bf16; a family or recipe that keeps float32 through ``trainer.precision`` stays in
   float32); the table prints what the Trainer used, ``--precision`` forces one. A family that trains
   on a first stage (its ``family.needs_first_stage``: latent diffusion) trains one first in the same
   command, by the ``first_stage_train`` of the ``configs/experiment/`` recipe that trains it in two
   stages, cut to the same 50 steps (``genexp.two_stage``).
2. ``genexp sample ckpt=<run> n=16 device=cuda``: a grid and its ``.npz``.
3. ``genexp evaluate ckpt=<run> metrics='[fid,speed]' eval.num_samples=500 device=cuda``: FID of 500
   samples (classifier features against the test split, trained once and cached under
   ``$GENEXP_CACHE``) and samples/s (one timed batch of 64 after a warm-up batch).
4. ``genexp train ckpt_path=<run> trainer.max_steps=60``: resumes from ``last.ckpt`` (the run's
   overrides replayed, compile included); the step counter must go on.

Then ``genexp train model=<--ddp-family> accelerator=ddp`` (all visible GPUs) runs in a subprocess
(Lightning's launcher re-runs that command in every rank) for 20 steps and is resumed for 20 more;
its img/s is the resumed run's (``metrics.json``), whose first step, the recompilation, is not timed.

img/s: training images per second after the first 10 steps (which hold the compilation), each
step from batch end to batch end with a CUDA synchronise there (benchlib's StepTimes). Peak MiB:
``torch.cuda.max_memory_allocated`` over the training command (CPU: the peak RSS growth).
``--jobs 4`` (the default on CUDA) runs four families at once: their training steps are small and
mostly launch-bound, and compiling them is CPU work that the 16 cores share, so the whole check
should fit in ``--budget 480`` seconds (not yet measured on a GPU); img/s and samples/s are then
lower bounds (``--jobs 1``: each family alone, and longer). A family not started within the budget
is ``skipped``.

    python scripts/gpu_check.py --json gpu_check.json        # on a CUDA machine, at most ~8 minutes
    python scripts/gpu_check.py --smoke                      # CPU, tiny nets: proves the script here
    python scripts/gpu_check.py --smoke --families vae,ae --override ae:model.latent_dim=-1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import (
    QUIET_RUN,
    TINY_DATA,
    TINY_MODEL,
    PeakMemory,
    StepTimes,
    Table,
    child_env,
    command_line,
    device_label,
    error_line,
    families,
    has_config_group,
    step_timers,
    torch_label,
    write_json,
)

# QUIET_RUN with its checkpoints: evaluate and resume read last.ckpt
CHECKPOINTED_RUN = [o for o in QUIET_RUN if o != "~callbacks.model_checkpoint"]
SPEED = ["performance.compile=true", "performance.channels_last=true", "performance.device_data=true"]
# the smoke run: no torch.compile (inductor takes minutes per network on 2 CPU cores)
SMOKE_SPEED = ["performance.channels_last=true", "performance.device_data=true"]
SMOKE_DATA = [*TINY_DATA, "data.batch_size=16", "data.num_workers=0"]


class CheckTimes(StepTimes):
    """StepTimes that also keeps the precision the Trainer ran in and the networks compiled."""

    precision = ""
    compiled: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        from genexp.lit.performance import Performance

        self.precision = str(trainer.precision)
        self.compiled = [n for cb in trainer.callbacks if isinstance(cb, Performance) for n in cb.compiled]


# ------------------------------------------------------------------------------------ the worker
def speed_overrides(args) -> list[str]:
    if not has_config_group("performance"):  # an older tree: precision only, through the Trainer
        return [] if args.precision == "auto" else [f"trainer.precision={args.precision}"]
    chosen = [] if args.precision == "auto" else [f"performance.precision={args.precision}"]
    return [*(SMOKE_SPEED if args.smoke else SPEED), *chosen]


def two_stage_recipe(family: str) -> tuple[str, list[str]] | None:
    """``(recipe, first_stage_train)`` of the ``configs/experiment/`` recipe that trains ``family``
    (``override /model: <family>``) on a first stage it trains itself; None if there is none."""
    import genexp.configs
    import yaml

    for path in sorted((Path(genexp.configs.__file__).parent / "experiment").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        defaults = [d for d in data.get("defaults") or [] if isinstance(d, dict)]
        if any(d.get("override /model") == family for d in defaults) and data.get("first_stage_train"):
            return path.stem, [str(o) for o in data["first_stage_train"]]
    return None


def first_stage_overrides(args, run: Path) -> list[str]:
    """``model.first_stage`` and ``first_stage_train`` for a family that trains on a first stage: the
    recipe's first stage, as short and quiet as the check's own runs (tiny in the smoke run)."""
    from genexp.resume import override_key

    found = two_stage_recipe(args.family)
    if found is None:
        raise SystemExit(
            f"gpu_check: model={args.family} trains on a first stage and no configs/experiment/ recipe "
            "lists first_stage_train for it"
        )
    _, recipe = found
    stage_model = next((o.split("=", 1)[1] for o in recipe if override_key(o) == "model"), None)
    ours = [*CHECKPOINTED_RUN, f"trainer.max_steps={args.steps}"]
    if args.smoke and stage_model in TINY_MODEL:
        ours += TINY_MODEL[stage_model]
    keys = {override_key(o) for o in ours}
    items = [o for o in recipe if override_key(o) not in keys] + ours
    return [
        f"model.first_stage={run / 'first_stage'}",
        "+first_stage_train=[" + ",".join(f"'{o}'" for o in items) + "]",
    ]


def train_overrides(args, run: Path) -> list[str]:
    """``genexp train ...`` for the family's first run."""
    overrides = [
        "train",
        f"model={args.family}",
        *(SMOKE_DATA if args.smoke else []),
        f"accelerator={'cpu' if args.smoke else 'gpu'}",
        *CHECKPOINTED_RUN,
        *speed_overrides(args),
        f"trainer.max_steps={args.steps}",
        *(TINY_MODEL.get(args.family, []) if args.smoke else []),
    ]
    if families.get(args.family).needs_first_stage:
        overrides += first_stage_overrides(args, run)
    return [*overrides, *args.worker_overrides, f"hydra.run.dir={run}"]


def run_command(argv: list[str], device) -> tuple[CheckTimes | None, PeakMemory]:
    """``genexp <argv>`` in this process, its training runs timed; a failed command ends the worker
    with its exit status (its one line, ``genexp: error: ...``, is then the log's last word)."""
    import genexp.cli

    print(f"gpu_check: genexp {' '.join(argv)}", flush=True)
    with PeakMemory(device) as memory, step_timers(timer=CheckTimes) as timers:
        try:
            genexp.cli.main(list(argv))
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise
    return (timers[-1] if timers else None), memory  # a two-stage run: the second stage's


def worker(args) -> None:
    """One family's train, evaluate and resume, in this process; its numbers go to ``--out`` after
    every stage (``stage``: the one running, so a failure or a timeout names it)."""
    import torch

    device = torch.device("cpu" if args.smoke else "cuda")
    out = Path(args.out)
    run = out.parent / "run"
    result: dict = {"family": args.family}

    def stage(name: str) -> None:
        result["stage"] = name
        out.write_text(json.dumps(result))

    stage("train")
    timer, memory = run_command(train_overrides(args, run), device)
    metrics = json.loads((run / "metrics.json").read_text())
    result.update(
        precision=timer.precision,
        compiled=timer.compiled,
        img_per_sec=timer.img_per_sec_after(args.warmup),
        timed_steps=len(timer.steps) - args.warmup,
        peak_mib=memory.mib,
        memory=memory.kind,
        global_step=metrics["global_step"],
        parameters=metrics.get("num_parameters"),
    )
    stage("sample")
    run_command(
        ["sample", f"ckpt={run}", f"n={args.grid}", f"device={device.type}", "name=gpu_check"], device
    )
    grid = [run / "samples" / f"gpu_check.{ext}" for ext in ("png", "npz")]
    if not all(path.is_file() for path in grid):
        raise SystemExit(f"gpu_check: genexp sample wrote no {' or '.join(p.name for p in grid)}")
    stage("evaluate")
    run_command(evaluate_overrides(args, run, device), device)
    scores = json.loads((run / "evaluation.json").read_text())["metrics"]
    result.update(fid=scores.get("eval/fid"), samples_per_sec=scores.get("eval/samples_per_sec"))
    stage("resume")
    timer, _ = run_command(
        ["train", f"ckpt_path={run}", f"trainer.max_steps={args.steps + args.resume_steps}"], device
    )
    resumed = json.loads((run / "metrics.json").read_text())["global_step"]
    result.update(resumed_step=resumed, resume_img_per_sec=resumed_rate(timer))
    if resumed <= result["global_step"]:
        raise SystemExit(f"gpu_check: resumed at step {result['global_step']}, ended at step {resumed}")
    stage("done")


def resumed_rate(timer: CheckTimes | None) -> float | None:
    """img/s of a resumed run: a resume inside an epoch already leaves its first step untimed
    (StepTimes starts at the first batch end); at an epoch start the first step is dropped here."""
    if timer is None or not timer.steps:
        return None
    return timer.img_per_sec_after(1 if len(timer.steps) > 1 else 0)


def evaluate_overrides(args, run: Path, device) -> list[str]:
    return [
        "evaluate",
        f"ckpt={run}",
        "metrics=[fid,speed]",
        f"eval.num_samples={args.fid_samples}",
        "eval.speed_repeats=1",
        f"device={device.type}",
    ]


# ------------------------------------------------------------------------------------ the parent
LIVE: set[subprocess.Popen] = set()  # running children, killed (their whole group) on Ctrl-C


def run_logged(command: list[str], log: Path, cwd: Path, timeout: float, env: dict) -> int | None:
    """``command`` with its output in ``log``; its exit status, or None when ``timeout`` ran out (its
    process group, compile workers and DDP ranks included, is killed)."""
    with log.open("a") as sink:
        child = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        LIVE.add(child)
        try:
            return child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            kill_group(child)
            LIVE.discard(child)


def kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()


def check_family(args, family: str, work: Path, timeout: float) -> dict:
    """One family's worker; its row (``status``: ok, or failed with the stage and one line)."""
    out = work / family / "result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / "log.txt"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        f"--family={family}",
        f"--out={out}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--resume-steps={args.resume_steps}",
        f"--fid-samples={args.fid_samples}",
        f"--grid={args.grid}",
        f"--precision={args.precision}",
        *(["--smoke"] if args.smoke else []),
        "--",
        *args.overrides_by_family.get(family, []),
    ]
    start = time.perf_counter()
    code = run_logged(command, log, out.parent, timeout, worker_env(args))
    row = json.loads(out.read_text()) if out.is_file() else {"family": family, "stage": "start"}
    row["wall_s"] = time.perf_counter() - start
    if args.workdir:  # a temporary folder's log is gone once the check ends
        row["log"] = str(log)
    stage = row.pop("stage")
    if code == 0 and stage == "done":
        row["status"] = "ok"
    elif code is None:
        row["status"] = f"failed ({stage}): timed out after {timeout:.0f} s"
    else:
        row["status"] = f"failed ({stage}): {reason(log, code)}"
    return row


def reason(log: Path, code: int) -> str:
    """The log's one-line error, without the ``genexp: error:`` every genexp error starts with."""
    return error_line(log.read_text(errors="replace"), code).removeprefix("genexp: error: ")


def worker_env(args) -> dict[str, str]:
    """Jobs sharing the CPU cores get a share of the threads each (unless OMP_NUM_THREADS is set)."""
    extra = {"WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    return child_env(**extra)


def check_ddp(args, work: Path, timeout: float) -> dict:
    """``genexp train accelerator=ddp`` (smoke: ddp_cpu, 2 gloo processes) and its resume, as
    subprocesses of the real CLI; img/s of the resumed run (its first, recompiling step untimed)."""
    family, folder = args.ddp_family, work / "ddp"
    run, log = folder / "run", folder / "log.txt"
    folder.mkdir(parents=True, exist_ok=True)
    genexp = [sys.executable, "-m", "genexp.cli", "train"]
    first = [
        f"model={family}",
        *(SMOKE_DATA if args.smoke else []),
        f"accelerator={'ddp_cpu' if args.smoke else 'ddp'}",
        *CHECKPOINTED_RUN,
        *speed_overrides(args),
        f"trainer.max_steps={args.ddp_steps}",
        *(TINY_MODEL.get(family, []) if args.smoke else []),
        *args.overrides_by_family.get(family, []),
        f"hydra.run.dir={run}",
    ]
    resume = [f"ckpt_path={run}", f"trainer.max_steps={2 * args.ddp_steps}"]
    row: dict = {"family": f"{family} (DDP)"}
    start, code, stage = time.perf_counter(), 0, ""
    for name, argv in (("train", first), ("resume", resume)):
        left = timeout - (time.perf_counter() - start)
        code = run_logged([*genexp, *argv], log, folder, left, worker_env(args)) if left > 0 else None
        if code != 0:
            stage = name
            break
    row["wall_s"] = time.perf_counter() - start
    if args.workdir:
        row["log"] = str(log)
    text = log.read_text(errors="replace")
    if code is None:
        row["status"] = f"failed ({stage}): timed out after {timeout:.0f} s"
    elif code != 0:
        row["status"] = f"failed ({stage}): {reason(log, code)}"
    else:
        metrics = json.loads((run / "metrics.json").read_text())
        ranks = re.findall(r"Initializing distributed: GLOBAL_RANK: \d+, MEMBER: \d+/(\d+)", text)
        precision = re.findall(r"performance: precision (\S+?),", text)
        row.update(
            img_per_sec=metrics.get("train_img_per_sec"),
            global_step=args.ddp_steps,
            resumed_step=metrics.get("global_step"),
            world_size=int(ranks[-1]) if ranks else None,
            precision=precision[-1] if precision else None,
            status="ok" if metrics.get("global_step", 0) > args.ddp_steps else "failed (resume): no steps",
        )
        if row["world_size"]:
            row["family"] = f"{family} (DDP x{row['world_size']})"
    return row


def elapsed(start: float) -> str:
    seconds = int(time.perf_counter() - start)
    return f"{seconds // 60}:{seconds % 60:02d}"


def check_families(args, names: list[str], work: Path, start: float, save) -> dict[str, dict]:
    """Every family's worker, ``args.jobs`` at a time, each within what is left of the budget (less
    what the DDP check keeps); a progress line as each starts and ends."""
    deadline = start + args.budget - (0 if args.skip_ddp else args.ddp_reserve)
    rows: dict[str, dict] = {}
    lock = threading.Lock()

    def one(i: int, family: str) -> None:
        tag = f"[{i}/{len(names)}] {family}"
        left = deadline - time.perf_counter()
        if left < args.min_left:
            row = {"family": family, "status": f"skipped: --budget {args.budget:.0f} s spent"}
        else:
            print(f"{tag}: started ({elapsed(start)} elapsed)", flush=True)
            row = check_family(args, family, work, min(args.timeout, left))
        with lock:
            rows[family] = row
            save(rows)
        print(f"{tag}: {row['status']} ({row.get('wall_s', 0):.0f} s; {elapsed(start)} elapsed)", flush=True)

    pool = ThreadPoolExecutor(max_workers=args.jobs)
    futures = [pool.submit(one, i, f) for i, f in enumerate(names, 1)]
    try:
        for future in futures:
            future.result()
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        for child in list(LIVE):
            kill_group(child)
        raise
    pool.shutdown()
    return rows


def table_of(args, rows: list[dict]) -> Table:
    table = Table(
        [
            ("family", "family"),
            ("precision", "precision"),
            ("img_per_sec", "img/s"),
            ("peak_mib", "peak MiB"),
            ("samples_per_sec", "samples/s"),
            ("fid", f"FID ({args.fid_samples})"),
            ("resume", "resume (steps)"),
            ("wall_s", "wall s", "{:.0f}"),
            ("status", "status"),
        ]
    )
    for row in rows:
        if "resumed_step" in row:
            row["resume"] = f"{row['global_step']} → {row['resumed_step']}"
        table.add(row)
    return table


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--families", default=None, help="comma-separated model options (default: every configs/model/ one)")
    add(
        "--override",
        action="append",
        default=[],
        metavar="FAMILY:KEY=VALUE",
        help="an extra genexp train override for one family's runs (repeatable)",
    )
    add(
        "--precision", default="auto", help="performance.precision of every run (default auto: genexp's rule)"
    )
    add("--steps", type=int, default=None, help="training steps per family (default 50; smoke 6)")
    add("--warmup", type=int, default=None, help="of which untimed first, compilation included (10; 2)")
    add("--resume-steps", type=int, default=None, help="steps the resumed run adds (10; 2)")
    add("--fid-samples", type=int, default=None, help="generated images for FID (500; smoke 16)")
    add("--grid", type=int, default=16, help="images of the genexp sample grid")
    add("--jobs", type=int, default=None, help="families at once (CUDA 4, smoke 1)")
    add("--budget", type=float, default=None, help="seconds for everything (480; smoke 1200)")
    add("--timeout", type=float, default=None, help="seconds per family at most (240; smoke 300)")
    add("--min-left", type=float, default=30, help="no family starts with fewer seconds of budget left")
    add("--ddp-family", default="ddpm", help="the model option of the DDP check")
    add("--ddp-steps", type=int, default=None, help="DDP steps, then as many again resumed (20; smoke 3)")
    add("--ddp-reserve", type=float, default=90, help="seconds of the budget the families leave to DDP")
    add("--skip-ddp", action="store_true", help="no DDP check (its row says so)")
    add("--smoke", action="store_true", help="CPU, tiny nets on tiny synthetic data, no compile")
    add("--workdir", default=None, help="keep the runs and logs here (default: a temporary folder)")
    add("--json", default=None, help="also write the rows to this file (after every family)")
    add("--worker", action="store_true", help=argparse.SUPPRESS)
    add("--family", default=None, help=argparse.SUPPRESS)
    add("--out", default=None, help=argparse.SUPPRESS)
    add("worker_overrides", nargs="*", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with the GPU or smoke defaults filled in; the parent's checked (families known,
    ``--override`` as FAMILY:KEY=VALUE, CUDA present unless ``--smoke``)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "steps": 6 if smoke else 50,
        "warmup": 2 if smoke else 10,
        "resume_steps": 2 if smoke else 10,
        "fid_samples": 16 if smoke else 500,
        "jobs": 1 if smoke else 4,
        "budget": 1200 if smoke else 480,
        "timeout": 300 if smoke else 240,
        "ddp_steps": 3 if smoke else 20,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        return args
    known = families.names()
    args.names = [f for f in (args.families or ",".join(known)).split(",") if f]
    unknown = [f for f in [*args.names, args.ddp_family] if f not in known]
    args.overrides_by_family = {}
    for item in args.override:
        family, sep, override = item.partition(":")
        if not sep or not ("=" in override or override.startswith("~")):
            parser.error(f"--override {item}: write FAMILY:KEY=VALUE")
        unknown += [] if family in known else [family]
        args.overrides_by_family.setdefault(family, []).append(override)
    if unknown:
        parser.error(f"not a model option: {', '.join(unknown)}; pick from {', '.join(known)}")
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} leaves none of --steps {args.steps} timed")
    import torch

    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here; --smoke runs the script on the CPU with tiny nets")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    start = time.perf_counter()
    gpus = 0 if args.smoke else torch.cuda.device_count()
    device = "cpu (smoke)" if args.smoke else f"{device_label('cuda')} x{gpus}"
    print(
        f"gpu check: {len(args.names)} families on {device}, {torch_label()}, {args.jobs} at a time, "
        f"budget {args.budget:.0f} s; {args.steps} steps each ({args.warmup} untimed), FID of "
        f"{args.fid_samples} samples, resume +{args.resume_steps}",
        flush=True,
    )
    payload = {
        "device_name": device,
        "torch": torch_label(),
        "rows": [],
        "args": vars(args),
        "command": command_line(),
    }

    def save(rows: dict) -> None:  # partial results survive a kill
        payload["rows"] = [rows[f] for f in [*args.names, "ddp"] if f in rows]
        write_json(args.json, payload, say=False)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir).resolve() if args.workdir else Path(tmp)
        rows = check_families(args, args.names, work, start, save)
        left = args.budget - (time.perf_counter() - start)
        tag = f"[ddp] {args.ddp_family} on {'2 CPU processes' if args.smoke else f'{gpus} GPUs'}"
        if args.skip_ddp:
            rows["ddp"] = {"family": f"{args.ddp_family} (DDP)", "status": "skipped: --skip-ddp"}
        elif left < args.min_left:
            rows["ddp"] = {
                "family": f"{args.ddp_family} (DDP)",
                "status": f"skipped: --budget {args.budget:.0f} s spent",
            }
        else:
            print(f"{tag}: started ({elapsed(start)} elapsed)", flush=True)
            rows["ddp"] = check_ddp(args, work, min(args.timeout, left))
            print(f"{tag}: {rows['ddp']['status']} ({elapsed(start)} elapsed)", flush=True)
        save(rows)
        print()
        table_of(args, payload["rows"])
    counts = {s: sum(r["status"].startswith(s) for r in payload["rows"]) for s in ("ok", "failed", "skipped")}
    payload["wall_s"] = time.perf_counter() - start
    print(
        f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped in "
        f"{payload['wall_s']:.0f} s on {device}; img/s after {args.warmup} warm-up steps"
        + (f", {args.jobs} families at a time" if args.jobs > 1 else "")
    )
    print(f"command: {command_line()}")
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
