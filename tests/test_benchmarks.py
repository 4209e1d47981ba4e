"""The benchmark scripts' smoke paths, so they cannot rot: tiny nets, a few steps, numbers checked for
shape and sense (never for speed: benchmarks print numbers, tests do not time things)."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def bench(monkeypatch):
    """``bench("bench_train")`` -> the script's module, imported from scripts/; logger levels restored
    afterwards (the scripts quieten Lightning and genexp for their tables)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    names = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "genexp")
    levels = {n: logging.getLogger(n).level for n in names}
    yield lambda name: importlib.import_module(name)
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def table_rows(out: str) -> list[str]:
    """The markdown rows (header and separator excluded) of a script's output."""
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    return lines[1:]


def test_step_times_stop_after_enough_steps_and_seconds(bench, tmp_path):
    benchlib = bench("benchlib")
    cfg = benchlib.compose(
        [
            *benchlib.QUIET_RUN,
            *benchlib.TINY_DATA,
            "model=ae",
            *benchlib.TINY_MODEL["ae"],
            "accelerator=cpu",
            "data.batch_size=16",
            "trainer.max_steps=50",
            "trainer.min_epochs=0",
            f"paths.output_dir={tmp_path}",
        ]
    )
    timer, metrics = benchlib.train_timed(cfg, stop=(2, 3, 0.0))
    # 2 warm-up + 3 timed steps; without the stop the run would take 50
    assert len(timer.steps) == metrics["global_step"] == 5
    assert timer.step_images == [16] * 5
    assert all(0 <= w <= s for w, s in zip(timer.waits, timer.steps))
    assert timer.img_per_sec_after(2) == pytest.approx(48 / sum(timer.steps[2:]))


def test_peak_memory_on_cpu_sees_an_allocation(bench):
    benchlib = bench("benchlib")
    with benchlib.PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written, so resident
        del block
    if "VmHWM" in memory.kind and "not reset" not in memory.kind:
        assert 56 <= memory.mib <= 200
    with benchlib.PeakMemory(torch.device("cpu")) as small:
        pass
    assert small.mib < memory.mib


def test_bench_train_every_family(bench, tmp_path, capsys):
    out_json = tmp_path / "train.json"
    families = "ae,vae,gan,realnvp,glow,ddpm,ldm,pixelcnn,pixel_transformer"
    bench("bench_train").main(
        [
            "--tiny",
            "--steps",
            "2",
            "--seconds",
            "0",
            "--warmup",
            "1",
            "--families",
            families,
            "--json",
            str(out_json),
        ]
    )
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["family"] for r in rows] == families.split(",")
    for r in rows:
        assert finite_positive(r["img_per_sec"]) and r["timed_steps"] == 2, r
        assert r["peak_mib"] >= 0 and r["device"].startswith("cpu") and r["torch"].startswith("torch ")
    assert len(table_rows(capsys.readouterr().out)) == len(rows)


def test_bench_sampling_cases(bench, tmp_path, capsys):
    out_json = tmp_path / "sampling.json"
    bench("bench_sampling").main(
        ["--tiny", "--batch", "2", "--ddim-steps", "5", "--families", "vae,gan,glow,ddpm,pixel_transformer"]
        + ["--json", str(out_json)]
    )
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["case"] for r in rows] == [
        "vae",
        "gan",
        "glow",
        "ddpm ddpm-20",
        "ddpm ddim-5",
        "pixel_transformer",
    ]
    assert all(finite_positive(r["samples_per_sec"]) and r["batch"] == 2 for r in rows)
    out = capsys.readouterr().out
    assert len(table_rows(out)) == 6 and "ddpm ddim-5 is" in out


def test_bench_sampling_a_trained_run_with_both_samplers(bench, tiny_cfg, tmp_path, capsys):
    from genexp.commands.train import train

    train(tiny_cfg(model="ddpm"))  # schedule.timesteps=20
    out_json = tmp_path / "sampling.json"
    run = str(tmp_path / "run")
    bench("bench_sampling").main(
        ["--families", "", "--ckpt", run, "--batch", "2", "--ddim-steps", "5", "--json", str(out_json)]
    )
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["case"] for r in rows] == [f"ddpm ddpm-20 ({run})", f"ddpm ddim-5 ({run})"]
    assert all(finite_positive(r["samples_per_sec"]) for r in rows)


def test_bench_data_shares(bench, tmp_path):
    out_json = tmp_path / "data.json"
    bench("bench_data").main(
        ["--tiny", "--steps", "3", "--warmup", "1", "--workers", "0", "--json", str(out_json)]
    )
    rows = json.loads(out_json.read_text())["rows"]
    assert rows[0]["case"] == "num_workers=0"
    for r in rows:
        # the fetch and copy happen before on_train_batch_start: within the wait, within the step
        assert 0 < r["data_share"] <= r["wait_share"] < 1, r
    benchlib = bench("benchlib")
    if benchlib.has_config_group("performance"):
        assert [r["case"] for r in rows] == ["num_workers=0", "device_data"]


def test_bench_overhead_smoke(bench, tmp_path, capsys):
    out_json = tmp_path / "overhead.json"
    bench("bench_overhead").main(
        ["--epochs", "1", "--repeats", "1", "--batch-size", "16", "--json", str(out_json)]
        + ["dataset=synthetic", "dataset.num_images=100", "model.base_channels=8", "model.latent_dim=4"]
    )
    payload = json.loads(out_json.read_text())
    assert payload["target"] == 1.05 and finite_positive(payload["ratio"])
    assert len(table_rows(capsys.readouterr().out)) == 3


def run_script(name: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_gpu_smoke_counts_flops_and_reports_mfu(bench, tmp_path, capsys):
    out_json = tmp_path / "gpu.json"
    # the variant itself runs in a worker process, as on a GPU
    bench("bench_gpu").main(["--smoke", "--variants", "fp32", "--peak-tflops", "1", "--json", str(out_json)])
    payload = json.loads(out_json.read_text())
    flops = payload["flops"]
    # backward costs about twice the forward (two convolutions' worth per forward convolution)
    assert 2.5 < flops["train_flops_per_img"] / flops["forward_flops_per_img"] < 3.5
    (row,) = payload["rows"]
    assert row["variant"] == "fp32" and finite_positive(row.get("img_per_sec")), row
    assert row["mfu"] == pytest.approx(flops["train_flops_per_img"] * row["img_per_sec"] / 1e12)
    out = capsys.readouterr().out
    assert "forward+backward" in out and "| fp32 | 4 |" in out


def test_bench_gpu_refuses_without_cuda_unless_smoke(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as exit_info:
        bench("bench_gpu").main([])
    assert exit_info.value.code == 2 and "--smoke" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_gpu_smoke_every_variant(tmp_path):
    """bf16-mixed, torch.compile (inductor on CPU: minutes on 2 cores), channels_last, device data."""
    out_json = tmp_path / "gpu.json"
    args = ("--smoke", "--timeout", "900", "--budget", "1800", "--json", str(out_json))
    done = run_script("bench_gpu.py", *args, cwd=tmp_path, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "bf16", "bf16_compile_cl", "bf16_compile_cl_dd"]
    assert all(finite_positive(r.get("img_per_sec")) for r in rows), rows


@pytest.mark.slow
def test_bench_ddp_smoke(tmp_path):
    out_json = tmp_path / "ddp.json"
    done = run_script(
        "bench_ddp.py",
        "--tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--cores",
        "2",
        "--json",
        str(out_json),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["procs"], r["threads"]) for r in rows] == [(1, 1), (1, 2), (2, 1)]
    assert all(finite_positive(r["img_per_sec"]) for r in rows)
    assert finite_positive(rows[2]["efficiency"]) and finite_positive(rows[2]["vs_one"])


def test_a_workers_one_line_error_is_found_with_or_without_hydra_full_error(bench):
    """genexp's own line wins; under HYDRA_FULL_ERROR=1 (as .ci/run sets) the same message is the
    traceback's last line, read as genexp's; otherwise a traceback's last exception line."""
    error_line = bench("benchlib").error_line
    plain = "training...\ngenexp: error: model.latent_dim=-1: must be >= 1\n"
    full = "Traceback (most recent call last):\n  File x\ngenexp.errors.GenexpError: model.latent_dim=-1: must be >= 1\n"
    other = "Traceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\nexit\n"
    assert error_line(plain) == error_line(full) == "genexp: error: model.latent_dim=-1: must be >= 1"
    assert error_line(other) == "RuntimeError: CUDA out of memory"
    assert error_line("", 3) == "exit code 3"
