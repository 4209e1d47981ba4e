"""Step time of ``genexp train`` against a plain PyTorch loop over the same net, batch and data.

Both sides are built from one composed config (``model``, ``optimizer``, ``dataset``, ``seed``): the
plain loop instantiates the same model and Adam, holds the same uint8 train split in memory, and per
step indexes a random batch, converts it with ``.float().div_(255)``, and runs ``model.loss(x, y)``,
``zero_grad``, ``backward``, ``step``. The genexp side calls ``genexp.run.train(cfg)`` with no logger,
no checkpoints, no sample grids, no validation and one test batch.

Both are timed the way ``genexp.lit.callbacks.Throughput`` times training: per epoch, from epoch start
to the last batch end (validation, checkpoints and epoch-end work excluded). To see each epoch the
script swaps ``genexp.run.Throughput`` for a subclass that keeps the per-epoch numbers; the first
epoch is the warm-up and is left out of the headline ratio (the "incl. warm-up" row keeps it, and its
genexp side is the ``train_img_per_sec`` that ``train()`` returns). Runs alternate (plain, genexp,
plain, ...) ``--repeats`` times in one process and the table reports medians. Target: ratio <= 1.10.

    python scripts/bench_overhead.py [--model vae|ae] [--batch-size 128] [--epochs 3] [--threads N]
                                     [--repeats 3] [--json PATH] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import hydra
import torch
from hydra import compose, initialize_config_module

import genexp.run
from genexp.lit.callbacks import Throughput

TARGET = 1.10


class EpochThroughput(Throughput):
    """``Throughput`` that also keeps ``(images, seconds)`` of every training epoch."""

    def __init__(self):
        super().__init__()
        self.epochs: list[tuple[int, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append((self._epoch_images, self._epoch_seconds))
        super().on_train_epoch_end(trainer, pl_module)


def compose_cfg(args: argparse.Namespace, output_dir: str):
    overrides = [
        f"model={args.model}", f"data.batch_size={args.batch_size}", f"trainer.max_epochs={args.epochs}",
        "accelerator=cpu", "logger=none", "callbacks=none",
        "+trainer.enable_checkpointing=false",  # callbacks=none alone still gets Lightning's default checkpoint
        "trainer.limit_val_batches=0", "trainer.limit_test_batches=1", f"paths.output_dir={output_dir}",
        *args.overrides,
    ]
    with initialize_config_module(config_module="genexp.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def run_plain(cfg, epochs: int) -> list[tuple[int, float]]:
    """The plain loop; returns ``(images, seconds)`` per epoch, timed like ``Throughput``."""
    torch.manual_seed(cfg.seed)  # what pl.seed_everything does to torch: the same initial weights
    data = hydra.utils.instantiate(cfg.dataset).load().train
    model = hydra.utils.instantiate(cfg.model).train()
    optimizer = hydra.utils.instantiate(cfg.optimizer)(model.parameters())
    images, labels, batch_size = data.images, data.labels, cfg.data.batch_size
    steps = len(images) // batch_size  # drop_last, as the DataModule's train loader
    out = []
    for _ in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(images))
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x, y = images[idx].float().div_(255.0), labels[idx]  # (B, C, H, W) in [0, 1]
            loss = model.loss(x, y).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        out.append((steps * batch_size, time.perf_counter() - start))
    return out


def run_genexp(cfg) -> tuple[list[tuple[int, float]], dict]:
    """``genexp.run.train(cfg)``; returns its per-epoch ``(images, seconds)`` and metrics."""
    seen: list[EpochThroughput] = []

    def make() -> EpochThroughput:
        seen.append(EpochThroughput())
        return seen[-1]

    with mock.patch.object(genexp.run, "Throughput", make):
        metrics = genexp.run.train(cfg)
    return seen[0].epochs, metrics


def rate(epochs: list[tuple[int, float]]) -> float:
    """Images per second over the given epochs."""
    return sum(n for n, _ in epochs) / sum(s for _, s in epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["ae", "vae"], default="vae")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up when > 1")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating plain/genexp pairs")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both sides (model.base_channels=8)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning_fabric"):  # "GPU available: False" etc. per run
        logging.getLogger(name).setLevel(logging.WARNING)

    skip = 1 if args.epochs > 1 else 0
    rows: dict[str, list[float]] = {"plain": [], "genexp": [], "plain_all": [], "genexp_all": []}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_cfg(args, tmp)
        for r in range(args.repeats):
            plain = run_plain(cfg, args.epochs)
            ours, metrics = run_genexp(cfg)
            assert metrics["global_step"] == sum(n for n, _ in ours) // args.batch_size, "partial batches?"
            rows["plain"].append(rate(plain[skip:]))
            rows["genexp"].append(rate(ours[skip:]))
            rows["plain_all"].append(rate(plain))
            rows["genexp_all"].append(metrics["train_img_per_sec"])
            print(f"repeat {r + 1}/{args.repeats}: plain {rows['plain'][-1]:.0f} img/s, "
                  f"genexp {rows['genexp'][-1]:.0f} img/s, epochs (s) plain "
                  f"{[round(s, 2) for _, s in plain]} genexp {[round(s, 2) for _, s in ours]}", flush=True)

    med = {k: statistics.median(v) for k, v in rows.items()}
    ms = {k: 1000 * args.batch_size / v for k, v in med.items()}  # ms per step
    ratio, ratio_all = ms["genexp"] / ms["plain"], ms["genexp_all"] / ms["plain_all"]
    print(f"\n{'':22}{'plain':>10}{'genexp':>10}")
    print(f"{'ms/step':22}{ms['plain']:10.1f}{ms['genexp']:10.1f}")
    print(f"{'img/s':22}{med['plain']:10.0f}{med['genexp']:10.0f}")
    print(f"{'ms/step incl. warm-up':22}{ms['plain_all']:10.1f}{ms['genexp_all']:10.1f}")
    verdict = "ok" if ratio <= TARGET else "ABOVE TARGET"
    print(f"ratio genexp/plain: {ratio:.3f} (target <= {TARGET}: {verdict}); incl. warm-up: {ratio_all:.3f}")
    print(f"median of {args.repeats} repeats x {args.epochs} epochs ({skip} warm-up) | model {args.model}, "
          f"batch {args.batch_size} | torch {torch.__version__}, {torch.get_num_threads()} threads | "
          f"progress bar {'on' if sys.stdout.isatty() else 'off'} (stdout is {'' if sys.stdout.isatty() else 'not '}a tty)")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"command: {command}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "ratio": ratio, "ratio_incl_warmup": ratio_all, "target": TARGET, "ms_per_step": ms,
            "img_per_sec": med, "runs_img_per_sec": rows, "model": args.model, "batch_size": args.batch_size,
            "epochs": args.epochs, "warmup_epochs": skip, "repeats": args.repeats, "overrides": args.overrides,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "command": command,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
