"""Sampling speed per family: samples/s and ms/sample at a fixed batch, one table row per case.

Each family is built from the composed config of its ``model=`` option on the given dataset shape
(``mnist5k``: 28x28x1) with its default size, or loaded from a trained run with ``--ckpt`` (weights
do not change the speed, but a run's own config does). Cases: the one-pass decoders (``ae``, ``vae``,
``gan``), the flows (``realnvp``, ``glow``: one inverse pass), diffusion once per sampler (DDPM
ancestral sampling over all T = 1000 steps and DDIM-50, the same net, so the table shows what
few-step sampling buys) and the autoregressive families (one network pass per pixel). Latent
diffusion needs a first stage, so it is only measured from a ``--ckpt``.

A case is timed as the best of ``--repeats`` calls of ``model.sample(batch)`` after one warm-up call
of ``sample(1)`` (allocations, lazy initialisation), under ``torch.no_grad``; on CUDA with a
synchronise before and after each call. samples/s = batch / seconds.

    python scripts/bench_sampling.py                                  # every case, CPU, mnist5k
    python scripts/bench_sampling.py --families gan,ddpm --device cuda --batch 256
    python scripts/bench_sampling.py --ckpt outputs/ddpm-MNIST5k/<time>   # a trained run
    python scripts/bench_sampling.py --tiny --batch 2                 # smoke: tiny nets, T = 20
"""

from __future__ import annotations

import argparse
import time

import torch
from benchlib import (
    TINY_DATA,
    TINY_MODEL,
    Table,
    command_line,
    compose,
    device_label,
    torch_label,
    write_json,
)

from genexp.build import build_model
from genexp.checkpoints import load_model

FAMILIES = "ae,vae,gan,realnvp,glow,ddpm,pixelcnn,pixel_transformer"
DDPM = {"_target_": "genexp.diffusion.samplers.DDPMSampler", "_partial_": True, "variance": "beta_tilde"}


def compose_model(args, option: str, sampler: list[str]) -> tuple[torch.nn.Module, object]:
    data = TINY_DATA if args.tiny else [f"dataset={args.dataset}"]
    tiny = TINY_MODEL.get(option, []) if args.tiny else []
    cfg = compose([f"model={option}", *data, *tiny, *sampler, "logger=none"])
    return build_model(cfg), cfg


def cases(args) -> list[tuple[str, torch.nn.Module]]:
    """``(case name, model)`` for every ``--ckpt`` run and every ``--families`` option."""
    out = []
    for run in args.ckpt:
        loaded = load_model(run)
        name = type(loaded.model).__name__.lower()
        if hasattr(loaded.model, "diffusion"):
            timesteps = loaded.config.schedule.timesteps
            ddim = {
                "_target_": "genexp.diffusion.samplers.DDIMSampler",
                "_partial_": True,
                "steps": args.ddim_steps,
                "eta": 0.0,
            }
            for label, node in ((f"ddpm-{timesteps}", DDPM), (f"ddim-{args.ddim_steps}", ddim)):
                out.append((f"{name} {label} ({run})", load_model(run, {"model.sampler": node}).model))
        else:
            out.append((f"{name} ({run})", loaded.model))
    for option in [f for f in args.families.split(",") if f]:
        if option == "ddpm":
            model, cfg = compose_model(args, option, ["sampler=ddpm"])
            timesteps = cfg.schedule.timesteps
            out.append((f"ddpm ddpm-{timesteps}", model))
            steps = min(args.ddim_steps, timesteps)
            model, _ = compose_model(args, option, ["sampler=ddim", f"sampler.steps={steps}"])
            out.append((f"ddpm ddim-{steps}", model))
        else:
            out.append((option, compose_model(args, option, [])[0]))
    return out


@torch.no_grad()
def time_sampling(model: torch.nn.Module, batch: int, repeats: int, device: torch.device) -> float:
    """Best-of-``repeats`` seconds for one ``sample(batch)`` call (after one ``sample(1)`` warm-up)."""
    model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    model.sample(1, generator=generator)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.sample(batch, generator=generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--families", default=FAMILIES, help=f"comma-separated model= options (default {FAMILIES})"
    )
    parser.add_argument("--dataset", default="mnist5k", help="dataset= option: the image shape")
    parser.add_argument("--ckpt", nargs="*", default=[], help="run dirs or .ckpt files to measure as trained")
    parser.add_argument("--batch", type=int, default=8, help="samples per sample() call")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per case (the best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ddim-steps", type=int, default=50, help="network passes of the DDIM case")
    parser.add_argument("--tiny", action="store_true", help="tiny nets on a tiny shape, T = 20 (smoke test)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where, version = device_label(device), torch_label()
    table = Table(
        [
            ("case", "case"),
            ("batch", "batch"),
            ("seconds", "s/batch"),
            ("samples_per_sec", "samples/s"),
            ("ms_per_sample", "ms/sample"),
            ("device", "device"),
            ("torch", "torch"),
        ]
    )
    for name, model in cases(args):
        seconds = time_sampling(model, args.batch, args.repeats, device)
        table.add(
            {
                "case": name,
                "batch": args.batch,
                "seconds": seconds,
                "samples_per_sec": args.batch / seconds,
                "ms_per_sample": 1000 * seconds / args.batch,
                "device": where,
                "torch": version,
            }
        )
    ddpm = [r for r in table.rows if r["case"].startswith("ddpm ddpm-")]
    ddim = [r for r in table.rows if r["case"].startswith("ddpm ddim-")]
    if ddpm and ddim:
        ratio = ddim[0]["samples_per_sec"] / ddpm[0]["samples_per_sec"]
        print(
            f"{ddim[0]['case']} is {ratio:.1f}x faster than {ddpm[0]['case']} (same net, batch {args.batch})"
        )
    print(f"best of {args.repeats} after a sample(1) warm-up | command: {command_line()}")
    write_json(args.json, {"rows": table.rows, "args": vars(args), "command": command_line()})


if __name__ == "__main__":
    main()
