"""Console entry point: ``genexp <command> [overrides]``, each command a thin Hydra app.

No torch import at module top: shell completion runs this on every TAB.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from genexp.errors import GenexpError

COMMANDS = {"train": "train a model (the default: VAE on mnist5k); writes a run dir under outputs/"}

USAGE = """usage: genexp <command> [key=value ...] [group=option ...] [-m] [--cfg job] [--help]

commands:
{commands}

examples:
  genexp train                                       # VAE on the embedded mnist5k, CPU
  genexp train model=ae dataset=fashion_mnist optimizer=adamw optimizer.lr=3e-4
  genexp train -m model=ae,vae seed=0,1              # a sweep: one run dir per job under multirun/
  genexp train experiment=vae_mnist5k logger=csv
  genexp train ckpt_path=<run dir|.ckpt|latest>      # resume (same run dir, same wandb run)
  genexp train --cfg job                             # print the composed config
  genexp train --help                                # config groups and their options
"""


def _fail(message: str) -> None:
    print(f"genexp: error: {message}", file=sys.stderr)
    sys.exit(2)


def _guard(fn, *args):
    """Run ``fn``; user errors print one line (traceback only with HYDRA_FULL_ERROR=1)."""
    try:
        return fn(*args)
    except GenexpError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _fail(str(err))


@hydra.main(version_base="1.3", config_path="pkg://genexp.configs", config_name="train")
def train_app(cfg: DictConfig) -> float | None:
    from genexp.run import train

    metrics = _guard(train, cfg)
    # the sweep objective (e.g. for an Optuna sweeper): the family's monitor metric on the test split
    monitor = str(cfg.get("monitor", {}).get("metric", "val/loss")).replace("val/", "test/", 1)
    return (metrics or {}).get("test", {}).get(monitor)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    relaunched = False
    if args and args[0] in COMMANDS:
        command, args = args[0], args[1:]
    elif os.environ.get("GENEXP_COMMAND") in COMMANDS and args and not args[0].startswith("-"):
        # a process Lightning's DDP launcher re-started with our (already rewritten) arguments
        command, relaunched = os.environ["GENEXP_COMMAND"], True
    elif not args or args[0] in ("-h", "--help", "help"):
        print(USAGE.format(commands="\n".join(f"  {k:<9} {v}" for k, v in COMMANDS.items())))
        if args:
            print("== genexp train --help ==")
            sys.argv = [sys.argv[0], "--help"]
            train_app()
        return
    else:
        _fail(f"unknown command {args[0]!r}; commands: {', '.join(COMMANDS)} (see genexp --help)")
        return
    os.environ["GENEXP_COMMAND"] = command
    if command == "train" and not relaunched:
        from genexp.resume import resume_argv

        args = _guard(resume_argv, args)
    sys.argv = [sys.argv[0], *args]
    train_app()


if __name__ == "__main__":
    main()
