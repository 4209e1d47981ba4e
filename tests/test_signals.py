"""Stop signals act within seconds in every phase (docs/reliability.md, "Signals"): a real signal to
a real ``genexp`` process, in validation, a sample grid, the test (inside the bits/dim bound),
``genexp sample``, ``genexp evaluate`` and ``genexp compare`` (whose training child stops too).
Each asserts the exit status, the time from the signal to the exit and the files left behind.

Phases are reached with the fault-injection pause ``GENEXP_FAULT_PAUSE=<phase>`` (tests/faults: it logs
``fault injection: pausing in <phase>`` and sleeps 60 s) or a log line printed just before a long
computation; the signal follows 0.3 s after that line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest
import torch
from conftest import TINY, TINY_MODEL, compose_cfg

from genexp.commands.train import train
from genexp.families import get as family

# a few seconds on a busy 2-core machine; the old behaviour ran on for the whole phase (60 s pauses)
PROMPT_S = 12.0
VAE = [*TINY, "model=vae", *TINY_MODEL["vae"], "trainer.deterministic=true"]
# the test's bits/dim bound of a DDPM-1000 takes many seconds: the signal lands inside it
DDPM = [
    *TINY,
    "trainer.limit_train_batches=1",
    "callbacks.sample_grid=null",
    "model=ddpm",
    "model.net.base_channels=8",
    "model.net.num_groups=4",
    "schedule.timesteps=1000",
    "model.bpd_timesteps=1000",
    "model.bpd_images=8",
]


def genexp(*args: str) -> list[str]:
    return [sys.executable, "-m", "genexp.cli", *args]


def signal_at(cmd: list[str], marker: str, sig: signal.Signals, cwd: Path, pause: str = "") -> tuple:
    """Start ``cmd``, send ``sig`` 0.3 s after a line containing ``marker``; return (exit status,
    seconds from the signal to the exit, output, the pids of its children when signalled)."""
    env = faults.environ(OMP_NUM_THREADS="1", WANDB_MODE="disabled", GENEXP_FAULT_PAUSE=pause)
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, children, sent = [], [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                time.sleep(0.3)
                children = child_pids(proc.pid)
                os.kill(proc.pid, sig)
                sent = time.monotonic()
                break
        lines.append(proc.communicate(timeout=120)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines)
    assert sent is not None, f"never reached {marker!r}:\n{output[-3000:]}"
    return proc.returncode, time.monotonic() - sent, output, children


def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # no /proc children list here
        return []


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp-*")]


@pytest.mark.parametrize(
    ("phase", "sig", "status"),
    # the same path (a signal outside a step); the grid case, with SIGINT, under make test-all
    [
        ("validation", signal.SIGTERM, 75),
        pytest.param("sample_grid", signal.SIGINT, 130, marks=pytest.mark.slow),
    ],
)
def test_a_signal_outside_a_training_step_saves_the_last_step_at_once_and_resumes_exactly(
    phase, sig, status, tmp_path
):
    run = tmp_path / "run"
    args = [*VAE, "trainer.max_epochs=2", "trainer.limit_train_batches=2", f"hydra.run.dir={run}"]
    code, took, output, _ = signal_at(
        genexp("train", *args), "fault injection: pausing", sig, tmp_path, phase
    )
    assert code == status, output[-3000:]
    assert took < PROMPT_S, f"{took:.1f} s from the signal to the exit"
    assert f"preempted by {sig.name}: saved" in output and "at global step 2" in output, output[-2000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert not (run / "metrics.json").exists() and not temp_files(run)
    assert not list((run / "samples").glob("epoch_001_samples.png"))  # the grid it was drawing
    if phase != "validation":
        return
    # resumed, it ends where an uninterrupted run ends, bit for bit
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}  # one thread, as the reference
    resumed = subprocess.run(
        genexp("train", f"ckpt_path={run}"), cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = tmp_path / "reference"  # in-process (the CLI's run.train), one thread like the child
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(compose_cfg(args[:-1], reference))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    got, want = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (run, reference))
    assert got["global_step"] == want["global_step"] == 4
    for key, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key


def test_test_bound_sample_and_evaluate_stop_within_seconds_leaving_no_partial_file(tmp_path):
    run = tmp_path / "run"
    # SIGTERM inside the test's bits/dim bound: 75, complete checkpoints, no metrics.json
    code, took, output, _ = signal_at(
        genexp("train", *DDPM, f"hydra.run.dir={run}"),
        "fault injection: pausing",
        signal.SIGTERM,
        tmp_path,
        "test:0",
    )
    assert code == 75 and took < PROMPT_S, (took, output[-3000:])
    assert "stopped by SIGTERM during the test: the checkpoints are complete" in output
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "metrics.json").exists()
    # genexp sample while it draws (1000 DDPM steps): 130 for SIGINT, no grid, no .npz
    code, took, output, _ = signal_at(
        genexp("sample", f"ckpt={run}", "n=16"), "sampling 16 images", signal.SIGINT, tmp_path
    )
    assert code == 130 and took < PROMPT_S, (took, output[-3000:])
    assert "stopped by SIGINT during genexp sample: no partial output was left" in output
    assert not list((run / "samples").glob("*")) if (run / "samples").exists() else True
    # genexp evaluate inside the bound: 75 for SIGUSR1, no evaluation.json
    code, took, output, _ = signal_at(
        genexp("evaluate", f"ckpt={run}", "metrics=[bpd]", "eval.num_real=64"),
        "evaluating",
        signal.SIGUSR1,
        tmp_path,
    )
    assert code == 75 and took < PROMPT_S, (took, output[-3000:])
    assert "stopped by SIGUSR1 during genexp evaluate" in output
    assert not (run / "evaluation.json").exists() and not temp_files(run)


def test_compare_passes_the_signal_to_its_training_run_and_leaves_no_orphan(tmp_path):
    out = tmp_path / "cmp"
    # train_args as the shell hands over the README's train_args='a=1 b=2': one argument, unquoted
    tiny = " ".join(
        [a for a in TINY if not a.startswith(("dataset", "accelerator", "logger"))] + TINY_MODEL["vae"]
    )
    cmd = genexp(
        "compare",
        "families=[vae]",
        "seeds=1",
        "budget_minutes=1",
        "dataset=synthetic",
        "dataset.num_images=160",
        "accelerator=cpu",
        f"out={out}",
        f"train_args={tiny}",
    )
    code, took, output, children = signal_at(
        cmd, "fault injection: pausing", signal.SIGTERM, tmp_path, "validation"
    )
    assert "data.batch_size=16 callbacks.sample_grid.num_samples=4" in output  # split into overrides
    assert code == 75 and took < PROMPT_S, (took, output[-3000:])
    assert "passed it on to the training run" in output and "which exited with status 75" in output
    assert children and not any(Path(f"/proc/{pid}").exists() for pid in children)
    run = out / "runs" / "vae-seed0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "compare_failed.json").exists()


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        (
            "families=[ldm]",
            "ldm needs a trained first stage (model.first_stage), which compare does not train",
        ),
        ("families=[ae,nope]", "nope is not a model option; pick from"),
        ("seeds=0", "seeds=0: must be a whole number of seeds from 1 to 1000"),
        ("seeds=99999999999999999999", "must be a whole number of seeds from 1 to 1000"),
        ("budget_minutes=-1", "budget_minutes=-1: must be a number of minutes above 0"),
        ("budget_minutes=1e12", "must be a number of minutes above 0 and at most"),
    ],
)
def test_compare_refuses_bad_keys_in_one_line_before_training(arg, message, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}  # CI sets it; users see one line
    done = subprocess.run(
        genexp("compare", arg, f"out={tmp_path / 'cmp'}"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "cmp" / "runs").exists()


def test_which_families_need_a_first_stage_is_read_from_their_configs():
    assert family("ldm").needs_first_stage and not family("vae").needs_first_stage
    assert not family("ddpm").needs_first_stage
