"""Resolving ``ckpt_path`` and replaying a run's overrides (pure Python, no training)."""

from __future__ import annotations

import os
import time

import pytest
import yaml

from genexp.checkpoints import run_dir_of
from genexp.errors import GenexpError
from genexp.resume import resolve_checkpoint, resume_argv


def make_run(root, name, overrides, age=0.0):
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text("{}\n")  # Hydra writes it when the run starts
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"x")
    stamp = time.time() - age
    for path in (ckpt, run / ".hydra" / "config.yaml"):
        os.utime(path, (stamp, stamp))
    return run


def test_resolve_run_dir_checkpoint_dir_file_and_latest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = make_run(tmp_path / "outputs" / "ae-mnist5k", "old", ["model=ae"], age=100)
    new = make_run(tmp_path / "multirun" / "2026", "0-vae-mnist5k", ["model=vae"], age=1)
    assert resolve_checkpoint(str(old)) == (old / "checkpoints" / "last.ckpt").resolve()
    assert resolve_checkpoint(str(old / "checkpoints")) == (old / "checkpoints" / "last.ckpt").resolve()
    assert (
        resolve_checkpoint(str(old / "checkpoints" / "last.ckpt"))
        == (old / "checkpoints" / "last.ckpt").resolve()
    )
    assert resolve_checkpoint("latest") == (new / "checkpoints" / "last.ckpt").resolve()
    assert run_dir_of(resolve_checkpoint(str(new))) == new.resolve()


def test_resolve_errors_name_the_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GenexpError, match="ckpt_path=latest: no checkpoints/last.ckpt"):
        resolve_checkpoint("latest")
    with pytest.raises(GenexpError, match="no such file or folder"):
        resolve_checkpoint(str(tmp_path / "missing.ckpt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenexpError, match="no checkpoints/last.ckpt in that folder"):
        resolve_checkpoint(str(tmp_path / "empty"))


def test_resume_argv_replays_the_run_and_lets_new_overrides_win(tmp_path):
    run = make_run(
        tmp_path,
        "run",
        ["model=ae", "trainer.max_epochs=5", "logger=csv", "hydra.job.name=x", "ckpt_path=/old.ckpt"],
    )
    args = resume_argv([f"ckpt_path={run}", "trainer.max_epochs=9"])
    ckpt = (run / "checkpoints" / "last.ckpt").resolve()
    assert args == [
        "model=ae",
        "logger=csv",
        "trainer.max_epochs=9",
        f"ckpt_path={ckpt}",
        f"hydra.run.dir={run.resolve()}",
    ]


def test_resume_argv_leaves_other_commands_alone(tmp_path):
    assert resume_argv(["model=vae"]) == ["model=vae"]
    assert resume_argv(["ckpt_path=null"]) == ["ckpt_path=null"]
    assert resume_argv(["-m", "ckpt_path=x", "seed=0,1"]) == ["-m", "ckpt_path=x", "seed=0,1"]
    loose = tmp_path / "loose.ckpt"
    loose.write_bytes(b"x")
    assert resume_argv([f"ckpt_path={loose}", "model=ae"]) == ["model=ae", f"ckpt_path={loose.resolve()}"]
    spaced = tmp_path / "with space.ckpt"
    spaced.write_bytes(b"x")
    assert resume_argv([f"ckpt_path={spaced}"]) == [f"ckpt_path='{spaced.resolve()}'"]
