"""The distributed path on CPU (gloo): Lightning DDP, torchrun, SLURM through submitit, run dirs.

Two-process runs are real subprocesses (``accelerator=ddp_cpu``, ~10-20 s each here); the run-dir
rules (``genexp.rundir``) are also tested in-process with a faked launcher environment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from genexp import rundir
from genexp.checkpoints import load_model
from genexp.errors import GenexpError
from genexp.resume import requeue_checkpoint

BIN = Path(sys.executable).parent
GENEXP = shutil.which("genexp", path=str(BIN)) or "genexp"
TORCHRUN = shutil.which("torchrun", path=str(BIN)) or "torchrun"
# a launcher's variables in the test's own environment (a CI job inside SLURM) would change the runs
LAUNCHER_ENV = (
    "SLURM_",
    "TORCHELASTIC_",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "MASTER_",
    "NODE_RANK",
    "GROUP_",
)


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_ENV)}
    env.pop("HYDRA_FULL_ERROR", None)
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **extra}


def run(cmd: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd``; on a timeout kill its whole process group (torchrun's or Lightning's ranks too)."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-4000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def only_dir(parent: Path) -> Path:
    found = [p for p in parent.iterdir() if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def wandb_runs(run_dir: Path) -> list[str]:
    """``offline-run-<time>-<id>`` folders of the run (one per process that logged)."""
    return sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))


# one set of files: what rank 0 writes, plus rank 1's own log (named as Lightning names its child)
RUN_FILES = {
    ".genexp.lock",
    ".hydra",
    "checkpoints",
    "metrics.json",
    "samples",
    "train.log",
    "train_ddp_process_1.log",
}


def test_ddp_run_trains_checkpoints_resumes_and_writes_one_set_of_files(tmp_path):
    """Two processes, wandb offline: one run dir (the default timestamped one, claimed by rank 0 and
    handed to rank 1), one .hydra, one metrics.json, one wandb run; resuming from the run dir
    continues global_step in the same dir and the same wandb run."""
    work = tmp_path / "work"
    run(
        [GENEXP, "train", *tiny("ae"), "accelerator=ddp_cpu", "logger=wandb"],
        cwd=work,
        WANDB_MODE="offline",
    )
    assert sorted(p.name for p in work.iterdir()) == ["outputs"], "no stray dirs in the working dir"
    run_dir = only_dir(only_dir(work / "outputs"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", run_dir.name)
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES | {"wandb"}
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 3
    first = wandb_runs(run_dir)
    assert len(first) == 1, first  # rank 1 starts no wandb run
    # rank 0 reports the run; rank 1's own log keeps its warnings only, not a second report
    assert "test: test/" not in (run_dir / "train_ddp_process_1.log").read_text()
    assert "test: test/" in (run_dir / "train.log").read_text()
    wandb_id = first[0].rsplit("-", 1)[1]

    run([GENEXP, "train", f"ckpt_path={run_dir}", "trainer.max_epochs=2"], cwd=work, WANDB_MODE="offline")
    assert only_dir(only_dir(work / "outputs")) == run_dir, "a resume writes into the same run dir"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["epochs"] == 2
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES | {"wandb"}
    # offline wandb writes one folder per session; both sessions belong to the same run id
    second = wandb_runs(run_dir)
    assert len(second) == 2 and all(name.endswith(f"-{wandb_id}") for name in second), second
    grids = sorted(p.name for p in (run_dir / "samples").glob("*_samples.png"))
    assert grids == ["epoch_001_samples.png", "epoch_002_samples.png"]


def full_split_loss(ckpt: Path, split: str) -> float:
    """The family's loss on a whole split, in one process, from a checkpoint."""
    from genexp.build import instantiate
    from genexp.data.base import collate_batch

    loaded = load_model(str(ckpt))
    data = getattr(instantiate(loaded.config.dataset, "dataset").load(), split)
    x, _ = collate_batch([data[i] for i in range(len(data))])
    with torch.no_grad():
        return loaded.model.loss(x).loss.item()


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("lightning", marks=pytest.mark.slow)])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, launcher):
    """2 x 16 images per step under DDP = 1 x 32, whether torchrun or Lightning starts the ranks: each rank gets an interleaved shard of the same
    seeded epoch order, so a step's global batch is the same 32 images, and DDP averages the two
    shard-mean gradients into the same full-batch mean. The AE has no sampling noise in its loss
    and no batch statistics, so only float32 reduction order differs. With SGD the update is linear
    in the gradient: those ~1e-7 relative differences stay at that scale over 8 steps (Adam could
    amplify them where a gradient is near zero). Measured here: parameters agree to 1.5e-8, while
    2 x 32 per step (the per-device batch not halved) moves them by 2.7e-2; atol 1e-5 sits between."""
    common = [
        *tiny("ae"),
        "optimizer=sgd",
        "optimizer.lr=0.05",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=4",  # 128 training images: 4 global batches of 32
        "trainer.limit_test_batches=1",  # 16 test images: one batch on one rank, 8 + 8 on two
        "performance.precision=32-true",  # the tolerance above is float32's (auto is bf16 on an AMX CPU)
    ]
    one = tmp_path / "one"
    run(
        [GENEXP, "train", *common, "accelerator=cpu", "data.batch_size=32", f"hydra.run.dir={one}"],
        cwd=tmp_path,
    )
    ddp = [*common, "accelerator=ddp_cpu", "data.batch_size=16"]
    if launcher == "torchrun":
        # torchrun starts both ranks and each runs the Hydra app itself (Lightning's
        # TorchElasticEnvironment takes the ranks): they agree on one run dir, torchrun-<rdzv id>
        work = tmp_path / "work"
        run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "genexp.cli", "train", *ddp], cwd=work)
        assert sorted(p.name for p in work.iterdir()) == ["outputs"]
        two = only_dir(only_dir(work / "outputs"))
        assert re.fullmatch(r"torchrun-[0-9a-f-]{36}", two.name), two.name
        assert {p.name for p in two.iterdir()} == RUN_FILES
    else:
        two = tmp_path / "two"
        run([GENEXP, "train", *ddp, f"hydra.run.dir={two}"], cwd=tmp_path)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1["global_step"] == m2["global_step"] == 8
    # parameters, not buffers: the AE's fitted prior is a running statistic of the codes, which
    # DDP takes from rank 0's shard (broadcast_buffers); it does not enter the loss
    p1, p2 = (dict(load_model(str(d)).model.named_parameters()) for d in (one, two))
    assert p1.keys() == p2.keys() and p1
    for key, value in p1.items():
        torch.testing.assert_close(p2[key], value, atol=1e-5, rtol=1e-4, msg=key)
    # test/loss under DDP is reduced over both ranks: the mean over the whole split
    whole = full_split_loss(two / "checkpoints" / "best.ckpt", "test")
    assert m2["test"]["test/loss"] == pytest.approx(whole, rel=1e-5)
    assert m2["test"]["test/loss"] == pytest.approx(m1["test"]["test/loss"], rel=1e-4)


@pytest.mark.slow
def test_torchrun_without_a_rendezvous_id_gives_one_run_dir(tmp_path):
    """Static rendezvous without an id (TORCHELASTIC_RUN_ID=none): rank 0 claims a timestamped dir
    and hands its name to rank 1 through torchrun's store."""
    work = tmp_path / "work"
    out = run(
        [TORCHRUN, f"--master-port={free_port()}", "--nproc_per_node=2", "-m", "genexp.cli", "train"]
        + [*tiny("ae"), "accelerator=ddp_cpu"],
        cwd=work,
    )
    assert sorted(p.name for p in work.iterdir()) == ["outputs"]
    run_dir = only_dir(only_dir(work / "outputs"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(_\d+)?", run_dir.name), run_dir.name
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 3
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (run_dir / "train_ddp_process_1.log").read_text() + out.stderr


def test_requeued_slurm_job_resumes_in_the_same_run_dir(tmp_path):
    """A SLURM job's run dir is slurm-<job id>; a requeued job (SLURM_RESTART_COUNT=1) finds it and
    continues from its last.ckpt. Only the job-id variables are faked: without SLURM_NTASKS,
    Lightning does not take the run for an srun task. The CSV log shows each step trained once."""
    args = [GENEXP, "train", *tiny("ae"), "logger=csv"]
    run([*args, "trainer.max_epochs=1"], cwd=tmp_path, SLURM_JOB_ID="4242", SLURM_JOB_NAME="train")
    run_dir = tmp_path / "outputs" / "ae-synthetic" / "slurm-4242"
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 3
    # the requeued job (a longer budget here, so that there is something left to train)
    out = run(
        [*args, "trainer.max_epochs=2"],
        cwd=tmp_path,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="train",
        SLURM_RESTART_COUNT="1",
    )
    assert [p.name for p in (tmp_path / "outputs" / "ae-synthetic").iterdir()] == ["slurm-4242"]
    assert "a restarted job, back in its run dir" in out.stderr + (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 6
    import csv

    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert steps == list(range(6)), steps  # a fresh start would have trained steps 0-2 again


@pytest.mark.slow
def test_slurm_local_sweep_gives_each_job_its_run_dir(tmp_path):
    """hydra/launcher=slurm_local: submitit's local executor runs each job in its own process from
    the pickled launcher; both land in their own dir of the one sweep dir."""
    run(
        [GENEXP, "train", "-m", "hydra/launcher=slurm_local", *tiny("ae"), "seed=0,1"],
        cwd=tmp_path,
        timeout=600,
    )
    sweep = only_dir(tmp_path / "multirun")
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0-ae-synthetic", "1-ae-synthetic"]
    for job, seed in zip(jobs, (0, 1)):
        assert json.loads((sweep / job / "metrics.json").read_text())["seed"] == seed
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert (sweep / job / ".hydra" / "config.yaml").is_file()


def test_slurm_launcher_needs_a_number_of_devices(tmp_path):
    """tasks_per_node comes from trainer.devices, which is ``auto`` for accelerator=ddp: refused in
    one line before anything is submitted."""
    out = subprocess.run(
        [GENEXP, "train", "-m", "hydra/launcher=slurm", "accelerator=ddp", "logger=none"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "trainer.devices=auto: hydra/launcher=slurm" in out.stderr and "trainer.devices=8" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_slurm_devices_auto_counts_the_gpus_of_the_submitting_machine(monkeypatch):
    """``accelerator=ddp`` (devices=auto) submitted from a GPU node asks for that node's GPU count;
    from a machine without GPUs it is refused (the subprocess test above)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert rundir.slurm_tasks("auto") == 8 and rundir.slurm_gpus("gpu", "auto") == 8
    assert rundir.slurm_gpus("cpu", "auto") is None and rundir.slurm_tasks(4) == 4  # a number wins
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(
        GenexpError, match=r"^trainer.devices=auto: hydra/launcher=slurm .* trainer.devices=8$"
    ):
        rundir.slurm_tasks("auto")


def test_printing_the_config_claims_no_run_dir(tmp_path):
    for args in (["--cfg", "job"], ["--help"]):
        out = subprocess.run(
            [GENEXP, "train", *args],
            cwd=tmp_path,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []


# ---- in-process: the run-dir rules and the launcher config, with a faked environment ----


@pytest.fixture
def env(monkeypatch):
    """A clean launcher environment; ``env(KEY=value, ...)`` fakes one."""
    for key in list(os.environ):
        if key.startswith(LAUNCHER_ENV):
            monkeypatch.delenv(key)

    def fake(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return fake


def test_run_dir_names_under_each_launcher(tmp_path, env):
    parent = str(tmp_path / "outputs")
    env(SLURM_JOB_ID="77", SLURM_JOB_NAME="train")
    assert rundir.run_dir(parent) == f"{parent}/slurm-77"
    env(SLURM_STEP_ID="0")  # the first srun of a batch script keeps the plain name (submitit's case)
    assert rundir.run_dir(parent) == f"{parent}/slurm-77"
    env(SLURM_STEP_ID="3")  # a later srun in the same batch script is another run
    assert rundir.run_dir(parent) == f"{parent}/slurm-77.3"
    env(SLURM_STEP_ID="4294967294")  # the batch step itself
    assert rundir.run_dir(parent) == f"{parent}/slurm-77"
    env(SLURM_ARRAY_JOB_ID="70", SLURM_ARRAY_TASK_ID="5")
    assert rundir.run_dir(parent) == f"{parent}/slurm-70_5"
    env(TORCHELASTIC_RUN_ID="abc")  # torchrun first: it may run inside a SLURM job
    assert rundir.run_dir(parent) == f"{parent}/torchrun-abc"
    assert not (tmp_path / "outputs").exists(), "launcher names claim nothing: every rank computes them"


def test_run_dir_outside_a_launcher_is_a_claimed_timestamp(tmp_path, env):
    """Runs started in the same second (here: 8 threads at once) get distinct existing dirs."""
    parent = tmp_path / "outputs"
    found: list[str] = []
    threads = [threading.Thread(target=lambda: found.append(rundir.run_dir(str(parent)))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 8 and all(Path(p).is_dir() for p in found)
    stamps = {re.sub(r"_\d+$", "", Path(p).name) for p in found}
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", s) for s in stamps)
    # an interactive allocation (salloc) shares one job id between all its commands: timestamps
    env(SLURM_JOB_ID="77", SLURM_JOB_NAME="interactive")
    assert Path(rundir.run_dir(str(parent))).name != "slurm-77"


def test_torchrun_without_a_run_id_or_store_is_refused(tmp_path, env):
    env(TORCHELASTIC_RUN_ID="none", TORCHELASTIC_USE_AGENT_STORE="False")
    with pytest.raises(GenexpError, match="--rdzv-id"):
        rundir.run_dir(str(tmp_path))


def test_only_rank_zero_writes_hydra_files_and_the_main_log(env):
    assert (rundir.process_rank(), rundir.job_name("train"), rundir.on_rank_zero(".hydra")) == (
        0,
        "train",
        ".hydra",
    )
    env(LOCAL_RANK="1")  # Lightning's own child: it gets its run dir and job name on the command line
    assert rundir.process_rank() == 0
    env(SLURM_JOB_ID="77", SLURM_JOB_NAME="train", SLURM_NTASKS="4", SLURM_PROCID="2")
    assert (rundir.process_rank(), rundir.job_name("train"), rundir.on_rank_zero(".hydra")) == (
        2,
        "train_ddp_process_2",
        None,
    )
    env(TORCHELASTIC_RUN_ID="abc", RANK="1")
    assert rundir.process_rank() == 1


def test_requeue_checkpoint_only_for_a_restarted_job(tmp_path, env):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    assert requeue_checkpoint(tmp_path) is None  # a first run never resumes by itself
    env(SLURM_RESTART_COUNT="1")
    assert requeue_checkpoint(tmp_path) == ckpt.resolve()
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # Lightning's pre-emption checkpoint, newer than last.ckpt
    hpc.write_bytes(b"x")
    os.utime(ckpt, (1, 1))
    assert requeue_checkpoint(tmp_path) == hpc.resolve()
    assert requeue_checkpoint(tmp_path / "elsewhere") is None


def compose_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    rundir.register_resolvers()
    with initialize_config_module(config_module="genexp.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


def test_slurm_launcher_ties_tasks_and_gpus_to_the_trainer(tmp_path, monkeypatch, env):
    monkeypatch.chdir(tmp_path)
    cfg = compose_hydra(
        ["hydra/launcher=slurm", "accelerator=ddp", "trainer.devices=8", "trainer.num_nodes=4"]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (8, 8, 4)
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0  # requeue before the limit
    assert launcher.additional_parameters.requeue is True
    cpu = compose_hydra(["hydra/launcher=slurm", "accelerator=ddp_cpu"]).hydra.launcher
    assert (cpu.tasks_per_node, cpu.gpus_per_node) == (2, None)
    local = compose_hydra(["hydra/launcher=slurm_local"]).hydra.launcher
    assert local._target_.endswith("LocalLauncher") and local.tasks_per_node == 1


def test_a_ddp_sweep_is_refused_unless_srun_started_the_ranks(env):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from genexp.validate import refuse_ddp_sweep

    cfg = compose_hydra(["accelerator=ddp_cpu"])
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(GenexpError, match="ddp_spawn for local sweeps, or hydra/launcher=slurm"):
            refuse_ddp_sweep(cfg)
        # an srun task of the slurm launcher: SLURMEnvironment takes the ranks, nothing is replayed
        env(SLURM_JOB_ID="77", SLURM_JOB_NAME="train", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2")
        refuse_ddp_sweep(cfg)
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize("module_class", ["GenerativeModule", "GANModule"])
def test_each_rank_draws_its_own_sampling_noise(module_class):
    """seed_everything gives every rank the same seed; on_fit_start offsets it by the global rank,
    so rank 1's noise (reparameterisation, diffusion's t and eps, GAN latents) is not rank 0's."""
    from functools import partial
    from types import SimpleNamespace

    from torch import nn

    from genexp.lit.gan_module import GANModule
    from genexp.lit.module import GenerativeModule

    cls = {"GenerativeModule": GenerativeModule, "GANModule": GANModule}[module_class]

    def noise(rank: int, world_size: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Linear(1, 1)
        extra = {"optimizers": {"generator": {}, "discriminator": {}}} if cls is GANModule else {}
        module = cls(model=model, optimizer=partial(torch.optim.SGD, lr=0.1), **extra)
        module._trainer = SimpleNamespace(world_size=world_size, global_rank=rank, datamodule=None)
        module.on_fit_start()
        return torch.randn(4)

    torch.testing.assert_close(noise(1, 2), noise(1, 2))  # reproducible per rank
    assert not torch.allclose(noise(0, 2), noise(1, 2))


@pytest.mark.parametrize("family", ["score_sde", "ncsn"])
def test_score_based_ddp_run_logs_the_ode_bits_per_dim_and_resumes(family, tmp_path):
    """The score-based families under two processes: the continuous (score_sde) or σ-ladder (ncsn)
    DSM loss, the probability-flow ODE's ``test/bpd`` and its estimator's
    standard error (2 probes) are reduced over both ranks' images, rank 0 draws the grid (PC or
    annealed Langevin), and a resume continues ``global_step`` in the same run dir."""
    work = tmp_path / "work"
    run([GENEXP, "train", *tiny(family), "accelerator=ddp_cpu", "model.bpd_probes=2"], cwd=work)
    run_dir = only_dir(only_dir(work / "outputs"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    test = metrics["test"]
    # a 28x28 ODE likelihood of an untrained net: a finite, positive bits/dim, a small positive error
    assert 0 < test["test/bpd"] < 100 and 0 < test["test/bpd_std_err"] < test["test/bpd"], test
    assert 0 < test["test/loss"] < float("inf"), test  # ncsn's loss is summed over pixels: ~d/2 here
    assert (run_dir / "samples" / "epoch_001_samples.png").is_file()

    run([GENEXP, "train", f"ckpt_path={run_dir}", "trainer.max_epochs=2"], cwd=work)
    assert only_dir(only_dir(work / "outputs")) == run_dir, "a resume writes into the same run dir"
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 6
