"""The console script as users call it (subprocesses): help, config printing, sweeps, resume, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, TINY_MODEL, group_options, tiny

GENEXP = shutil.which("genexp", path=str(Path(sys.executable).parent)) or "genexp"


def genexp(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)  # users see one line; CI sets it for its own runs
    return subprocess.run(
        [GENEXP, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_commands_groups_and_options(tmp_path):
    out = genexp("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout
    models = "model: " + ", ".join(group_options("model"))  # every family, e.g. "model: ae, gan, vae"
    for line in (models, "logger: csv, none, tensorboard, wandb", "accelerator: auto, cpu, ddp"):
        assert line in out.stdout
    assert "mnist5k" in out.stdout and "experiment:" in out.stdout


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = genexp("train", "--cfg", "job", "model=ae", "optimizer=adamw", "optimizer.lr=3e-4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["_target_"] == "genexp.models.ae.AE"
    assert cfg["optimizer"]["_target_"] == "torch.optim.AdamW" and cfg["optimizer"]["lr"] == 3e-4


# make test: the same resume from a run dir alone (its overrides replayed, the same run dir) runs as
# `genexp train ckpt_path=<run>` in test_signals.py (bit-identical to an uninterrupted run) and
# test_distributed.py (DDP, from another working dir, global_step 3 -> 6, no second run dir)
@pytest.mark.slow
def test_runs_from_any_directory_and_resumes_in_the_same_run_dir(tmp_path):
    run = tmp_path / "somewhere" / "run"
    first = genexp("train", *tiny("ae"), f"hydra.run.dir={run}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 3
    # resume from the run dir alone: the run's overrides (model=ae, tiny data) are replayed
    second = genexp("train", f"ckpt_path={run}", "trainer.max_epochs=2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["model"] == "AE" and metrics["dataset"] == "Synthetic"
    assert not (tmp_path / "outputs").exists(), "no new run dir for a resume"


def test_multirun_sweep_writes_one_run_dir_per_job(tmp_path):
    out = genexp(
        "train", "-m", *tiny("vae"), "model=ae,vae", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0-ae-synthetic", "1-vae-synthetic"]
    for job in jobs:
        metrics = json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())
        assert metrics["model"].lower() == job.split("-")[1]
        assert (tmp_path / "sweep" / job / "checkpoints" / "last.ckpt").is_file()


# make test: every experiment composes and builds in-process (test_configs.py), a recipe's top-level
# keys hold (test_an_experiment_sets_top_level_keys) and the csv logger writes metrics.csv (test_train.py)
@pytest.mark.slow
def test_experiment_recipe_with_csv_logger(tmp_path):
    run = tmp_path / "run"
    out = genexp(
        "train",
        "experiment=vae_mnist5k",
        *TINY,  # the experiment picks model=vae; the tiny data and sizes go on top
        *TINY_MODEL["vae"],
        "logger=csv",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert (run / "csv" / "metrics.csv").is_file()
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["model"]["kl_warmup_steps"] == 300


def write_png(path: Path, size=(20, 24), colour=(200, 30, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_dataset_trains(tmp_path):
    for i in range(12):
        write_png(tmp_path / "imgs" / ("cats" if i % 2 else "dogs") / f"{i}.png", colour=(i * 20, 10, 100))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    run = tmp_path / "run"
    no_data = [o for o in tiny("vae") if not o.startswith("dataset")]
    out = genexp(
        "train",
        *no_data,
        "dataset=image_folder",
        f"dataset.root={tmp_path / 'imgs'}",
        "dataset.image_size=16",
        "data.batch_size=4",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads((run / "metrics.json").read_text())["dataset"] == "ImageFolder"


# the CLI's one-line formatting, for each kind of error; test_train.py covers many more values in-process
# a case refused inside `genexp train` costs a process start with torch and Lightning (~4.5 s): make test
# runs one of those (model._target_); the in-process tests check the same messages; make test-all all
_SLOW = pytest.mark.slow
BAD_INPUTS = [
    # (arguments, text the one-line error must contain)
    (["model=gan_typo"], "Could not find 'model/gan_typo'"),
    (["model.latnt_dim=3"], "Key 'latnt_dim' is not in struct"),
    pytest.param(["model.latent_dim=abc"], "model.latent_dim='abc': must be an integer", marks=_SLOW),
    pytest.param(["optimizer.lr=-1e-3"], "optimizer.lr=-0.001: must be > 0", marks=_SLOW),
    pytest.param(
        ["dataset=image_folder", "dataset.root=/nonexistent/imgs"],
        "dataset.root=/nonexistent/imgs: no such folder",
        marks=_SLOW,
    ),
    (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path=/nonexistent/last.ckpt: no such file or folder"),
    (["ckpt_path=latest"], "ckpt_path=latest: no checkpoints/last.ckpt under outputs/"),
    (["model._target_=os.system"], "model._target_=os.system: not a configurable target"),
    pytest.param(
        ["-m", "accelerator=ddp_cpu", "seed=0,1"],
        "trainer.strategy=ddp with a -m sweep would replay the sweep",
        marks=_SLOW,
    ),
]


def _case_id(case) -> str:
    return (case.values if hasattr(case, "values") else case)[0][0]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[_case_id(c) for c in BAD_INPUTS])
def test_bad_input_gives_one_line_error_without_traceback(args, message, tmp_path):
    out = genexp("train", *args, "logger=none", cwd=tmp_path)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


def test_empty_image_folder_and_unknown_command(tmp_path):
    (tmp_path / "empty").mkdir()
    out = genexp(
        "train", "dataset=image_folder", f"dataset.root={tmp_path / 'empty'}", "logger=none", cwd=tmp_path
    )
    assert out.returncode == 2 and "no images found" in out.stderr and "Traceback" not in out.stderr
    out = genexp("trian", cwd=tmp_path)
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr


@pytest.mark.slow  # make test: test_distributed's DDP run (trains, checkpoints, resumes, one set of files)
def test_ddp_on_two_cpu_processes_writes_one_run(tmp_path):
    """The distributed path (Lightning DDP, gloo) with two real processes: one run dir, one set of files."""
    run = tmp_path / "run"
    out = genexp(
        "train", *tiny("vae"), "accelerator=ddp_cpu", "logger=csv", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert len(list((run / "csv").glob("metrics.csv"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "no second run dir from the child process"


def test_ddp_gan_on_two_cpu_processes(tmp_path):
    """Two optimizers under DDP: each backward leaves some parameters without gradients (G's in D's
    loss, the frozen D's in G's); with n_critic, a gradient penalty (double backward) and G's EMA."""
    import torch

    run = tmp_path / "run"
    out = genexp(
        "train",
        *tiny("gan"),
        "model.loss=wgan_gp",
        "model.d_steps_per_g_step=2",
        "model.ema_decay=0.9",
        "accelerator=ddp_cpu",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 3  # G steps
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    steps = [int(next(iter(opt["state"].values()))["step"]) for opt in state["optimizer_states"]]
    assert steps == [3, 6]


def test_user_config_groups_through_searchpath(tmp_path):
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "wide_vae.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /model/vae@_here_\n  - _self_\nmodel:\n  base_channels: 64\n"
    )
    out = genexp(
        "train",
        "--cfg",
        "job",
        f"hydra.searchpath=[file://{tmp_path / 'mine'}]",
        "model=wide_vae",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["_target_"] == "genexp.models.vae.VAE" and cfg["model"]["base_channels"] == 64
