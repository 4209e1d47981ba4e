"""Sampling speed per family: samples/s and ms/sample at a fixed batch, one table row per case.

Each family is built from the composed config of its ``model=`` option on the given dataset shape
(``mnist5k``: 28x28x1) with its default size, or loaded from a trained run with ``--ckpt`` (weights
do not change the speed, but a run's own config does). The diffusion family runs once per sampler:
DDPM over all T steps and DDIM-50, so the table shows what few-step sampling buys. Latent diffusion
needs a first stage, so it is only measured from a ``--ckpt``.

    python scripts/bench_sampling.py [--families vae,gan,realnvp,glow,ddpm] [--batch 32]
                                     [--repeats 2] [--threads N] [--device cpu|cuda] [--ckpt RUN ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from hydra import compose, initialize_config_module

from genexp.checkpoints import load_model
from genexp.run import build_model

DDIM = {"_target_": "genexp.diffusion.samplers.DDIMSampler", "_partial_": True, "steps": 50, "eta": 0.0}
DDPM = {"_target_": "genexp.diffusion.samplers.DDPMSampler", "_partial_": True, "variance": "beta_tilde"}


def compose_model(option: str, dataset: str, sampler: str | None):
    overrides = [f"model={option}", f"dataset={dataset}"]
    if sampler:
        overrides.append(f"sampler={sampler}")
    with initialize_config_module(config_module="genexp.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return build_model(cfg)


def cases(args) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for run in args.ckpt:
        loaded = load_model(run)
        name = type(loaded.model).__name__.lower()
        if hasattr(loaded.model, "diffusion"):
            for label, node in (("ddpm", DDPM), ("ddim-50", DDIM)):
                out.append((f"{name} {label} ({run})", load_model(run, {"model.sampler": node}).model))
        else:
            out.append((f"{name} ({run})", loaded.model))
    for option in [f for f in args.families.split(",") if f]:
        if option in ("ddpm",):
            out.append(("ddpm ddpm-1000", compose_model(option, args.dataset, "ddpm")))
            out.append(("ddpm ddim-50", compose_model(option, args.dataset, "ddim")))
        else:
            out.append((option, compose_model(option, args.dataset, None)))
    return out


@torch.no_grad()
def time_sampling(model: torch.nn.Module, batch: int, repeats: int, device: torch.device) -> float:
    """Best-of-``repeats`` seconds for one ``sample(batch)`` call (after one warm-up call)."""
    model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    model.sample(min(batch, 2), generator=generator)  # warm-up (allocations, lazy init)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.sample(batch, generator=generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", default="vae,gan,realnvp,glow,ddpm,pixelcnn,pixel_transformer")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--ckpt", nargs="*", default=[], help="run dirs or .ckpt files to measure as trained")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        where = f"cpu ({torch.get_num_threads()} threads)"
    rows = []
    print("| case | batch | s/batch | samples/s | ms/sample | device |\n|---|---|---|---|---|---|")
    for name, model in cases(args):
        seconds = time_sampling(model, args.batch, args.repeats, device)
        row = {
            "case": name,
            "batch": args.batch,
            "seconds": seconds,
            "samples_per_sec": args.batch / seconds,
            "ms_per_sample": 1000 * seconds / args.batch,
            "device": where,
        }
        rows.append(row)
        print(
            f"| {name} | {args.batch} | {seconds:.3f} | {row['samples_per_sec']:.1f} | "
            f"{row['ms_per_sample']:.2f} | {where} |",
            flush=True,
        )
    by = {r["case"]: r for r in rows}
    if "ddpm ddpm-1000" in by and "ddpm ddim-50" in by:
        ratio = by["ddpm ddim-50"]["samples_per_sec"] / by["ddpm ddpm-1000"]["samples_per_sec"]
        print(f"DDIM-50 is {ratio:.1f}x faster than DDPM-1000 (same net, batch {args.batch})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
