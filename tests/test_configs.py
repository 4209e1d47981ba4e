"""Every option of every config group composes and builds (not only the defaults)."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY, compose_cfg, group_options
from omegaconf import OmegaConf

from genexp.build import build_model, check_targets, instantiate
from genexp.data.base import ImageSource
from genexp.errors import GenexpError
from genexp.lit.datamodule import DataModule

GROUPS = [
    "model",
    "dataset",
    "optimizer",
    "lr_scheduler",
    "accelerator",
    "logger",
    "callbacks",
    "trainer",
    "paths",
    "experiment",
    "performance",
    "checkpoint",
    "divergence",
    "hydra/launcher",
]


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), group


def test_defaults_are_vae_on_mnist5k(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert cfg.model._target_ == "genexp.models.vae.VAE"
    assert cfg.dataset._target_ == "genexp.data.mnist5k.MNIST5k"
    assert cfg.logger._target_.endswith("WandbLogger")
    # the model shape follows the dataset by interpolation
    cfg = compose_cfg(["dataset=cifar10"], tmp_path)
    assert (cfg.model.image_size, cfg.model.channels) == (32, 3)


def test_yaml_keys_are_constructor_arguments(tmp_path):
    """One YAML <-> one class: every key of a group file is an argument of its _target_."""
    import inspect

    from hydra.utils import get_class, get_method

    for group in [
        "model",
        "dataset",
        "optimizer",
        "lr_scheduler",
        "logger",
        "performance",
        "checkpoint",
        "divergence",
    ]:
        for option in group_options(group):
            overrides = [f"{group}={option}"] + (
                ["dataset.root=" + str(tmp_path)] if option == "image_folder" else []
            )
            node = compose_cfg(overrides, tmp_path).get(group)
            if not node:
                continue
            target = node._target_
            try:
                obj = get_class(target)
            except Exception:
                obj = get_method(target)
            params = inspect.signature(obj).parameters
            accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
            for key in node:
                if key.startswith("_") or (group == "model" and key == "family"):
                    continue  # model.family: genexp.families' metadata, dropped before the constructor
                assert key in params or accepts_kwargs, (
                    f"{group}/{option}.yaml: {key} is not an argument of {target}"
                )


@pytest.mark.parametrize("option", group_options("model"))
def test_model_options_build(option, tmp_path, request):
    extra = []
    if option == "ldm":  # latent diffusion builds on a trained first stage
        extra = [f"model.first_stage={request.getfixturevalue('first_stage_run')}"]
    cfg = compose_cfg([f"model={option}", "dataset=synthetic", *extra], tmp_path)
    model = build_model(cfg)
    assert isinstance(model, torch.nn.Module)
    assert cfg.monitor.metric.startswith("val/")


@pytest.mark.parametrize("option", group_options("dataset"))
def test_dataset_options_build(option, tmp_path):
    overrides = [f"dataset={option}"]
    if option == "image_folder":
        overrides.append(f"dataset.root={tmp_path}")
    cfg = compose_cfg(overrides, tmp_path)
    source = instantiate(cfg.dataset, "dataset")
    assert isinstance(source, ImageSource)
    assert source.image_size == cfg.dataset.image_size and source.channels == cfg.dataset.channels
    datamodule = instantiate(cfg.data, "data", dataset=source)
    assert isinstance(datamodule, DataModule)
    # every model builds for every dataset shape (ldm: its first stage fixes the shape)
    for model_option in sorted(set(group_options("model")) - {"ldm"}):
        model_cfg = compose_cfg([*overrides, f"model={model_option}"], tmp_path)
        instantiate(model_cfg.model, "model")


@pytest.mark.parametrize("option", group_options("optimizer"))
def test_optimizer_options_build(option, tmp_path):
    cfg = compose_cfg([f"optimizer={option}"], tmp_path)
    factory = instantiate(cfg.optimizer, "optimizer")
    assert isinstance(factory, functools.partial)
    opt = factory([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups[0]["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("option", group_options("lr_scheduler"))
def test_lr_scheduler_options_build(option, tmp_path):
    cfg = compose_cfg([f"lr_scheduler={option}"], tmp_path)
    if not cfg.lr_scheduler:
        assert option == "none"
        return
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = instantiate(cfg.lr_scheduler, "lr_scheduler")(opt, total_steps=100)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)


@pytest.mark.parametrize("option", group_options("accelerator"))
def test_accelerator_options_build(option, tmp_path):
    cfg = compose_cfg([f"accelerator={option}"], tmp_path)
    assert {"accelerator", "devices", "strategy"} <= set(cfg.trainer)
    needs_gpu = cfg.trainer.accelerator == "gpu"
    if needs_gpu and not torch.cuda.is_available():
        pytest.skip("needs CUDA to build the Trainer")
    trainer = instantiate(cfg.trainer, "trainer", logger=False, enable_progress_bar=False)
    assert isinstance(trainer, pl.Trainer)
    if option == "ddp_cpu":
        assert trainer.num_devices == 2 and type(trainer.strategy).__name__ == "DDPStrategy"


@pytest.mark.parametrize("option", group_options("logger"))
def test_logger_options_build(option, tmp_path):
    cfg = compose_cfg([f"logger={option}", "logger.name=test" if option == "wandb" else "seed=0"], tmp_path)
    if not cfg.logger:
        assert option == "none"
        return
    logger = instantiate(cfg.logger, "logger")
    assert isinstance(logger, pl.loggers.Logger)


@pytest.mark.parametrize("option", group_options("callbacks"))
def test_callbacks_options_build(option, tmp_path):
    cfg = compose_cfg([f"callbacks={option}"], tmp_path)
    callbacks = [instantiate(node, name) for name, node in (cfg.callbacks or {}).items()]
    assert all(isinstance(cb, pl.Callback) for cb in callbacks)
    if option == "default":
        names = {type(cb).__name__ for cb in callbacks}
        assert {"ModelCheckpoint", "SampleGrid"} <= names


@pytest.mark.parametrize("option", group_options("experiment"))
def test_experiment_options_compose_and_build(option, tmp_path):
    cfg = compose_cfg([f"experiment={option}"], tmp_path)
    # the recipe's name starts with its family (dcgan_cifar10: a GAN; pixel_transformer_mnist5k)
    parts = option.split("_")
    prefixes = ["".join(parts[:i]) for i in range(1, len(parts))]
    assert any(p.endswith(cfg.model._target_.split(".")[-1].lower()) for p in prefixes)
    if cfg.get("first_stage_train"):  # two-stage recipes: the first stage's overrides compose too
        first = compose_cfg(list(cfg.first_stage_train), tmp_path)
        instantiate(first.model, "model")
    else:
        instantiate(cfg.model, "model")
    instantiate(cfg.dataset, "dataset")
    instantiate(cfg.trainer, "trainer", logger=False, enable_progress_bar=False)


def test_trainer_and_paths_build(tmp_path):
    cfg = compose_cfg(TINY, tmp_path)
    assert OmegaConf.to_container(cfg.paths, resolve=True)["output_dir"] == str(tmp_path)
    instantiate(cfg.trainer, "trainer", logger=False, enable_progress_bar=False)


@pytest.mark.parametrize("target", ["os.system", "subprocess.run", "builtins.eval", "posix.system"])
def test_instantiate_refuses_targets_outside_the_registry(target, tmp_path):
    marker = tmp_path / "pwned"
    node = OmegaConf.create({"_target_": target, "_args_": [f"touch {marker}"]})
    with pytest.raises(GenexpError, match="not a configurable target"):
        instantiate(node, "model")
    nested = OmegaConf.create(
        {"_target_": "genexp.models.ae.AE", "image_size": 16, "channels": 1, "inner": {"_target_": target}}
    )
    with pytest.raises(GenexpError, match=r"model\.inner\._target_"):
        check_targets(nested, "model")
    assert not marker.exists()


def test_an_experiment_sets_top_level_keys(tmp_path):
    """train.yaml's own keys (data, seed) come before experiment/, so a recipe's batch size holds."""
    cfg = compose_cfg(["experiment=dcgan_cifar10"], tmp_path)
    assert cfg.data.batch_size == 128
    cfg = compose_cfg(["experiment=dcgan_cifar10", "data.batch_size=32"], tmp_path)
    assert cfg.data.batch_size == 32  # the command line still wins
