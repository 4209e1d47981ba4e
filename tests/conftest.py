"""Shared fixtures: compose the real config once per test and shrink it to CPU, tiny, no logger."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from genexp import families

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"

# a run that takes a couple of seconds on 2 CPU cores
TINY = [
    "dataset=synthetic",
    "dataset.num_images=160",
    "accelerator=cpu",
    "logger=none",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "data.batch_size=16",
    "callbacks.sample_grid.num_samples=4",
    "callbacks.sample_grid.latent_points=32",
]

# per-family overrides that make the network tiny: each family's model.family.tiny (configs/model/);
# a family that trains on a first stage gets the session's tiny VAE run (the first_stage_run fixture
# sets the variable)
FIRST_STAGE = "model.first_stage=${oc.env:GENEXP_TEST_FIRST_STAGE}"
TINY_MODEL: dict[str, list[str]] = {
    name: [*([FIRST_STAGE] if families.get(name).needs_first_stage else []), *families.get(name).tiny]
    for name in families.names()
}


def tiny(model: str = "vae") -> list[str]:
    """Overrides for a run of a couple of seconds with ``model``."""
    # the first stage's path itself once the fixture has set it: a run dir's replayed overrides may
    # not call resolvers (genexp.resume.replayed_overrides), so a resumed ldm run needs the plain path
    stage = os.environ.get("GENEXP_TEST_FIRST_STAGE")
    extra = [
        o.replace("${oc.env:GENEXP_TEST_FIRST_STAGE}", stage) if stage else o
        for o in TINY_MODEL.get(model, [])
    ]
    return [*TINY, f"model={model}", *extra]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_ROOT / group).glob("*.yaml"))


def compose_cfg(overrides: list[str], output_dir: Path | None = None):
    """Compose ``train.yaml`` with overrides; ``paths.output_dir`` pointed at a temp dir."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="genexp.configs", version_base="1.3"):
        extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else []
        cfg = compose(config_name="train", overrides=[*overrides, *extra], return_hydra_config=False)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    """``tiny_cfg(*overrides, model="vae")`` -> a composed tiny config writing under ``tmp_path / "run"``."""

    def make(*overrides: str, model: str = "vae"):
        return compose_cfg([*tiny(model), *overrides], tmp_path / "run")

    return make


@pytest.fixture(scope="session")
def first_stage_run(tmp_path_factory) -> Path:
    """A tiny VAE run on the synthetic data (a few seconds), the first stage of ``ldm`` tests.

    Sets ``GENEXP_TEST_FIRST_STAGE`` so ``tiny("ldm")`` finds it."""
    from genexp.commands.train import train

    run = tmp_path_factory.mktemp("first_stage") / "run"
    train(compose_cfg([*tiny("vae"), "trainer.max_epochs=2"], run))
    os.environ["GENEXP_TEST_FIRST_STAGE"] = str(run)
    return run


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("GENEXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GENEXP_DATA", str(tmp_path / "data"))
