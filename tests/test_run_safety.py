"""Nothing of the user's is lost: one writer per run dir, finished runs keep their results, the test
stage is deterministic, ``latest`` means the newest run, resumed bookkeeping is the run's own, and
checkpoints are checked and self-contained (docs/reliability.md, "Run dirs and results")."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest
import torch
from conftest import compose_cfg, tiny

from genexp.checkpoints import read as read_checkpoint
from genexp.commands.train import train
from genexp.errors import GenexpError
from genexp.resume import resolve_checkpoint
from genexp.runlock import LOCK_NAME, run_lock


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A tiny VAE run trained to its budget (2 epochs), with its metrics.json."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(compose_cfg([*tiny("vae"), "trainer.max_epochs=2"], run))
    return run


def copy_run(run: Path, tmp: Path) -> Path:
    dest = tmp / "copy"
    shutil.copytree(run, dest)
    return dest


def resume_cfg(run: Path, *extra: str, ckpt: Path | None = None):
    ckpt = ckpt or run / "checkpoints" / "last.ckpt"
    return compose_cfg([*tiny("vae"), "trainer.max_epochs=2", f"ckpt_path={ckpt}", *extra], run)


# ------------------------------------------------------------------ one writer per run dir


def test_a_second_writer_is_refused_while_the_first_holds_the_run(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    with run_lock(run):  # the first writer: an OS lock on its own open file, as another process holds it
        with pytest.raises(GenexpError) as err:
            train(resume_cfg(run, "trainer.max_epochs=3"))
    text = str(err.value)
    assert "\n" not in text
    assert f"paths.output_dir={run}: another genexp process (pid {os.getpid()} on" in text
    assert "is writing this run now; wait until it ends (or stop it)" in text
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before


def test_the_lock_of_a_killed_writer_is_not_stale(tmp_path):
    """SIGKILL leaves the lock file, but the kernel dropped the lock: the next writer gets it."""
    code = (
        "import sys, time; from pathlib import Path; from genexp.runlock import run_lock\n"
        "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(GenexpError, match=f"pid {proc.pid} on"):
            with run_lock(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert (tmp_path / LOCK_NAME).exists()
    with run_lock(tmp_path):
        pass


# ------------------------------------------------------------------ finished runs, deterministic tests


def test_a_finished_run_resumed_keeps_its_results_and_a_longer_budget_trains_on(finished, tmp_path, caplog):
    run = copy_run(finished, tmp_path)
    metrics = (run / "metrics.json").read_bytes()
    ckpts = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    with caplog.at_level("INFO", logger="genexp"):
        again = train(resume_cfg(run))
    assert "nothing left to train: the run already reached its budget" in caplog.text
    assert (run / "metrics.json").read_bytes() == metrics and again == json.loads(metrics)
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == ckpts
    longer = train(resume_cfg(run, "trainer.max_epochs=3"))
    assert longer["global_step"] > json.loads(metrics)["global_step"]
    assert json.loads((run / "metrics.json").read_text())["global_step"] == longer["global_step"]


def test_testing_the_same_weights_twice_gives_the_same_numbers(finished, tmp_path):
    """A run stopped after its fit but before its test is tested on resume: the same numbers as the
    test right after the fit, though the random streams before the test differ (VAE test metrics
    draw z, so an unseeded test stage differs)."""
    run = copy_run(finished, tmp_path)
    original = json.loads((run / "metrics.json").read_text())["test"]
    (run / "metrics.json").unlink()
    torch.manual_seed(12345)  # another stream than the fit left
    again = train(resume_cfg(run))["test"]
    assert again == original


# ------------------------------------------------------------------ which checkpoint


def _run_dir(root: Path, name: str, with_checkpoint: bool, mtime: float) -> Path:
    run = root / "outputs" / "vae-synthetic" / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("[]\n")
    (run / ".hydra" / "config.yaml").write_text("{}\n")
    os.utime(run / ".hydra" / "config.yaml", (mtime, mtime))
    if with_checkpoint:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return run


def test_latest_is_the_newest_run_and_says_when_it_has_no_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    now = time.time()
    older = _run_dir(tmp_path, "older", with_checkpoint=True, mtime=now - 100)
    assert resolve_checkpoint("latest") == (older / "checkpoints" / "last.ckpt").resolve()
    newer = _run_dir(tmp_path, "newer", with_checkpoint=False, mtime=now)  # killed before its first one
    with pytest.raises(GenexpError) as err:
        resolve_checkpoint("latest")
    assert str(err.value) == (
        "ckpt_path=latest: the newest run, outputs/vae-synthetic/newer, has no checkpoints/last.ckpt (it stopped "
        "before its first checkpoint); start it again, or pass an older run's dir as ckpt_path=<run dir>"
    )
    assert newer.name in str(err.value)


def test_a_loose_checkpoint_is_tested_with_its_own_weights_even_when_its_run_is_gone(finished, tmp_path):
    """Lightning restores ``best_model_path`` from the checkpoint: the original run's best.ckpt,
    another run's weights. The bookkeeping must be the new run's."""
    source = copy_run(finished, tmp_path)
    original = json.loads((source / "metrics.json").read_text())["test"]
    ckpt = torch.load(source / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    for name in state:  # other weights than the run's best: a decoder that outputs one constant
        if name.startswith("model.decoder") and state[name].is_floating_point():
            state[name] = torch.zeros_like(state[name])
    loose = tmp_path / "loose.ckpt"
    torch.save(ckpt, loose)
    shutil.rmtree(source)
    out = tmp_path / "new_run"
    metrics = train(compose_cfg([*tiny("vae"), "trainer.max_epochs=2", f"ckpt_path={loose}"], out))
    assert metrics["best_checkpoint"] is None or metrics["best_checkpoint"].startswith(str(out))
    assert metrics["test"]["test/recon"] != original["test/recon"]


# ------------------------------------------------------------------ checkpoints that are not what they say


def test_a_checkpoints_folder_that_is_a_file_fails_before_training(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    with pytest.raises(GenexpError) as err:
        train(compose_cfg(tiny("vae"), run))
    assert str(err.value) == (
        f"callbacks.model_checkpoint.dirpath={run}/checkpoints: a file, not a folder; move or delete that file, "
        "or write the run elsewhere with paths.log_dir=<folder>"
    )
    assert not (run / "samples").exists()


def _with(finished: Path, tmp: Path, edit) -> Path:
    ckpt = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)
    edit(ckpt)
    path = tmp / "edited.ckpt"
    torch.save(ckpt, path)
    return path


MALFORMED = [
    ("text-file", None, "a text file, not a PyTorch checkpoint; pass a .ckpt that genexp wrote"),
    ("genexp-not-a-mapping", lambda c: c.update(genexp="x"), "its genexp section is a str, not a mapping"),
    ("config-a-list", lambda c: c["genexp"].update(config=[1]), "its genexp.config is a list, not a mapping"),
    (
        "model-not-a-mapping",
        lambda c: c["genexp"]["config"].update(model=3),
        "genexp.config.model is not a mapping",
    ),
    (
        "state-not-tensors",
        lambda c: c["state_dict"].update(x=1),
        "its state_dict is not a mapping of names to tensors",
    ),
]


@pytest.mark.parametrize("edit, message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_checkpoints_are_one_line(finished, tmp_path, edit, message):
    if edit is None:
        path = tmp_path / "notes.ckpt"
        path.write_text("these are my notes, not weights\n")
    else:
        path = _with(finished, tmp_path, edit)
    with pytest.raises(GenexpError) as err:
        read_checkpoint(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "pickled Python objects" not in str(err.value)


@pytest.mark.parametrize("which", ["missing", "extra"])
def test_a_checkpoint_of_another_genexp_version_is_refused_before_training(finished, tmp_path, which):
    def edit(ckpt):
        state = ckpt["state_dict"]
        if which == "missing":
            state.pop(sorted(state)[0])
        else:
            state["model.renamed_in_a_newer_version.weight"] = torch.zeros(1)

    path = _with(finished, tmp_path, edit)
    with pytest.raises(GenexpError) as err:
        train(compose_cfg([*tiny("vae"), f"ckpt_path={path}"], tmp_path / "run"))
    text = str(err.value)
    assert "its weights do not fit this model (it " in text and "\n" not in text
    assert "written by another genexp version or with other model.* settings" in text
    assert (
        "lacks model." if which == "missing" else "has an unknown model.renamed_in_a_newer_version"
    ) in text
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------ latent diffusion's first stage


def test_an_ldm_checkpoint_needs_no_first_stage_run(first_stage_run, tmp_path):
    """The LDM checkpoint stores the first stage's config; its weights are in its state dict."""
    from genexp.checkpoints import load_model

    stage = tmp_path / "stage"
    shutil.copytree(first_stage_run, stage)
    run = tmp_path / "ldm"
    train(compose_cfg([*tiny("ldm"), f"model.first_stage={stage}"], run))
    shutil.rmtree(stage)  # the first stage's run dir moved away
    loaded = load_model(str(run))
    assert loaded.config.model.first_stage.source.startswith(str(stage))
    images = loaded.model.sample(4, generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()


def test_a_first_stage_trained_on_other_images_is_refused(first_stage_run, tmp_path):
    from genexp.build import build_model

    cfg = compose_cfg(
        ["model=ldm", "dataset=synthetic", "dataset.image_size=8", f"model.first_stage={first_stage_run}"]
    )
    with pytest.raises(GenexpError) as err:
        build_model(cfg)
    assert str(err.value) == (
        f"model.first_stage={first_stage_run}: trained on images of image_size=16, this run's data has "
        "dataset.image_size=8; train the first stage on this data (or set dataset.image_size=16)"
    )


@pytest.mark.slow  # two real genexp processes (~20 s): the in-process lock test above runs in make test
def test_a_second_genexp_train_on_a_training_run_is_refused_and_the_first_finishes_intact(tmp_path):
    """The issue's case, end to end: ``genexp train ckpt_path=<run>`` while the run still trains
    (paused in its first validation) stops in one line, and the first run ends complete."""
    from test_cli import GENEXP

    run = tmp_path / "run"
    env = faults.environ(WANDB_MODE="disabled", OMP_NUM_THREADS="1", GENEXP_FAULT_PAUSE="validation:8")
    env.pop("HYDRA_FULL_ERROR", None)
    args = [*tiny("vae"), "trainer.max_epochs=2", "logger=csv", f"hydra.run.dir={run}"]
    first = subprocess.Popen(
        [GENEXP, "train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pauses = 0
    for line in first.stdout:  # wait until it is inside its second validation: last.ckpt exists then
        pauses += "fault injection: pausing in validation" in line
        if pauses == 2:
            break
    assert (run / "checkpoints" / "last.ckpt").is_file()
    second_env = {k: v for k, v in env.items() if k != "GENEXP_FAULT_PAUSE"}
    second = subprocess.run(
        [GENEXP, "train", f"ckpt_path={run}"], cwd=tmp_path, env=second_env, capture_output=True, text=True
    )
    rest = first.stdout.read()
    assert first.wait(timeout=120) == 0, rest[-3000:]
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"paths.output_dir={run}: another genexp process (pid {first.pid} on" in second.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["fit_time_s"] > 0
    rows = (run / "csv" / "metrics.csv").read_text().splitlines()
    assert len(rows) > 3 and not list(run.rglob(".*.tmp-*"))
