"""bf16-mixed against fp32 on the CPU, per family: speed and the training-loss curve.

Each family trains ``--steps`` optimizer steps (its own default per family, ``STEPS``) with its ``model=``
defaults on mnist5k three times, each a real ``genexp train`` process with ``--threads`` OpenMP threads:
fp32 at seed 0, fp32 at seed 1 (the seed-to-seed spread of the curve: the noise a precision change must
stay inside) and ``performance.precision=bf16-mixed`` at seed 0. The table reports train img/s of both
precisions, the mean ``train/loss`` over the last quarter of the logged steps for each run, and

    ratio = |loss_bf16 - loss_fp32(seed 0)| / max(|loss_fp32(seed 1) - loss_fp32(seed 0)|, 0.5% of |loss_fp32|)

A family passes when its bf16 curve stays finite, ``ratio <= 2`` (bf16 is within twice the seed spread) and
bf16 is at least ``--min-speedup`` faster; ``performance.precision=auto`` picks bf16-mixed on a CPU with
native bf16 (AMX) only for the families whose ``family.cpu_bf16`` (configs/model/<name>.yaml) is true,
which this script's verdict sets. ``--plot PATH`` draws every family's three curves.

    python scripts/bench_precision.py --jobs 2 --threads 1 --json bf16.json --plot docs/figures/bf16_cpu_curves.png
    python scripts/bench_precision.py --families vae,ddpm --steps 50
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import Table, child_env, command_line, error_line, write_json

FAMILIES = "ae,vae,gan,realnvp,glow,ddpm,ldm,flow_matching,ncsn,score_sde,pixelcnn,pixel_transformer"
# optimizer steps per run: about a minute of fp32 on one core for the fast families, fewer for the slow ones
STEPS = {
    "ae": 400, "vae": 600, "gan": 400, "ldm": 400,
    "ddpm": 150, "flow_matching": 150, "ncsn": 150, "score_sde": 150,
    "realnvp": 60, "glow": 60, "pixelcnn": 50, "pixel_transformer": 30,
}  # fmt: skip
CASES = (("fp32", "32-true", 0), ("fp32_seed1", "32-true", 1), ("bf16", "bf16-mixed", 0))
QUIET = [
    "logger=csv",
    "trainer.max_epochs=-1",
    "trainer.limit_val_batches=0",
    "trainer.limit_test_batches=0",
    "~callbacks.sample_grid",
    "~callbacks.model_checkpoint",
    "trainer.enable_progress_bar=false",
]


def genexp_train(overrides: list[str], run_dir: Path, threads: int) -> tuple[dict, str]:
    """One ``genexp train`` process; its metrics.json (``{}`` when it failed) and its one-line error."""
    cmd = [sys.executable, "-m", "genexp.cli", "train", *overrides, f"hydra.run.dir={run_dir}"]
    env = child_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), WANDB_MODE="disabled")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    metrics = run_dir / "metrics.json"
    if done.returncode or not metrics.exists():
        return {}, error_line(done.stdout + done.stderr, done.returncode)
    return json.loads(metrics.read_text()), ""


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) rows of the run's CSV log (``train/g_loss`` for the GAN)."""
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    key = next(k for k in ("train/loss", "train/g_loss") if rows and k in rows[0])
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


def tail_mean(curve: list[tuple[int, float]]) -> float:
    values = [v for _, v in curve[-max(1, len(curve) // 4) :]]
    return sum(values) / len(values) if values else math.nan


def run_case(family: str, case: tuple, args, root: Path, first_stage: Path | None) -> dict:
    name, precision, seed = case
    steps = args.steps or STEPS.get(family, 100)
    overrides = [
        f"model={family}", "dataset=mnist5k", "accelerator=cpu", *QUIET, f"seed={seed}",
        f"performance.precision={precision}", f"trainer.max_steps={steps}",
        f"trainer.log_every_n_steps={max(1, steps // 40)}",
        *([f"model.first_stage={first_stage}"] if first_stage else []), *args.overrides,
    ]  # fmt: skip
    run_dir = root / f"{family}-{name}"
    metrics, error = genexp_train(overrides, run_dir, args.threads)
    curve = loss_curve(run_dir) if metrics else []
    finite = bool(curve) and all(math.isfinite(v) for _, v in curve)
    return {
        "case": name, "img_per_sec": metrics.get("train_img_per_sec"), "curve": curve,
        "tail_loss": tail_mean(curve) if finite else math.nan, "finite": finite, "error": error,
    }  # fmt: skip


def verdict(family: str, cases: dict, min_speedup: float) -> dict:
    fp32, seed1, bf16 = cases["fp32"], cases["fp32_seed1"], cases["bf16"]
    row = {"family": family, "steps": len(fp32["curve"]) and fp32["curve"][-1][0] + 1}
    row.update(fp32_img_s=fp32["img_per_sec"], bf16_img_s=bf16["img_per_sec"])
    row.update(fp32_loss=fp32["tail_loss"], seed1_loss=seed1["tail_loss"], bf16_loss=bf16["tail_loss"])
    errors = [c["error"] for c in cases.values() if c["error"]]
    if errors or not fp32["finite"] or not seed1["finite"]:
        row.update(verdict="failed: " + (errors[0] if errors else "fp32 loss not finite"))
        return row
    speedup = (bf16["img_per_sec"] or 0.0) / fp32["img_per_sec"]
    noise = max(abs(seed1["tail_loss"] - fp32["tail_loss"]), 0.005 * abs(fp32["tail_loss"]))
    ratio = abs(bf16["tail_loss"] - fp32["tail_loss"]) / noise if bf16["finite"] else math.inf
    row.update(speedup=speedup, ratio=ratio)
    if not bf16["finite"]:
        row["verdict"] = "fp32 (bf16 loss not finite)"
    elif ratio > 2:
        row["verdict"] = "fp32 (bf16 curve off)"
    elif speedup < min_speedup:
        row["verdict"] = "fp32 (bf16 does not pay)"
    else:
        row["verdict"] = "bf16"
    return row


def plot(path: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (family, cases) in zip(axes.flat, results.items()):
        for name, style in (("fp32", "-"), ("fp32_seed1", ":"), ("bf16", "--")):
            curve = cases[name]["curve"]
            if curve:
                ax.plot([s for s, _ in curve], [v for _, v in curve], style, label=name, lw=1)
        ax.set_title(family, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("optimizer step", fontsize=8)
    fig.supylabel("train/loss (GAN: g_loss)", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def train_first_stage(root: Path, threads: int) -> Path:
    """A VAE (latent 16, as experiment=ldm_two_stage) trained 600 steps in fp32: ldm's first stage."""
    run_dir = root / "first_stage"
    overrides = ["model=vae", "model.latent_dim=16", "dataset=mnist5k", "accelerator=cpu", *QUIET]
    overrides = [o for o in overrides if o != "~callbacks.model_checkpoint"]
    overrides += ["trainer.max_steps=600", "callbacks.model_checkpoint.monitor=null"]
    _, error = genexp_train(overrides, run_dir, threads)
    if error:
        raise SystemExit(f"bench_precision: the ldm first stage failed: {error}")
    return run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=FAMILIES, help=f"comma-separated (default {FAMILIES})")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default: per family)")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (jobs x threads <= cores)")
    parser.add_argument("--min-speedup", type=float, default=1.2, help="bf16 img/s over fp32 that pays")
    parser.add_argument("--json", help="write the rows and curves here")
    parser.add_argument("--plot", help="write the loss curves here (png)")
    parser.add_argument("--keep", help="keep the run dirs under this folder (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        first_stage = train_first_stage(root, args.threads) if "ldm" in families else None
        jobs = [(f, c) for f in families for c in CASES]
        with ThreadPoolExecutor(args.jobs) as pool:
            done = list(pool.map(lambda j: run_case(j[0], j[1], args, root, first_stage if j[0] == "ldm" else None), jobs))
        results: dict = {}
        for (family, case), result in zip(jobs, done):
            results.setdefault(family, {})[case[0]] = result
    table = Table([
        ("family", "family"), ("steps", "steps"), ("fp32_img_s", "fp32 img/s"), ("bf16_img_s", "bf16 img/s"),
        ("speedup", "speed-up", "{:.2f}x"), ("fp32_loss", "fp32 loss"), ("seed1_loss", "fp32 loss, seed 1"),
        ("bf16_loss", "bf16 loss"), ("ratio", "|bf16 - fp32| / seed spread", "{:.2f}"), ("verdict", "auto picks"),
    ])  # fmt: skip
    for family in families:
        table.add(verdict(family, results[family], args.min_speedup))
    print(f"{len(jobs)} runs in {time.perf_counter() - start:.0f} s, {args.jobs} at a time, "
          f"{args.threads} thread(s) each | {command_line()}")  # fmt: skip
    write_json(args.json, {"rows": table.rows, "runs": results, "command": command_line()})
    if args.plot:
        plot(args.plot, results)


if __name__ == "__main__":
    main()
