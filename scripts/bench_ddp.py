"""DDP-CPU scaling: the same global batch trained by 1 and by N CPU processes (gloo), img/s.

Each case is a fresh ``python scripts/bench_ddp.py --worker ...`` process that runs the real
``genexp.commands.train.train`` (``accelerator=cpu``, or ``accelerator=ddp_cpu trainer.devices=N``, whose
Lightning launcher starts the other ranks by re-running that command) with ``OMP_NUM_THREADS`` set:

- ``1 proc x cores/N threads``: the per-process baseline;
- ``1 proc x cores threads``: one process on every core;
- ``N procs x cores/N threads``: DDP on the same cores, each rank ``global batch / N``.

img/s counts every rank's images over the steps after ``--warmup``, timed on rank 0 from batch end
to batch end (data, forward, backward with the gradient all-reduce, optimizer step). Scaling
efficiency = img/s(N procs) / (N x img/s(1 proc x cores/N threads)): 1.0 means N processes do N
times the work of one with the same threads each. ``vs 1 proc`` = img/s(N procs) / img/s(1 proc x
cores threads): whether splitting the same cores into ranks beats intra-op threads.

    python scripts/bench_ddp.py                      # vae, global batch 128, 2 processes, all cores
    python scripts/bench_ddp.py --model ddpm --global-batch 64 --cores 2
    python scripts/bench_ddp.py --tiny --steps 2 --warmup 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import QUIET_RUN, TINY_DATA, TINY_MODEL, Table, child_env, command_line, torch_label, write_json


def worker(args) -> None:
    """One training run; rank 0 writes its img/s to ``--out``."""
    import torch
    from benchlib import compose, quiet, train_timed

    quiet()
    accelerator = (
        "accelerator=cpu" if args.procs == 1 else f"accelerator=ddp_cpu trainer.devices={args.procs}"
    )
    cfg = compose(
        [
            *QUIET_RUN,
            f"model={args.model}",
            *(TINY_DATA if args.tiny else [f"dataset={args.dataset}"]),
            *(TINY_MODEL.get(args.model, []) if args.tiny else []),
            *accelerator.split(),
            f"data.batch_size={args.global_batch // args.procs}",
            f"trainer.max_steps={args.warmup + args.steps}",
            f"paths.output_dir={Path(args.out).parent / 'run'}",
            *args.overrides,
        ]
    )
    timer, metrics = train_timed(cfg)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        result = {
            "img_per_sec": timer.img_per_sec_after(args.warmup),
            "threads": torch.get_num_threads(),
            "timed_steps": len(timer.steps) - args.warmup,
        }
        Path(args.out).write_text(json.dumps(result))


def run_case(args, procs: int, threads: int, tmp: Path) -> dict:
    out = tmp / f"p{procs}_t{threads}" / "result.json"
    out.parent.mkdir(parents=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        f"--procs={procs}",
        f"--out={out}",
        f"--model={args.model}",
        f"--dataset={args.dataset}",
        f"--global-batch={args.global_batch}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        *(["--tiny"] if args.tiny else []),
        *args.overrides,
    ]
    env = child_env(OMP_NUM_THREADS=str(threads))
    done = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0 or not out.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"case {procs} proc x {threads} threads failed:\n" + "\n".join(tail))
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vae", help="model= option")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--global-batch", type=int, default=128, help="images per step over all processes")
    parser.add_argument("--procs", type=int, default=2, help="DDP processes (the 1-process cases always run)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores to share out (default: all)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per case")
    parser.add_argument("--tiny", action="store_true", help="a tiny net on tiny synthetic data (smoke test)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every case (key=value)")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.global_batch % args.procs:
        parser.error(f"--global-batch {args.global_batch} is not a multiple of --procs {args.procs}")
    per_proc = max(1, args.cores // args.procs)
    version = torch_label()
    table = Table(
        [
            ("case", "case"),
            ("model", "model"),
            ("global_batch", "global batch"),
            ("img_per_sec", "img/s"),
            ("efficiency", "scaling efficiency", "{:.2f}"),
            ("vs_one", "vs 1 proc", "{:.2f}"),
            ("device", "device"),
            ("torch", "torch"),
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(1, per_proc), (1, args.cores), (args.procs, per_proc)]
        results = {}
        for procs, threads in dict.fromkeys(cases):  # a case listed twice (few cores) runs once
            results[procs, threads] = r = run_case(args, procs, threads, Path(tmp))
            row = {
                "case": f"{procs} proc x {threads} threads",
                "procs": procs,
                "threads": threads,
                "model": args.model,
                "global_batch": args.global_batch,
                "img_per_sec": r["img_per_sec"],
                "device": f"cpu ({args.cores} cores)",
                "torch": version,
            }
            if procs > 1:
                row["efficiency"] = r["img_per_sec"] / (procs * results[1, per_proc]["img_per_sec"])
                row["vs_one"] = r["img_per_sec"] / results[1, args.cores]["img_per_sec"]
            table.add(row)
    print(f"{args.steps} timed steps after {args.warmup} warm-up | command: {command_line()}")
    write_json(args.json, {"rows": table.rows, "args": vars(args), "command": command_line()})


if __name__ == "__main__":
    main()
