"""Console entry point: ``genexp <command> [overrides]``, each command a thin Hydra app.

No torch import at module top: shell completion runs this on every TAB.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from genexp.errors import GenexpError
from genexp.rundir import register_resolvers

# the run dir resolvers (configs/train.yaml hydra.run.dir): registered on import, so a submitit job
# that unpickles a Hydra app of this module resolves them too
register_resolvers()

COMMANDS = {
    "train": "train a model (the default: VAE on mnist5k); writes a run dir under outputs/",
    "sample": "draw images from a trained run: a PNG grid and an .npz (genexp sample ckpt=<run dir>)",
    "evaluate": "FID/KID/precision-recall, bits/dim, recon, speed of a run -> <run dir>/evaluation.json",
    "compare": "train every family with several seeds on one budget, evaluate, write a report/",
    "report": "the comparison report from existing runs (genexp report <sweep or compare dir>)",
}

USAGE = """usage: genexp <command> [key=value ...] [group=option ...] [-m] [--cfg job] [--help]

commands:
{commands}

examples:
  genexp train                                       # VAE on the embedded mnist5k, CPU
  genexp train model=<family> dataset=fashion_mnist optimizer=adamw optimizer.lr=3e-4
  genexp train -m model=<a>,<b> seed=0,1             # a sweep: one run dir per job under multirun/
  genexp train -m hparams_search=vae_optuna          # an Optuna search; the same command continues it
  genexp train experiment=vae_mnist5k logger=csv
  genexp train ckpt_path=<run dir|.ckpt|latest>      # resume (same run dir, same wandb run)
  genexp train --cfg job                             # print the composed config
  genexp train --help                                # config groups and their options
  genexp sample ckpt=<run dir> n=64 seed=0           # a grid + .npz in <run dir>/samples/
  genexp sample ckpt=<run dir> temperature=0.7       # flows; truncation=1.5 for the GAN; sampler=ddim for diffusion
  genexp evaluate ckpt=<run dir> metrics='[fid,kid,bpd]' eval.num_samples=10000
  genexp compare dataset=mnist5k seeds=3 budget_minutes=5   # every family; writes compare/mnist5k/report/
  genexp report multirun/<sweep dir>                 # report from runs that already exist
  genexp <command> --help                            # that command's keys
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
    from genexp.commands.train import train
    from genexp.objective import objective_value
    from genexp.sweeps import in_search

    if in_search():  # a search's trial: its error fails this trial alone (the sweeper records it, goes on)
        return objective_value(cfg, train(cfg), required=True)
    metrics = _guard(train, cfg)
    # what Hydra's sweeper receives: metrics.json's `objective` (default: the test split's monitor metric)
    return objective_value(cfg, metrics)


@hydra.main(version_base="1.3", config_path="pkg://genexp.configs", config_name="sample")
def sample_app(cfg: DictConfig) -> None:
    from genexp.commands import sample

    result = _guard(sample.run, cfg)
    print(f"{result.num_samples} samples of {result.description}")
    print(f"{result.samples_per_sec:.1f} samples/s on {result.device}")
    print(result.png)
    print(result.npz)


@hydra.main(version_base="1.3", config_path="pkg://genexp.configs", config_name="evaluate")
def evaluate_app(cfg: DictConfig) -> None:
    from genexp.commands import evaluate
    from genexp.evaluation import format_metrics

    evaluation, path = _guard(evaluate.run, cfg)
    print(format_metrics(evaluation["metrics"]))
    print(path)


@hydra.main(version_base="1.3", config_path="pkg://genexp.configs", config_name="compare")
def compare_app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from genexp.commands import compare
    from genexp.resume import override_key

    hydra_cfg = HydraConfig.get()
    # the dataset, accelerator and sampler choices and their dataset.*/sampler.* overrides go to
    # every training run (the sampler only matters to diffusion families: their sample grids)
    choices = hydra_cfg.runtime.choices
    group_args = [f"dataset={choices['dataset']}", f"accelerator={choices['accelerator']}"]
    if choices.get("sampler"):
        group_args.append(f"sampler={choices['sampler']}")
    group_args += [
        o for o in hydra_cfg.overrides.task if override_key(o).startswith(("dataset.", "sampler."))
    ]
    result = _guard(compare.run, cfg, group_args)
    print(
        f"{len(result.jobs)} runs: {len(result.trained)} trained, {len(result.skipped)} skipped, "
        f"{len(result.failed)} failed, {len(result.evaluated)} evaluated"
    )
    print(result.html)
    print(result.markdown)


def report_main(args: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="genexp report",
        description="Write the comparison report (index.html, report.md) from existing run dirs: "
        "a genexp compare dir, a Hydra sweep dir, or any folder of run dirs.",
    )
    parser.add_argument("dir", help="folder holding run dirs (searched a few levels deep)")
    parser.add_argument("--out", default=None, help="report folder (default: <dir>/report)")
    ns = parser.parse_args(args)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from genexp.commands.report import write_report

    html_path, md_path = _guard(write_report, ns.dir, ns.out)
    print(html_path)
    print(md_path)


APPS = {"train": train_app, "sample": sample_app, "evaluate": evaluate_app, "compare": compare_app}


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
    if command == "report":
        report_main(args)
        return
    os.environ["GENEXP_COMMAND"] = command
    if command == "compare":
        args = [quote_train_args(a) for a in args]
    if command == "train" and not relaunched:
        from genexp.resume import resume_argv

        args = _guard(resume_argv, args)
    sys.argv = [sys.argv[0], *args]
    from genexp.hydra_errors import report_in_one_line

    report_in_one_line(_fail)  # Hydra's composition errors (unknown option, misspelled key) as one line
    from genexp.build import guard_hydra

    guard_hydra()  # what Hydra itself builds from the config (hydra.callbacks) is registry-checked too
    from genexp.sweeps import register_sweeper

    register_sweeper()  # hparams_search=<recipe>: the search sweeper, however genexp was installed
    run_stoppable(APPS[command], command)


def quote_train_args(arg: str) -> str:
    """``train_args=data.batch_size=128 trainer.precision=bf16-mixed``, as the shell passes the README's
    ``train_args='data.batch_size=128 ...'``, is no Hydra value (an unquoted ``=``): quote it for
    Hydra, which hands compare the string (a list ``train_args=[...]`` or a quoted value is kept)."""
    key, sep, value = arg.partition("=")
    if not sep or key.lstrip("+") != "train_args" or not value or value[0] in "[\"'":
        return arg
    if "'" not in value:
        return f"{key}='{value}'"
    return key + '="' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_stoppable(app, command: str) -> None:
    """Run ``app`` with SIGTERM/SIGUSR1/SIGINT acting at once wherever it is (genexp.signals): the
    process prints one line and exits 75 (130 for SIGINT), every file it was writing left as it was."""
    from genexp.signals import Interrupted, install, signal_name

    install()
    try:
        app()
    except Interrupted as err:
        message = str(err)
        if message == f"stopped by {signal_name(err.signum)}":  # nothing more specific was said
            message += f" during genexp {command}: no partial output was left; run it again"
        print(f"genexp: {message} (exit status {err.code})", file=sys.stderr)
        sys.exit(err.code)


if __name__ == "__main__":
    main()
