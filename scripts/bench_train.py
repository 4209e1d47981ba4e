"""Training speed per family: img/s after warm-up and peak memory, one table row per family.

Every family trains with its own ``model=`` defaults on the same data (``mnist5k``, 28x28x1) and
batch size, through the real ``genexp.commands.train.train`` (no logger, validation, test, checkpoints or sample
grids; the diffusion families keep their EMA): ``--warmup`` untimed optimizer steps, then timed ones
until at least ``--steps`` steps and ``--seconds`` seconds have passed (at most ``--max-steps``), so a
fast family is timed over many steps and a slow one over a few (GAN: generator steps, each after its
discriminator step). img/s counts the timed steps, each from the previous batch end to its own (data
loading, the step, the hooks), as ``Throughput`` does.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the run; on CPU the growth of the
process's peak resident set size (``VmHWM``, reset before each family) over its size when the
family's run starts (data, model, activations, optimizer state, allocator slack).

``ldm`` needs a trained first stage: ``--first-stage RUN`` names one (an AE/VAE run dir), otherwise the
script first trains a VAE for two steps (``model.latent_dim=16``, as ``experiment=ldm_two_stage``;
its weights do not change the speed) and uses it.

    python scripts/bench_train.py                                 # every family, CPU, mnist5k
    python scripts/bench_train.py --families ddpm,gan --device cuda --steps 50
    python scripts/bench_train.py --tiny --steps 2 --seconds 0 --warmup 1   # smoke: tiny nets and data
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from benchlib import (
    QUIET_RUN,
    TINY_DATA,
    TINY_MODEL,
    PeakMemory,
    Table,
    command_line,
    compose,
    device_label,
    quiet,
    torch_label,
    train_timed,
    write_json,
)

FAMILIES = "ae,vae,gan,realnvp,glow,ddpm,ldm,pixelcnn,pixel_transformer"


def data_overrides(args) -> list[str]:
    return TINY_DATA if args.tiny else [f"dataset={args.dataset}"]


def run_overrides(args, family: str, output_dir: Path) -> list[str]:
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    return [
        *QUIET_RUN,
        f"model={family}",
        *data_overrides(args),
        f"accelerator={accelerator}",
        f"data.batch_size={args.batch_size}",
        f"trainer.max_steps={args.warmup + args.max_steps}",
        "trainer.min_epochs=0",  # StepTimes stops the run mid-epoch
        f"paths.output_dir={output_dir}",
        *(TINY_MODEL.get(family, []) if args.tiny else []),
        *args.overrides,
    ]


def train_first_stage(args, output_dir: Path) -> Path:
    """A VAE trained for two steps, with a checkpoint: a stand-in first stage for ``ldm``."""
    from genexp.commands.train import train

    overrides = [
        "model=vae",
        "model.latent_dim=16",
        *data_overrides(args),
        *(TINY_MODEL["vae"][:1] if args.tiny else []),
        "accelerator=cpu",
        "logger=none",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint.monitor=null",  # no validation: keep the last weights
        "trainer.limit_test_batches=0",
        "trainer.enable_progress_bar=false",
        "~callbacks.sample_grid",
        f"paths.output_dir={output_dir}",
    ]
    train(compose(overrides))
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", default=FAMILIES, help=f"comma-separated (default {FAMILIES})")
    parser.add_argument("--dataset", default="mnist5k", help="dataset= option, the same for every family")
    parser.add_argument("--batch-size", type=int, default=64, help="data.batch_size for every family")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per family, at least")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per family, at least")
    parser.add_argument("--max-steps", type=int, default=300, help="timed steps per family, at most")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocations, caches)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    parser.add_argument("--first-stage", default=None, help="AE/VAE run dir for ldm (default: train one)")
    parser.add_argument("--tiny", action="store_true", help="tiny nets on tiny synthetic data (smoke test)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every family (key=value)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    device = torch.device(args.device)
    where, version = device_label(device), torch_label()
    table = Table(
        [
            ("family", "family"),
            ("params_m", "params (M)"),
            ("batch", "batch"),
            ("timed_steps", "timed steps"),
            ("img_per_sec", "img/s"),
            ("ms_per_step", "ms/step"),
            ("peak_mib", "peak MiB"),
            ("memory", "memory measure"),
            ("device", "device"),
            ("torch", "torch"),
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        for family in [f for f in args.families.split(",") if f]:
            overrides = run_overrides(args, family, Path(tmp) / family)
            if family == "ldm":
                first = args.first_stage or train_first_stage(args, Path(tmp) / "first_stage")
                overrides.append(f"model.first_stage={first}")
            start = time.perf_counter()
            with PeakMemory(device) as memory:
                timer, metrics = train_timed(compose(overrides), stop=(args.warmup, args.steps, args.seconds))
            rate = timer.img_per_sec_after(args.warmup)
            table.add(
                {
                    "family": family,
                    "params_m": metrics["num_parameters"] / 1e6,
                    "batch": args.batch_size,
                    "img_per_sec": rate,
                    "ms_per_step": 1000 * args.batch_size / rate,
                    "peak_mib": memory.mib,
                    "memory": memory.kind,
                    "device": where,
                    "torch": version,
                    "timed_steps": len(timer.steps) - args.warmup,
                    "timed_s": sum(timer.steps[args.warmup :]),
                    "wall_s": time.perf_counter() - start,
                }
            )
    print(
        f"timed: at least {args.steps} steps and {args.seconds:g} s (at most {args.max_steps} steps) after "
        f"{args.warmup} warm-up steps per family | command: {command_line()}"
    )
    write_json(args.json, {"rows": table.rows, "args": vars(args), "command": command_line()})


if __name__ == "__main__":
    main()
