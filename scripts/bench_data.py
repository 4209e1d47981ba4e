"""Data-pipeline share of the training step, inside a real ``genexp train`` run (target < 5%).

One family (``--model``, default ``vae``) trains on ``mnist5k`` through ``genexp.commands.train.train`` with
Lightning's ``SimpleProfiler`` on, once per data path: the default DataLoader (``num_workers=0``),
worker processes (``--workers``), pinned memory on CUDA, and ``performance.device_data=true`` (the
whole split held on the device) when the config tree has it. Per step, after ``--warmup`` steps:

- data share = (``[_TrainingEpochLoop].train_dataloader_next``, the DataLoader fetch, +
  ``[Strategy]...batch_to_device``, the host-to-device copy) / step time: the headline number;
- wait share = (time from the previous batch end to ``on_train_batch_start``) / step time: the data
  share plus the loop's bookkeeping between steps, an upper bound;

where a step runs from the previous batch end to its own, as ``Throughput`` counts it (on CUDA each
batch end synchronises, so the device's work is inside the step it belongs to).

    python scripts/bench_data.py                        # vae, batch 64, workers 0 and 2, CPU
    python scripts/bench_data.py --model ddpm --device cuda --batch-size 128
    python scripts/bench_data.py --tiny --steps 2 --warmup 1   # smoke
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from benchlib import (
    QUIET_RUN,
    TINY_DATA,
    TINY_MODEL,
    Table,
    command_line,
    compose,
    device_label,
    has_config_group,
    quiet,
    torch_label,
    train_timed,
    write_json,
)

TARGET = 0.05
PROFILER = "+trainer.profiler._target_=pytorch_lightning.profilers.SimpleProfiler"
FETCH = "[_TrainingEpochLoop].train_dataloader_next"


def data_paths(args) -> list[tuple[str, list[str]]]:
    """``(case, overrides)`` per data path; ``device_data`` only where the config tree has it."""
    out = [(f"num_workers={n}", [f"data.num_workers={n}"]) for n in args.workers]
    if args.device == "cuda":
        n = max(args.workers)
        out.append((f"num_workers={n} pin_memory", [f"data.num_workers={n}", "data.pin_memory=true"]))
    if has_config_group("performance"):
        out.append(("device_data", ["data.num_workers=0", "performance.device_data=true"]))
    return out


def shares(timer, warmup: int) -> tuple[float, float]:
    """(data share, wait share) of the step time over the steps after ``warmup``."""
    n = len(timer.steps)
    steps = sum(timer.steps[warmup:])
    fetch = timer.profiled.get(FETCH, [])[warmup:n]
    to_device = next((v for k, v in timer.profiled.items() if k.endswith(".batch_to_device")), [])[warmup:n]
    data = (sum(fetch) + sum(to_device)) / steps if fetch and steps else float("nan")
    return data, timer.wait_share_after(warmup)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vae", help="model= option (a fast step shows the data path most)")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,2", help="comma-separated data.num_workers cases")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (worker start-up)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    parser.add_argument("--tiny", action="store_true", help="a tiny net on tiny synthetic data (smoke test)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every case (key=value)")
    args = parser.parse_args(argv)
    args.workers = [int(n) for n in args.workers.split(",") if n]
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    where, version = device_label(args.device), torch_label()
    table = Table(
        [
            ("case", "data path"),
            ("model", "model"),
            ("batch", "batch"),
            ("ms_per_step", "ms/step"),
            ("data_ms", "fetch+H2D ms", "{:.3f}"),
            ("data_share", "data share", "{:.2%}"),
            ("wait_share", "wait share", "{:.2%}"),
            ("verdict", f"< {TARGET:.0%}"),
            ("device", "device"),
            ("torch", "torch"),
        ]
    )
    data = TINY_DATA if args.tiny else [f"dataset={args.dataset}"]
    with tempfile.TemporaryDirectory() as tmp:
        for case, extra in data_paths(args):
            cfg = compose(
                [
                    *QUIET_RUN,
                    f"model={args.model}",
                    *data,
                    *(TINY_MODEL.get(args.model, []) if args.tiny else []),
                    f"accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
                    f"data.batch_size={args.batch_size}",
                    f"trainer.max_steps={args.warmup + args.steps}",
                    f"paths.output_dir={Path(tmp) / 'run'}",
                    PROFILER,
                    *extra,
                    *args.overrides,
                ]
            )
            timer, _ = train_timed(cfg)
            data_share, wait_share = shares(timer, args.warmup)
            ms = 1000 * sum(timer.steps[args.warmup :]) / max(1, len(timer.steps) - args.warmup)
            table.add(
                {
                    "case": case,
                    "model": args.model,
                    "batch": args.batch_size,
                    "ms_per_step": ms,
                    "data_ms": data_share * ms,
                    "data_share": data_share,
                    "wait_share": wait_share,
                    "verdict": "ok" if data_share < TARGET else "ABOVE",
                    "device": where,
                    "torch": version,
                }
            )
    if not has_config_group("performance"):
        print("device_data: not measured (this config tree has no performance/ group)")
    print(f"{args.steps} timed steps after {args.warmup} warm-up | command: {command_line()}")
    write_json(
        args.json, {"rows": table.rows, "target": TARGET, "args": vars(args), "command": command_line()}
    )


if __name__ == "__main__":
    main()
