"""``genexp sample``: every family from its run dir alone, reproducible grids, options per family, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg, group_options, tiny
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from genexp.commands.sample import sample
from genexp.commands.train import train
from genexp.errors import GenexpError

GENEXP = shutil.which("genexp", path=str(Path(sys.executable).parent)) or "genexp"
# ldm needs a trained first stage (the session's first_stage_run); the others train from nothing
FAMILIES = [f for f in group_options("model") if f != "ldm"]
TEMPERATURE = ("realnvp", "glow", "pixelcnn", "pixel_transformer")  # families whose sample takes one


def compose_app(name: str, overrides: list[str]):
    """Compose one of the CLI's configs (sample, evaluate, compare) as its command would."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="genexp.configs", version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


def genexp(*args: str, cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)  # users see one line
    return subprocess.run([GENEXP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One tiny trained run per family (a few seconds each): one step, no sample grids."""
    root = tmp_path_factory.mktemp("runs")
    fast = ["~callbacks.sample_grid", "trainer.limit_train_batches=1", "data.batch_size=8"]
    for family in FAMILIES:
        train(compose_cfg([*tiny(family), *fast], root / family))
    return {family: root / family for family in FAMILIES}


def load_npz(path: Path) -> tuple[np.ndarray, dict]:
    with np.load(path, allow_pickle=False) as data:
        return data["images"], json.loads(str(data["meta"]))


def draw(run: Path, *overrides: str):
    return sample(compose_app("sample", [f"ckpt={run}", *overrides]))


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_every_family_from_its_run_dir(family, runs, tmp_path):
    out = tmp_path / "out"
    result = draw(runs[family], "n=3", f"out={out}")
    assert result.png == out / "sample_seed0_n3.png" and result.png.stat().st_size > 100
    images, meta = load_npz(result.npz)
    assert images.dtype == np.uint8 and images.shape == (3, 1, 16, 16)  # N x C x H x W of the synthetic data
    assert (
        meta["n"] == 3
        and meta["seed"] == 0
        and meta["model"].split(".")[-1].lower() == family.replace("_", "")
    )
    # a run dir means its best weights (what the run's own test scored): genexp.checkpoints.weights_of
    assert meta["checkpoint"] == str(runs[family] / "checkpoints" / "best.ckpt")
    assert result.samples_per_sec > 0 and meta["device"] == "cpu"

    # the family's own options: temperature (flows, autoregressive), truncation (GAN), another sampler (diffusion)
    own = {"gan": "truncation=0.5"}.get(family, "temperature=0.5" if family in TEMPERATURE else None)
    if own:
        key, value = own.split("=")
        opt = draw(runs[family], "n=3", f"out={out}", own)
        assert load_npz(opt.npz)[1][key] == float(value) and opt.npz.name.startswith(
            f"sample_seed0_n3_{key[0]}"
        )
        # flows: the same noise, scaled (a GAN one step into training draws flat grey, an autoregressive
        # model near-uniform levels whatever the temperature)
        if key == "temperature" and family in ("realnvp", "glow"):
            assert not np.array_equal(load_npz(opt.npz)[0], images)
    if family == "ddpm":
        opt = draw(runs[family], "n=3", f"out={out}", "sampler=ddim", "sampler.steps=5")
        assert opt.npz.name == "sample_seed0_n3_ddim5.npz"
        assert load_npz(opt.npz)[1]["sampler"]["name"] == "DDIMSampler"  # replaced, not merged into DDPM's
    if family not in TEMPERATURE:
        with pytest.raises(GenexpError, match=f"temperature=0.7: {family} sampling takes no temperature"):
            draw(runs[family], "temperature=0.7")


def test_same_seed_gives_the_same_grid(runs, tmp_path):
    def grid(seed: int, name: str) -> tuple[bytes, np.ndarray]:
        # 9 images in batches of 4: one generator runs through all three batches
        result = draw(runs["vae"], "n=9", "batch_size=4", f"seed={seed}", f"out={tmp_path}", f"name={name}")
        return result.png.read_bytes(), load_npz(result.npz)[0]

    png_a, images_a = grid(3, "a")
    png_b, images_b = grid(3, "b")
    png_c, images_c = grid(4, "c")
    assert png_a == png_b and np.array_equal(images_a, images_b)
    assert png_a != png_c and not np.array_equal(images_a, images_c)


def test_sampler_and_device_options_are_checked(runs):
    with pytest.raises(GenexpError, match="sampler: gan has no sampler to choose"):
        sample(compose_app("sample", [f"ckpt={runs['gan']}", "sampler=ddim"]))
    with pytest.raises(GenexpError, match="truncation=1.0: realnvp sampling takes no truncation"):
        sample(compose_app("sample", [f"ckpt={runs['realnvp']}", "truncation=1.0"]))
    with pytest.raises(GenexpError, match="device='tpu': must be one of auto, cpu, cuda"):
        sample(compose_app("sample", [f"ckpt={runs['vae']}", "device=tpu"]))
    with pytest.raises(GenexpError, match="ckpt: missing"):
        sample(compose_app("sample", []))
    if not torch.cuda.is_available():
        with pytest.raises(GenexpError, match="device=cuda: no CUDA device here"):
            sample(compose_app("sample", [f"ckpt={runs['vae']}", "device=cuda"]))


def test_cli_writes_into_the_run_dir_and_prints_the_rate(runs, tmp_path):
    run = runs["ae"]
    out = genexp("sample", f"ckpt={run}", "n=4", "seed=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "samples/s on cpu" in out.stdout
    assert str(run / "samples" / "sample_seed1_n4.png") in out.stdout.splitlines()
    assert (run / "samples" / "sample_seed1_n4.npz").is_file()
    assert list(tmp_path.iterdir()) == [], "nothing written where the command ran (no outputs/, no logs)"
    # an option the family does not have: one line, exit 2, nothing written
    bad = genexp("sample", f"ckpt={run}", "temperature=0.7", "name=never", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "genexp: error: temperature=0.7: ae sampling takes no temperature (it applies to "
        "glow, pixel_transformer, pixelcnn, realnvp)"
    ]
    assert not (run / "samples" / "never.png").exists()


def test_help_lists_every_command(capsys):
    from genexp.cli import COMMANDS, main

    assert list(COMMANDS) == ["train", "sample", "evaluate", "compare", "report"]
    with pytest.raises(SystemExit) as exit_info:  # argparse's help for the positional-path command
        main(["report", "--help"])
    assert (
        exit_info.value.code == 0 and "usage: genexp report [-h] [--out OUT] dir" in capsys.readouterr().out
    )
    with pytest.raises(SystemExit):  # genexp --help: the commands, then train's groups (Hydra exits)
        main(["--help"])
    text = capsys.readouterr().out
    for command, summary in COMMANDS.items():
        assert f"  {command:<9} {summary}" in text


def test_the_user_checks_are_pure_python():
    """``genexp.checks`` is shared by every layer, diffusion/ included: no torch, Lightning, Hydra or
    OmegaConf behind it."""
    code = (
        "import sys, genexp.checks\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'lightning', 'pytorch_lightning', 'hydra', 'omegaconf')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
