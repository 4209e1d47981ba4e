"""Step time of ``genexp train`` against a plain PyTorch loop over the same net, batch and data.

Both sides are built from one composed config (``model``, ``optimizer``, ``dataset``, ``seed``): the
plain loop instantiates the same model and Adam, holds the same uint8 train split in memory, and per
step indexes a random batch, converts it with ``.float().div_(255)``, and runs ``model.loss(x, y)``,
``zero_grad``, ``backward``, ``step``. The genexp side calls ``genexp.commands.train.train(cfg)`` with no logger,
no checkpoints, no sample grids, no validation and one test batch.

Both are timed the way ``genexp.lit.callbacks.Throughput`` times training: per epoch, from epoch start
to the last batch end (validation, checkpoints and epoch-end work excluded). To see each epoch the
script swaps ``genexp.commands.train.Throughput`` for a subclass that keeps the per-epoch numbers, so the first
epoch can be left out as warm-up. Runs alternate (plain, genexp, plain, ...) ``--repeats`` times in
one process. Rows: the median over repeats (the headline ratio; target <= 1.05), the best single
epoch (robust to other load on the machine, which only ever adds time), and the median including the
warm-up epoch (its genexp side is the ``train_img_per_sec`` that ``train()`` returns).

``train()`` adds a progress bar when stdout is a terminal, which costs time per step: the table says
whether it was on. Extra ``key=value`` arguments are Hydra overrides for both sides; a tiny net
(``model.base_channels=2 --batch-size 16``) makes the per-step overhead itself stand out; tiny data
(``dataset=synthetic dataset.num_images=200``) makes a smoke run.

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

import torch
from hydra import compose, initialize_config_module

import genexp.commands.train
from genexp.build import build_model, instantiate
from genexp.lit.callbacks import Throughput

TARGET = 1.05  # the issue's target for the runner's overhead


class EpochThroughput(Throughput):
    """``Throughput`` that also keeps ``(images, seconds)`` of every training epoch."""

    def __init__(self):
        super().__init__()
        self.epochs: list[tuple[int, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append((self._epoch_images, self._epoch_seconds))
        super().on_train_epoch_end(trainer, pl_module)


def compose_cfg(args: argparse.Namespace, output_dir: str):
    # callbacks=none drops checkpoints and sample grids, but Lightning then adds its default checkpoint
    base = "accelerator=cpu logger=none callbacks=none"
    overrides = [
        *base.split(),
        *"trainer.limit_val_batches=0 trainer.limit_test_batches=1".split(),
        f"model={args.model}",
        f"data.batch_size={args.batch_size}",
        f"trainer.max_epochs={args.epochs}",
        f"paths.output_dir={output_dir}",
        *args.overrides,
    ]
    with initialize_config_module(config_module="genexp.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def run_plain(cfg, epochs: int) -> list[tuple[int, float]]:
    """The plain loop; returns ``(images, seconds)`` per epoch, timed like ``Throughput``."""
    torch.manual_seed(cfg.seed)  # what pl.seed_everything does to torch: the same initial weights
    data = instantiate(cfg.dataset, "dataset").load().train
    model = build_model(cfg).train()
    optimizer = instantiate(cfg.optimizer, "optimizer")(model.parameters())
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
    """``genexp.commands.train.train(cfg)``; returns its per-epoch ``(images, seconds)`` and metrics."""
    seen: list[EpochThroughput] = []

    def make() -> EpochThroughput:
        seen.append(EpochThroughput())
        return seen[-1]

    with mock.patch.object(genexp.commands.train, "Throughput", make):
        metrics = genexp.commands.train.train(cfg)
    return seen[0].epochs, metrics


def rate(epochs: list[tuple[int, float]]) -> float:
    """Images per second over the given epochs."""
    return sum(n for n, _ in epochs) / sum(s for _, s in epochs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["ae", "vae"], default="vae")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up when > 1")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating plain/genexp pairs")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides for both sides (model.base_channels=8)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning_fabric"):  # "GPU available: False" etc. per run
        logging.getLogger(name).setLevel(logging.WARNING)

    skip = 1 if args.epochs > 1 else 0
    runs: dict[str, list[list[tuple[int, float]]]] = {"plain": [], "genexp": []}
    returned: list[float] = []  # train()'s own train_img_per_sec (all epochs)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_cfg(args, tmp)
        for r in range(args.repeats):
            runs["plain"].append(run_plain(cfg, args.epochs))
            epochs, metrics = run_genexp(cfg)
            runs["genexp"].append(epochs)
            returned.append(metrics["train_img_per_sec"])
            seconds = {k: [round(s, 2) for _, s in v[-1]] for k, v in runs.items()}
            print(f"repeat {r + 1}/{args.repeats}: epoch seconds {seconds}", flush=True)

    def ms(img_per_sec: float) -> float:
        return 1000 * args.batch_size / img_per_sec

    rows = {  # name -> (plain, genexp) in ms per step
        "ms/step (median)": tuple(ms(statistics.median(rate(e[skip:]) for e in runs[k])) for k in runs),
        "ms/step (best epoch)": tuple(
            ms(max(rate([e]) for run in runs[k] for e in run[skip:])) for k in runs
        ),
        "ms/step incl. warm-up": (
            ms(statistics.median(rate(e) for e in runs["plain"])),
            ms(statistics.median(returned)),
        ),
    }
    device = f"cpu ({torch.get_num_threads()} threads)"
    print("\n| measure | model | batch | plain ms/step | genexp ms/step | ratio | device | torch |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (plain, ours) in rows.items():
        print(
            f"| {name} | {args.model} | {args.batch_size} | {plain:.1f} | {ours:.1f} | {ours / plain:.3f} | "
            f"{device} | torch {torch.__version__} |"
        )
    plain, ours = rows["ms/step (median)"]
    ratio = ours / plain
    print(
        f"img/s (median): plain {1000 * args.batch_size / plain:.0f}, genexp {1000 * args.batch_size / ours:.0f}"
    )
    print(f"ratio genexp/plain {ratio:.3f}: {'ok' if ratio <= TARGET else 'ABOVE'} target <= {TARGET}")
    tty = sys.stdout.isatty()  # train() adds a RichProgressBar when stdout is a terminal
    print(
        f"{args.repeats} repeats x {args.epochs} epochs ({skip} warm-up) | "
        f"model {args.model}, batch {args.batch_size} | torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads | progress bar {'on' if tty else 'off'} (stdout {'is' if tty else 'is not'} a tty)"
    )
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"command: {command}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "ratio": ratio,
            "target": TARGET,
            "ms_per_step": {name: {"plain": p, "genexp": g} for name, (p, g) in rows.items()},
            "epoch_seconds": {k: [[s for _, s in run] for run in v] for k, v in runs.items()},
            "genexp_train_img_per_sec": returned,
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "warmup_epochs": skip,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "progress_bar": tty,
            "command": command,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
