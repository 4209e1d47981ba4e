"""Atomic checkpoints: a failure or a kill during a write never leaves a truncated ``last.ckpt``, and
the previous good checkpoint survives (fault injection). Each injection test prints how many
injections it survived (``pytest -s``)."""

from __future__ import annotations

import errno
import inspect
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest
import torch
from conftest import compose_cfg, group_options, tiny
from faults import genexp_faults

from genexp.atomic import temp_path
from genexp.build import instantiate
from genexp.checkpoints import read as read_checkpoint
from genexp.commands.train import train
from genexp.errors import GenexpError
from genexp.lit import checkpoint_io
from genexp.lit.checkpoint_io import AtomicCheckpointIO
from genexp.lit.checkpointing import StepCheckpoint


def checkpoint(version: int, size: int = 1000) -> dict:
    return {
        "genexp": {"config": {}},
        "state_dict": {"w": torch.full((size,), float(version))},
        "version": version,
    }


class FailAfter:
    """A file that raises ``error`` once ``limit`` bytes have been written (a full disk, an I/O error)."""

    def __init__(self, file, limit: int, error: BaseException):
        self.file, self.limit, self.error, self.written = file, limit, error, 0

    def write(self, data) -> int:
        if self.written + len(data) > self.limit:
            self.file.write(memoryview(data)[: self.limit - self.written])
            raise self.error
        self.written += len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def inject(monkeypatch, limit: int, error: BaseException) -> None:
    """Make the next ``torch.save`` inside AtomicCheckpointIO fail after ``limit`` bytes."""
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        return real_save(obj, FailAfter(f, limit, error), *args, **kwargs)

    monkeypatch.setattr("genexp.lit.checkpoint_io.torch.save", failing_save)


def test_a_write_that_fails_midway_keeps_the_previous_checkpoint_byte_for_byte(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(checkpoint(1), path)
    before = path.read_bytes()
    rng = random.Random(0)
    injections = 0
    for error in [RuntimeError("disk controller"), KeyboardInterrupt()] * 10:
        with monkeypatch.context() as m:
            inject(m, rng.randrange(1, len(before)), error)
            # torch.save's zip writer may turn the error into its own RuntimeError on the way out
            with pytest.raises((type(error), RuntimeError)):
                io.save_checkpoint(checkpoint(2), path)
        assert path.read_bytes() == before
        assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
        injections += 1
    io.save_checkpoint(checkpoint(3), path)  # and the next write works
    assert torch.load(path, weights_only=True)["version"] == 3
    print(f"checkpoint-io: {injections} write failures injected, previous checkpoint intact every time")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_refused_write_is_one_line_naming_the_path(code, tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint(1), path)
    before = path.read_bytes()
    inject(monkeypatch, 100, OSError(code, os.strerror(code)))
    with pytest.raises(GenexpError) as err:
        io.save_checkpoint(checkpoint(2), path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and os.strerror(code) in message
    assert "previous checkpoint is kept" in message
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_non_finite_weights_are_never_written(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint(1), path)
    bad = checkpoint(2)
    bad["state_dict"]["w"][3] = float("nan")
    with pytest.raises(GenexpError, match=r"refusing to write .*last\.ckpt: non-finite weights \(w\)"):
        io.save_checkpoint(bad, path)
    ema = checkpoint(2)
    ema["current_model_state"] = {"raw": torch.tensor([float("inf")])}  # the raw weights beside an EMA
    with pytest.raises(GenexpError, match=r"non-finite weights \(raw\)"):
        io.save_checkpoint(ema, path)
    assert torch.load(path, weights_only=True)["version"] == 1


def _writer(path: Path, ready: int) -> None:
    """Child process: write checkpoints 1, 2, 3, ... with no pause in between, each write paused
    half-way (fault injection), until killed; a byte on ``ready`` once the loop starts."""
    # a forked child must not enter the parent's OpenMP pool (it would deadlock once the parent has
    # used it, as earlier tests in the session do): one thread, inline
    torch.set_num_threads(1)
    genexp_faults.slow_writes(checkpoint_io, 0.03)
    io = AtomicCheckpointIO()
    version = 1
    os.write(ready, b"1")  # the parent's random delay starts now, not at fork (a loaded machine)
    while True:
        io.save_checkpoint(checkpoint(version, size=50_000), path)
        version += 1


def sigkill_during_writes(tmp_path: Path, kills: int, seed: int = 0) -> tuple[int, int]:
    """Fork a writer, SIGKILL it at a random moment, check ``last.ckpt``; ``kills`` times.
    Returns (kills, kills that landed inside a write)."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(0, size=50_000), path)
    rng = random.Random(seed)
    inside = 0
    for _ in range(kills):
        ready, notify = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                _writer(path, notify)
            finally:
                os._exit(0)
        os.close(notify)
        os.read(ready, 1)  # the child is writing
        os.close(ready)
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        loaded = torch.load(path, weights_only=True)  # never truncated
        assert torch.equal(loaded["state_dict"]["w"], torch.full((50_000,), float(loaded["version"])))
        stale = temp_path(path).with_name(f".last.ckpt.tmp-{pid}")
        inside += stale.exists()
        stale.unlink(missing_ok=True)
    return kills, inside


def test_sigkill_during_writes_never_leaves_a_truncated_checkpoint(tmp_path):
    kills, inside = sigkill_during_writes(tmp_path, kills=20)
    print(f"checkpoint-io: {kills} SIGKILLs ({inside} inside a write), last.ckpt loaded after every one")
    assert inside >= 5  # the injection did hit writes


@pytest.mark.slow
def test_sigkill_during_writes_many_times(tmp_path):
    kills, inside = sigkill_during_writes(tmp_path, kills=300, seed=1)
    print(f"checkpoint-io: {kills} SIGKILLs ({inside} inside a write), last.ckpt loaded after every one")
    assert inside >= 100


def test_genexp_train_killed_while_writing_a_checkpoint_resumes(tmp_path):
    """End to end: SIGKILL while ``genexp train`` writes a checkpoint (slowed by fault injection);
    the last complete checkpoint loads and ``ckpt_path=latest`` finishes the run."""
    args = [
        *tiny("vae"),
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=4",
        "checkpoint.every_n_steps=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "genexp.cli", "train"]
    proc = subprocess.Popen(
        [*cmd, *args],
        cwd=tmp_path,
        env=faults.environ(env, GENEXP_FAULT_SLOW_WRITE="0.5"),
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        # the second write: a complete last.ckpt exists and another is half-written
        while not list(tmp_path.glob("outputs/*/*/checkpoints/.last.ckpt.tmp-*")) or not list(
            tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")
        ):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = next(tmp_path.glob("outputs/*/*"))
    assert list((run / "checkpoints").glob(".last.ckpt.tmp-*")), "killed inside the write"
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] >= 1
    resumed = subprocess.run(
        [*cmd, "ckpt_path=latest"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 8
    assert not list((run / "checkpoints").glob(".*.tmp-*")), "the stale temporary file was removed"


def test_trainer_writes_through_the_atomic_plugin_also_under_ddp(tmp_path):
    import pytorch_lightning as pl

    for strategy, devices in (("auto", 1), ("ddp", 2)):
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=devices,
            strategy=strategy,
            plugins=[AtomicCheckpointIO()],
            logger=False,
        )
        assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_checkpoint_group_builds_and_its_keys_are_constructor_arguments(tmp_path):
    for option in group_options("checkpoint"):
        node = compose_cfg([f"checkpoint={option}"], tmp_path).checkpoint
        args = set(inspect.signature(StepCheckpoint).parameters)
        assert set(node) - {"_target_"} <= args
        built = instantiate(node, "checkpoint")
        assert isinstance(built, StepCheckpoint) and built.dirpath == tmp_path / "checkpoints"
    with pytest.raises(GenexpError, match=r"checkpoint.every_n_steps=0: must be >= 1"):
        instantiate(compose_cfg(["checkpoint.every_n_steps=0"], tmp_path).checkpoint, "checkpoint")


@pytest.fixture
def saved_steps(monkeypatch) -> list[tuple[str, int]]:
    """(file name, global step) of every checkpoint written, in order."""
    steps = []
    original = AtomicCheckpointIO.save_checkpoint

    def record(self, ckpt, path, storage_options=None):
        steps.append((Path(path).name, ckpt["global_step"]))
        original(self, ckpt, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", record)
    return steps


def test_every_n_steps_writes_last_ckpt_at_step_boundaries(tiny_cfg, saved_steps):
    train(tiny_cfg("trainer.max_epochs=2", "trainer.limit_train_batches=4", "checkpoint.every_n_steps=3"))
    # step 3 and 6 by the step checkpoint; 4 and 8 (last and best) at the epoch ends
    assert [s for name, s in saved_steps if name == "last.ckpt"] == [3, 4, 6, 8]


def test_every_minutes_writes_last_ckpt_when_the_time_has_come(tiny_cfg, saved_steps, monkeypatch):
    clock = iter(range(0, 10_000, 20))  # 20 s a call: a save every third step with 1 minute
    monkeypatch.setattr(StepCheckpoint, "clock", staticmethod(lambda: next(clock)))
    train(tiny_cfg("trainer.max_epochs=2", "trainer.limit_train_batches=4", "checkpoint.every_minutes=1"))
    assert [s for name, s in saved_steps if name == "last.ckpt"] == [3, 4, 6, 8]


def test_under_slurm_genexp_handles_preemption_and_requeues(tmp_path, monkeypatch):
    from lightning_fabric.plugins.environments import SLURMEnvironment

    from genexp.lit.preemption import requeue_slurm_job, slurm_plugins

    assert slurm_plugins(True) == []  # not in a SLURM job
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (plugin,) = slurm_plugins(True)
    assert isinstance(plugin, SLURMEnvironment) and not plugin.auto_requeue  # no mid-step hpc_ckpt
    assert slurm_plugins(False) == []  # preemption off: Lightning's own handling stays
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    requeue_slurm_job()
    assert calls.read_text().split() == ["requeue", "4242"]


def test_a_run_dir_means_its_best_weights_and_a_ckpt_file_itself(tmp_path, monkeypatch):
    """THE rule (genexp.checkpoints.weights_of): a run dir means checkpoints/best.ckpt when it exists,
    else last.ckpt; a .ckpt path is itself; ``latest`` is the newest run dir by the same rule. So
    ``genexp evaluate ckpt=<run>`` scores the weights the run's own test scored (metrics.json)."""
    from genexp.build import build_model, plain_config
    from genexp.checkpoints import load_model, weights_of

    run = tmp_path / "outputs" / "vae-synthetic" / "run"
    cfg = compose_cfg(tiny("vae"), run)
    model = build_model(cfg)
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    for name in ("config.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text("[]\n")
    for name, value in (("last.ckpt", 1.0), ("best.ckpt", 2.0)):
        weights = {f"model.{k}": torch.full_like(v, value) for k, v in model.state_dict().items()}
        torch.save(
            {"genexp": {"config": plain_config(cfg)}, "state_dict": weights}, run / "checkpoints" / name
        )
    best, last = run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt"

    assert weights_of(run) == weights_of(run / "checkpoints") == best.resolve()
    assert weights_of(last) == last.resolve() and weights_of(str(best)) == best.resolve()
    monkeypatch.chdir(tmp_path)
    assert weights_of("latest") == best.resolve()
    loaded = load_model(str(run))
    assert loaded.path == best.resolve()
    assert all(float(p.flatten()[0]) == 2.0 for p in loaded.model.state_dict().values() if p.numel())
    assert all(
        float(p.flatten()[0]) == 1.0 for p in load_model(last).model.state_dict().values() if p.numel()
    )

    best.unlink()  # a run without a monitored best: its newest weights
    assert weights_of(run) == last.resolve() and load_model(run).path == last.resolve()
