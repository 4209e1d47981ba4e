"""Exact resume: a run killed by a real signal and resumed with ``ckpt_path=latest`` ends with the
same weights, bit for bit, as the same run left alone (CPU, ``trainer.deterministic=true``).

Default: one signal per family, rotating through SIGKILL, SIGTERM, SIGINT and SIGUSR1, so every
family and every signal is covered; ``-m slow`` runs the whole family x signal matrix. Each kill
prints one ``exact-resume:`` line (``pytest -s``); count survived kills with ``pytest -v`` (one
test id per family and signal).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest
import torch
from conftest import compose_cfg, group_options, tiny

from genexp.commands.train import train
from genexp.data.order import EpochSampler, epoch_permutation
from genexp.lit.preemption import Preempted
from genexp.lit.rng_state import RNGState, capture, restore
from genexp.signals import PREEMPTED_EXIT_CODE

FAMILIES = group_options("model")
SIGNALS = ["SIGKILL", "SIGTERM", "SIGINT", "SIGUSR1"]
STEPS = 12  # 3 epochs of 4 batches: two epoch boundaries inside, validation (which draws noise) at each

# 3 epochs of 4 steps, last.ckpt every 2 steps and at epoch ends, deterministic kernels
RUN = [
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=4",
    "checkpoint.every_n_steps=2",
    "trainer.deterministic=true",
]


def overrides(family: str) -> list[str]:
    return [*tiny(family), *RUN]


def genexp_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "genexp.cli", "train", *args]


def env(**extra: str) -> dict:
    """The children's environment; GENEXP_FAULT_* in ``extra`` reach them through tests/faults."""
    return faults.environ(OMP_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="1", **extra)


@pytest.fixture(autouse=True)
def _nondeterministic_afterwards():
    yield  # trainer.deterministic=true switches deterministic algorithms on for the whole process
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def family_env(request):
    """``family_env(family)``: what the family's run needs (ldm: the session's first stage)."""

    def make(family: str) -> None:
        if family == "ldm":
            request.getfixturevalue("first_stage_run")

    return make


_REFERENCES: dict[str, dict] = {}


def reference(family: str, root: Path) -> dict:
    """The uninterrupted run's final checkpoint (in-process: the same ``run.train`` as the CLI)."""
    if family not in _REFERENCES:
        run = root / f"reference-{family}"
        # the same thread count as the killed subprocesses (env(): OMP_NUM_THREADS=1): another
        # count splits float reductions differently, and bit-identity is per thread count
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            metrics = train(compose_cfg(overrides(family), run))
        finally:
            torch.set_num_threads(threads)
        assert metrics["global_step"] == STEPS
        _REFERENCES[family] = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return _REFERENCES[family]


def tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    """Every tensor that decides the rest of training: weights, EMA, optimizer state."""
    out = {}
    for section in ("state_dict", "current_model_state", "averaging_state"):
        for k, v in (ckpt.get(section) or {}).items():
            out[f"{section}.{k}"] = v
    for i, opt in enumerate(ckpt["optimizer_states"]):
        for p, state in opt["state"].items():
            for k, v in state.items():
                if torch.is_tensor(v):
                    out[f"optimizer{i}.{p}.{k}"] = v
    return out


def assert_bit_identical(got: dict, want: dict) -> None:
    assert got["global_step"] == want["global_step"] == STEPS
    a, b = tensors(got), tensors(want)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def last_ckpt(cwd: Path) -> Path | None:
    found = list(cwd.glob("outputs/*/*/checkpoints/last.ckpt"))
    return found[0] if found else None


def kill_and_resume(family: str, sig: str, tmp_path: Path, seed: int) -> None:
    """Start the run, kill it with ``sig`` a random moment after its first checkpoint, resume it
    with ``genexp train ckpt_path=latest`` and compare with the uninterrupted run."""
    want = reference(family, tmp_path)
    cwd = tmp_path / f"killed-{sig}"
    cwd.mkdir()
    # slowed steps (fault injection) so the kill lands while it trains, not after
    proc = subprocess.Popen(
        genexp_cmd(*overrides(family)),
        cwd=cwd,
        env=env(GENEXP_FAULT_SLOW_STEP="0.15"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while last_ckpt(cwd) is None:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        time.sleep(random.Random(seed).uniform(0.0, 0.9))
        before = torch.load(last_ckpt(cwd), weights_only=True)["global_step"]
        os.kill(proc.pid, getattr(signal, sig))
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed = torch.load(last_ckpt(cwd), weights_only=True)["global_step"]
    assert killed < STEPS, f"the run finished before the {sig}"
    if sig in ("SIGTERM", "SIGUSR1"):
        assert proc.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
        saved = re.search(rf"preempted by {sig}: saved .*last\.ckpt at global step (\d+)", output)
        assert saved, output[-3000:]
        # saved at the step boundary after delivery: at or after the checkpoint seen before the kill
        assert int(saved.group(1)) == killed >= before
    elif sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:  # SIGINT: Lightning's graceful shutdown
        assert proc.returncode not in (0, PREEMPTED_EXIT_CODE), output[-3000:]
    assert not list(cwd.glob("outputs/*/*/checkpoints/.*.tmp-*")) or sig == "SIGKILL"

    resumed = subprocess.run(
        genexp_cmd("ckpt_path=latest"), cwd=cwd, env=env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(list(cwd.glob("outputs/*/*"))) == 1, "the resumed run writes into the same run dir"
    assert_bit_identical(torch.load(last_ckpt(cwd), weights_only=True), want)
    print(f"exact-resume: {family} {sig} after step {killed} (of {STEPS}) -> bit-identical")


# make test kills one family per kind of state with each signal (~12 s each on 2 cores); make test-all
# (the slow marker) kills every family, and every family with every signal below
# make test's subset: one optimizer; two (adversarial); EMA + schedule; a flow — together every signal
FAST_CASES = {
    "vae": "SIGKILL",
    "gan": "SIGINT",
    "ddpm": "SIGTERM",
    "glow": "SIGUSR1",
    "score_sde": "SIGTERM",  # the SDE time draw and the EMA
    "ncsn": "SIGKILL",  # the sigma-level draw
}
FAST_FAMILIES = tuple(FAST_CASES)
# the other families (make test-all) take the signals in turn
DEFAULT_CASES = [(f, FAST_CASES.get(f, SIGNALS[i % len(SIGNALS)])) for i, f in enumerate(FAMILIES)]


@pytest.mark.parametrize(
    ("family", "sig"),
    [pytest.param(f, s, marks=() if f in FAST_FAMILIES else pytest.mark.slow) for f, s in DEFAULT_CASES],
)
def test_killed_run_resumes_bit_identical(family, sig, family_env, tmp_path):
    family_env(family)
    kill_and_resume(family, sig, tmp_path, seed=FAMILIES.index(family))


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("family", FAMILIES)
def test_killed_run_resumes_bit_identical_every_signal(family, sig, family_env, tmp_path_factory):
    family_env(family)
    root = tmp_path_factory.mktemp(f"{family}-{sig}")
    kill_and_resume(family, sig, root, seed=SIGNALS.index(sig) * 31 + FAMILIES.index(family))


def test_all_families_and_signals_are_covered():
    """Every family is killed (make test-all), and make test's subset still sends every signal."""
    assert {f for f, _ in DEFAULT_CASES} == set(FAMILIES)
    assert {s for f, s in DEFAULT_CASES if f in FAST_FAMILIES} == set(SIGNALS)


# ---------------------------------------------------------------------------- in-process pieces
def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    import random as pyrandom

    import numpy as np

    torch.manual_seed(1), np.random.seed(2), pyrandom.seed(3)
    torch.randn(3), np.random.randn(3), pyrandom.gauss(0, 1)  # gauss caches its second normal
    callback = RNGState()
    path = tmp_path / "rng.ckpt"
    torch.save({"rng": callback.state_dict()}, path)
    want = (torch.rand(5), np.random.rand(5), [pyrandom.random() for _ in range(5)], pyrandom.gauss(0, 1))
    torch.manual_seed(99), np.random.seed(99), pyrandom.seed(99)

    loaded = torch.load(path, weights_only=True)["rng"]  # plain tensors and numbers only
    assert loaded["world_size"] == 1 and len(loaded["ranks"]) == 1
    restore(loaded["ranks"][0])
    got = (torch.rand(5), np.random.rand(5), [pyrandom.random() for _ in range(5)], pyrandom.gauss(0, 1))
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert got[2] == want[2] and got[3] == want[3]


def test_validation_and_grids_between_steps_do_not_move_the_training_stream():
    """What the next step draws does not depend on what validation or a sample grid drew."""

    class Trainer:
        class state:
            from pytorch_lightning.trainer.states import TrainerFn

            fn = TrainerFn.FITTING

    callback = RNGState()
    torch.manual_seed(0)
    stream = capture()
    callback.on_validation_start(Trainer, None)
    torch.randn(100)  # validation noise
    callback.on_train_epoch_end(Trainer, None)  # a sample grid after it
    torch.randn(7)
    assert torch.equal(
        callback.state_dict()["ranks"][0]["torch"], stream["torch"]
    )  # what a checkpoint stores
    callback.on_train_batch_start(Trainer, None, None, 0)
    want = torch.rand(3)
    restore(stream)
    assert torch.equal(torch.rand(3), want)


def test_epoch_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert full == epoch_permutation(10, 3, 2).tolist() and full != list(EpochSampler(10, seed=3))
    sampler.start_at(2, 4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the skip applies once


def test_ddp_shares_cover_the_order_and_resume_within_each_rank():
    shares = [EpochSampler(10, seed=1, rank=r, world_size=3) for r in range(3)]
    for s in shares:
        s.set_epoch(1)
    order = epoch_permutation(10, 1, 1).tolist()
    padded = order + order[:2]  # 12 = 3 ranks x 4
    assert [list(s) for s in shares] == [padded[r::3] for r in range(3)]
    shares[1].start_at(1, 2)  # rank 1 had trained on 2 of its samples
    assert list(shares[1]) == padded[1::3][2:]


def test_sigterm_saves_at_the_next_step_boundary_exits_75_and_resumes_the_wandb_run(
    tiny_cfg, tmp_path, monkeypatch
):
    """In-process: the signal arrives during step 5, so step 5's end saves last.ckpt and stops;
    the resumed run logs into the same (offline) wandb run."""
    from genexp.lit import checkpointing

    monkeypatch.setenv("WANDB_MODE", "offline")
    original = checkpointing.StepCheckpoint.on_train_batch_start

    def deliver(self, trainer, pl_module, batch, batch_idx):
        original(self, trainer, pl_module, batch, batch_idx)
        if trainer.global_step == 4:  # the 5th step is about to run
            os.kill(os.getpid(), signal.SIGTERM)

    run = ["logger=wandb", "logger.name=test", "trainer.max_epochs=3", "trainer.limit_train_batches=4"]
    monkeypatch.setattr(checkpointing.StepCheckpoint, "on_train_batch_start", deliver)
    with pytest.raises(Preempted) as stopped:
        train(tiny_cfg(*run, "checkpoint.every_n_steps=3"))
    monkeypatch.setattr(checkpointing.StepCheckpoint, "on_train_batch_start", original)
    assert stopped.value.code == PREEMPTED_EXIT_CODE == 75
    assert "preempted by SIGTERM" in str(stopped.value) and "at global step 5" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)  # handlers restored
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 5 and ckpt["genexp"]["wandb_id"]
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert train(tiny_cfg(*run, f"ckpt_path={last}"))["global_step"] == STEPS
    # offline-run-<time>-<id>, and -1 after it when both runs started within the same second
    ids = {p.name.split("-")[3] for p in (tmp_path / "run" / "wandb").glob("offline-run-*")}
    assert ids == {ckpt["genexp"]["wandb_id"]}


def test_resuming_a_finished_ema_run_keeps_its_raw_weights(tiny_cfg, tmp_path):
    """Lightning's ModelCheckpoint rewrites last.ckpt at the end of a resumed fit, after the EMA
    callback has copied the average into the model: the raw weights must still be the raw ones."""
    train(tiny_cfg(model="ddpm"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    assert not all(torch.equal(first["state_dict"][k], v) for k, v in first["current_model_state"].items())
    train(tiny_cfg(f"ckpt_path={last}", model="ddpm"))  # nothing left to train; last.ckpt is written again
    again = torch.load(last, weights_only=True)
    for section in ("state_dict", "current_model_state"):
        assert all(torch.equal(first[section][k], v) for k, v in again[section].items()), section


@pytest.mark.slow
def test_ddp_run_preempted_on_rank_zero_resumes_bit_identical(tmp_path):
    """Two CPU ranks (gloo): SIGTERM reaches rank 0 only; both ranks save and stop at the same step
    boundary, and the resumed run (each rank its own random stream) matches the uninterrupted one."""
    args = [*tiny("vae"), *RUN, "accelerator=ddp_cpu"]
    runs = {}
    for name in ("reference", "killed"):
        cwd = tmp_path / name
        cwd.mkdir()
        slow = {"GENEXP_FAULT_SLOW_STEP": "0.3"} if name == "killed" else {}
        proc = subprocess.Popen(genexp_cmd(*args), cwd=cwd, env=env(**slow), stdout=subprocess.DEVNULL)
        if name == "killed":
            while last_ckpt(cwd) is None:
                assert proc.poll() is None
                time.sleep(0.05)
            time.sleep(0.5)
            os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=300) == (PREEMPTED_EXIT_CODE if name == "killed" else 0)
        runs[name] = cwd
    stopped = torch.load(last_ckpt(runs["killed"]), weights_only=True)
    assert stopped["global_step"] < STEPS and stopped["callbacks"]["RNGState"]["world_size"] == 2
    resumed = subprocess.run(
        genexp_cmd("ckpt_path=latest"), cwd=runs["killed"], env=env(), capture_output=True
    )
    assert resumed.returncode == 0
    want = torch.load(last_ckpt(runs["reference"]), weights_only=True)
    assert_bit_identical(torch.load(last_ckpt(runs["killed"]), weights_only=True), want)


def test_sigterm_before_the_first_step_is_not_lost_to_lightnings_handler(tiny_cfg, tmp_path, monkeypatch):
    """Lightning's own SIGTERM handler is in place while the data loads; genexp takes the signal
    over, saves after the first step and exits 75 (Lightning alone would exit 0 without saving)."""
    from genexp.lit.datamodule import DataModule

    original = DataModule.train_dataloader

    def loader(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(DataModule, "train_dataloader", loader)
    with pytest.raises(Preempted, match="preempted by SIGTERM: .* at global step 1;"):
        train(tiny_cfg())
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_sigterm_while_testing_exits_75_not_0(tiny_cfg, tmp_path, monkeypatch):
    """Lightning's handler is back for the test stage and would exit with status 0, no metrics."""
    from genexp.lit.module import GenerativeModule

    original = GenerativeModule.test_step

    def test_step(self, batch, batch_idx):
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(GenerativeModule, "test_step", test_step)
    with pytest.raises(Preempted) as stopped:
        train(tiny_cfg("trainer.limit_test_batches=2", "data.batch_size=4"))
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_run_stopped_by_max_steps_inside_an_epoch_extends_bit_identical(tmp_path):
    """``trainer.max_steps`` (or ``max_time``) stopping inside an epoch, then the run extended:
    Lightning counts the stopped epoch as done, which would start the next epoch's order at the old
    batch index; ``reopen_stopped_epoch`` makes the extension continue the epoch instead."""
    run = [*tiny("vae"), "trainer.max_epochs=-1", "trainer.deterministic=true"]  # 3 batches an epoch
    train(compose_cfg([*run, "trainer.max_steps=6"], tmp_path / "full"))  # stops at an epoch end
    stopped = tmp_path / "stopped"
    train(compose_cfg([*run, "trainer.max_steps=2"], stopped))
    first = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)
    assert (
        first["global_step"] == 2
        and first["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 1
    )
    train(compose_cfg([*run, "trainer.max_steps=6", f"ckpt_path={stopped}"], stopped))
    got, want = (
        torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (stopped, tmp_path / "full")
    )
    assert got["global_step"] == want["global_step"] == 6
    a, b = tensors(got), tensors(want)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
