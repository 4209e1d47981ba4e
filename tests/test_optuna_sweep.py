"""Search recipes (``genexp train -m hparams_search=<recipe>``): an Optuna study through Hydra on the
synthetic data, kept in SQLite in the sweep dir and continued by a rerun; a killed trial resumed under
its own number; a diverged trial recorded as failed; a bad search space refused before any trial; the
objective equal to metrics.json's value; a sweep's wandb group, job type, tags and one sync command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import faults
import optuna
import pytest
import yaml
from conftest import CONFIG_ROOT, TINY, compose_cfg, group_options
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from test_cli import GENEXP, genexp

from genexp import build, sweeps
from genexp.errors import GenexpError
from genexp.objective import check_objective, objective_value

# the VAE search on the tiny synthetic run (conftest's TINY: 3 steps a trial), a smaller net
SEARCH = ["train", "-m", "hparams_search=vae_optuna", *TINY, "model.base_channels=8"]
STUDY = "vae_optuna-synthetic"  # the recipe's study name: vae_optuna-<dataset>
JOBS = ["0-vae-synthetic", "1-vae-synthetic", "2-vae-synthetic"]


def search(sweep: Path, *extra: str, n_trials: int = 3) -> subprocess.CompletedProcess:
    return genexp(
        *SEARCH, f"hydra.sweep.dir={sweep}", f"hydra.sweeper.n_trials={n_trials}", *extra, cwd=sweep.parent
    )


def trials(sweep: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{sweep}/optuna.db")
    return study.get_trials(deepcopy=False)


def job_dirs(sweep: Path) -> list[str]:
    return sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir())


def metrics_value(run_dir: str | Path, key: str = "test/bpd"):
    return json.loads((Path(run_dir) / "metrics.json").read_text())["test"][key]


@pytest.fixture(scope="session")
def vae_study(tmp_path_factory) -> Path:
    """A 3-trial VAE study (about 15 s): its sweep dir."""
    sweep = tmp_path_factory.mktemp("search") / "sweep"
    out = search(sweep)
    assert out.returncode == 0, out.stderr[-4000:]
    return sweep


def test_a_three_trial_study_completes_and_each_objective_is_its_metrics_json_value(vae_study):
    found = trials(vae_study)
    assert [t.number for t in found] == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in found)
    assert job_dirs(vae_study) == JOBS  # trial k is job k: its own run dir
    for trial in found:
        run_dir = Path(trial.user_attrs["genexp_run_dir"])
        assert run_dir.name == JOBS[trial.number]
        assert trial.value == metrics_value(run_dir)  # what the sweeper got is what the run wrote
        assert set(trial.params) == {"optimizer.lr", "model.beta", "model.latent_dim"}
    assert len({tuple(sorted(t.params.items())) for t in found}) == 3
    record = json.loads((vae_study / "study.json").read_text())  # what genexp report reads
    assert record["objective"] == "test/bpd" and record["direction"] == "minimize"
    assert [(t["number"], t["state"], t["value"]) for t in record["trials"]] == [
        (t.number, "COMPLETE", t.value) for t in found
    ]
    assert record["search_space"]["optimizer.lr"]["log"] is True
    best = yaml.safe_load((vae_study / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(t.value for t in found)


def test_a_rerun_continues_the_study_its_numbers_and_new_parameters(vae_study, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(vae_study, sweep)
    before = {t.number: (t.params, t.value) for t in trials(sweep)}
    same = search(sweep)  # the same command: the study already holds its 3 trials
    assert same.returncode == 0, same.stderr[-3000:]
    assert len(trials(sweep)) == 3 and job_dirs(sweep) == JOBS
    more = search(sweep, n_trials=5)  # a larger study: 2 more trials, numbered on
    assert more.returncode == 0, more.stderr[-3000:]
    found = trials(sweep)
    assert [t.number for t in found] == [0, 1, 2, 3, 4]
    assert {t.number: (t.params, t.value) for t in found[:3]} == before  # done trials are not rerun
    assert job_dirs(sweep) == [*JOBS, "3-vae-synthetic", "4-vae-synthetic"]
    # the sampler's seed moves on: the new trials are not the first call's first draws again
    assert all(t.params != before[t.number - 3][0] for t in found[3:])
    assert all(t.value == metrics_value(t.user_attrs["genexp_run_dir"]) for t in found[3:])


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert proc.poll() is None, path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s"
        time.sleep(0.2)


def test_a_trial_killed_mid_run_is_resumed_under_its_own_number_and_counted_once(tmp_path):
    sweep = tmp_path / "sweep"
    # the sweep pauses in trial 1's test (its fit done, last.ckpt written) and is killed there
    env = faults.environ(GENEXP_FAULT_PAUSE="test:300", GENEXP_FAULT_PAUSE_JOB="1", WANDB_MODE="disabled")
    env.pop("HYDRA_FULL_ERROR", None)
    log = tmp_path / "first.log"
    with log.open("w") as out:
        args = [GENEXP, *SEARCH, f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=3"]
        proc = subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_for(log, "fault injection: pausing in test", proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    states = [t.state.name for t in trials(sweep)]
    assert states == ["COMPLETE", "RUNNING"]  # the kill left trial 1 running in the study

    again = search(sweep)  # the same command, no fault
    assert again.returncode == 0, again.stderr[-4000:]
    found = trials(sweep)
    assert [(t.number, t.state.name) for t in found] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert "trial 1 was interrupted: resuming it from" in again.stdout + again.stderr
    assert job_dirs(sweep) == JOBS  # resumed in its own run dir, no other
    metrics = json.loads((sweep / JOBS[1] / "metrics.json").read_text())
    assert metrics["global_step"] == 3  # its 3 steps trained once: resumed, not trained again on top
    assert found[1].value == metrics["test"]["test/bpd"]


def test_a_diverged_trial_is_recorded_as_failed_and_the_search_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    # a command-line sweep joins the search space: lr 1e12 diverges at the first step
    out = search(sweep, "optimizer.lr=choice(0.001,1e12)", n_trials=4)
    assert out.returncode == 0, out.stderr[-4000:]
    found = trials(sweep)
    assert len(found) == 4
    failed = [t for t in found if t.state.name == "FAIL"]
    done = [t for t in found if t.state.name == "COMPLETE"]
    assert failed and done  # the sampler's seed draws both (TPE, seed 0)
    assert all(t.params["optimizer.lr"] == 1e12 for t in failed)
    assert all("non-finite train loss" in t.user_attrs["genexp_error"] for t in failed)
    assert all(t.value == metrics_value(t.user_attrs["genexp_run_dir"]) for t in done)


def test_a_search_space_key_the_config_lacks_fails_before_any_trial_in_one_line(tmp_path):
    sweep = tmp_path / "sweep"
    out = search(sweep, "model.betta=interval(0.5,1.0)")
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert errors == [out.stderr.strip().splitlines()[-1]], out.stderr[-3000:]
    assert errors[0].startswith("genexp: error: hydra.sweeper.params: Could not override 'model.betta'")
    assert "did you mean model.beta?" in errors[0]
    assert not sweep.exists() or not any(sweep.iterdir())  # no study, no trial


def test_the_plugins_own_sweeper_class_is_refused_with_genexps_named(tmp_path):
    stock = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    out = search(tmp_path / "sweep", f"hydra.sweeper._target_={stock}")
    assert out.returncode == 2
    assert "not a configurable target (did you mean hydra_plugins.genexp_search" in out.stderr


@pytest.mark.parametrize("recipe", group_options("hparams_search"))
def test_every_search_recipe_composes_at_a_point_of_its_space(recipe):
    """Each recipe's sweeper is registered, its objective valid, and one trial's config composes
    with every searched key set (the check the sweeper runs before any trial)."""
    from hydra_plugins.hydra_optuna_sweeper import _impl

    from genexp.search import first_value

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="genexp.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hparams_search={recipe}"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == sweeps.SEARCH_SWEEPER and build.registered([sweeper.sampler._target_]) == []
    assert sweeper.storage.startswith("sqlite:///") and sweeper.n_jobs == 1 and sweeper.sampler.seed == 0
    check_objective(cfg)
    space, fixed = _impl.create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert space and not fixed
    point = [f"{name}={first_value(d)}" for name, d in space.items()]
    composed = compose_cfg([f"hparams_search={recipe}", *point])
    for name in space:
        assert OmegaConf.select(composed, name) is not None or name in cfg.hydra.runtime.choices, name
    assert cfg.hydra.runtime.choices.model == recipe.removesuffix("_optuna")  # vae_optuna searches a VAE


def test_the_objective_is_metrics_jsons_value():
    cfg = OmegaConf.create({"objective": None, "monitor": {"metric": "val/bpd"}})
    metrics = {"test": {"test/bpd": 1.25, "test/loss": "nan"}, "fit_time_s": 3.5}
    assert objective_value(cfg, metrics) == 1.25  # the monitor metric, on the test split
    cfg.objective = "test/loss"
    assert str(objective_value(cfg, metrics)) == "nan"  # a diverged run's metric, as metrics.json writes it
    cfg.objective = "fit_time_s"
    assert objective_value(cfg, metrics) == 3.5
    cfg.objective = "test/fid"
    assert objective_value(cfg, metrics) is None  # a single run or a grid job: no objective, no error
    with pytest.raises(
        GenexpError, match=r"^objective=test/fid: .*\(its test metrics: test/bpd, test/loss\)"
    ):
        objective_value(cfg, metrics, required=True)  # a search's trial: a failed trial with the reason
    cfg.objective = "val/bpd"
    with pytest.raises(GenexpError, match=r"^objective=val/bpd: a sweep optimises one number"):
        check_objective(cfg)


def test_a_sweep_job_joins_its_sweep_in_wandb(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hydra = OmegaConf.create(
        {
            "sweep": {"dir": str(tmp_path / "multirun" / "vae_optuna-mnist5k")},
            "runtime": {"choices": {"model": "vae"}},
            "overrides": {"task": ["hparams_search=vae_optuna", "optimizer.lr=0.00123", "x" * 80]},
        }
    )
    monkeypatch.setattr(sweeps, "multirun_config", lambda: hydra)
    node = OmegaConf.create({"group": None, "job_type": None, "tags": ["mine"]})
    assert sweeps.wandb_sweep_kwargs(node) == {
        "group": "multirun/vae_optuna-mnist5k",
        "job_type": "vae",
        "tags": ["mine", "hparams_search=vae_optuna", "optimizer.lr=0.00123", "x" * 64],
    }
    chosen = OmegaConf.create({"group": "my-group", "job_type": "probe", "tags": []})
    assert set(sweeps.wandb_sweep_kwargs(chosen)) == {"tags"}  # the user's group and job type win
    monkeypatch.setattr(sweeps, "multirun_config", lambda: None)
    assert sweeps.wandb_sweep_kwargs(node) == {}  # a single run: nothing added
    wandb_yaml = yaml.safe_load((CONFIG_ROOT / "logger" / "wandb.yaml").read_text())
    assert wandb_yaml["group"] is None and wandb_yaml["job_type"] is None


def test_one_wandb_sync_command_uploads_every_offline_run_of_a_sweep(tmp_path, caplog):
    sweep = tmp_path / "my sweep"
    for job in ("0-vae-mnist5k", "1-vae-mnist5k"):
        (sweep / job / "wandb" / f"offline-run-2026_{job[0]}").mkdir(parents=True)
    (sweep / "0-vae-mnist5k" / "wandb" / "latest-run").mkdir()  # wandb's own link: not a run
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with caplog.at_level("INFO", logger="genexp"):
        sweeps.SweepEnd().on_multirun_end(config)
    lines = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("wandb: 2 offline runs in this sweep")
    command = lines[0].split("upload them all with: ", 1)[1]
    listed = subprocess.run(
        ["sh", "-c", f"printf '%s\\n' {command.removeprefix('wandb sync ')}"], capture_output=True, text=True
    )
    assert listed.stdout.splitlines() == [str(p) for p in sorted(sweep.glob("*/wandb/offline-run-*"))]
    assert sweeps.sync_command(tmp_path / "empty") is None


def wandb_run_record(path: Path):
    """The run record (group, job type, tags) of an offline ``.wandb`` file: LevelDB-log blocks of
    protobuf ``Record``s after a 7-byte header; None where the format is not that."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "run":
                return record.run
    return None


def test_a_grid_sweeps_wandb_runs_share_one_group_and_one_sync_command(tmp_path):
    sweep = tmp_path / "sweep"
    args = [*(o for o in TINY if o != "logger=none"), "logger=wandb", "model.base_channels=8"]
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb")}
    out = genexp(
        "train", "-m", *args, "model.latent_dim=2,4", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    logged = out.stdout + out.stderr
    assert logged.count("upload them all with: wandb sync") == 1
    assert f"wandb sync {sweep}/*/wandb/offline-run-*" in logged
    for job, latent in (("0-vae-synthetic", "2"), ("1-vae-synthetic", "4")):
        files = list((sweep / job / "wandb").glob("offline-run-*/*.wandb"))
        run = wandb_run_record(files[0]) if len(files) == 1 else None
        if run is None:
            pytest.skip(
                "this wandb writes its offline runs in another format: the unit test above covers the arguments"
            )
        assert (run.run_group, run.job_type) == ("sweep", "vae")
        assert f"model.latent_dim={latent}" in run.tags and "logger=wandb" in run.tags
