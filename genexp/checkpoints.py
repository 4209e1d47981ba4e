"""Rebuild a trained family from its checkpoint alone: the stored config plus the weights.

``genexp sample``/``evaluate`` and latent diffusion's first stage use this; a checkpoint loads with
``weights_only=True`` and its config is instantiated through the same allow-list as a run's.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from genexp.build import as_data, check_config
from genexp.errors import GenexpError
from genexp.resume import resolve_checkpoint
from genexp.commands.train import build_model, read_checkpoint


class MissingNode(GenexpError):
    """An override names a node the checkpoint's config does not have (e.g. a sampler for a VAE)."""

    def __init__(self, key: str, config: DictConfig):
        self.key, self.config = key, config
        super().__init__(f"{key}: the checkpoint's config has no such node to replace")


class LoadedModel(NamedTuple):
    model: nn.Module
    config: DictConfig  # the run's resolved config, as stored in the checkpoint (plus any overrides)
    path: Path  # the checkpoint file


def model_state(state_dict: dict) -> dict:
    """The family's weights out of a LightningModule state dict (``model.`` prefix removed)."""
    return {k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")}


def load_model(value: str, overrides: dict | None = None) -> LoadedModel:
    """``value``: a run dir, a .ckpt file or ``latest``. ``overrides``: dotted keys whose nodes
    REPLACE the stored ones before the model is built (e.g. ``{"model.sampler": {...ddim...}}``:
    the whole sampler node is swapped, not merged into the stored one).

    Returns the model in eval mode on the CPU. When the run used weight averaging (EMA), the
    checkpoint's ``state_dict`` holds the averaged weights, so those are what is loaded.
    """
    path = resolve_checkpoint(value)
    ckpt = read_checkpoint(path)
    stored = ckpt["genexp"].get("config") or {}
    if not isinstance(stored, dict):
        raise GenexpError(
            f"ckpt_path={path}: its genexp.config section is not a mapping; use a checkpoint genexp wrote"
        )
    config = as_data(stored)  # data, never resolved: a stored ${oc.env:...} stays text
    check_config(config)  # every _target_ it names is registered, whether or not it gets built
    if "model" not in config:
        raise GenexpError(f"ckpt_path={path}: the checkpoint holds no model config")
    for key, node in (overrides or {}).items():
        if OmegaConf.select(config, key) is None:
            raise MissingNode(key, config)
        OmegaConf.update(config, key, node, merge=False)
    model = build_model(config)
    try:
        model.load_state_dict(model_state(ckpt["state_dict"]))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise GenexpError(
            f"ckpt_path={path}: its weights do not fit the model its config builds ({first[:200]})"
        ) from None
    model.eval()
    return LoadedModel(model, config, path)


def load_first_stage(value: str) -> LoadedModel:
    """The frozen AE/VAE of latent diffusion: any family with ``encode``, ``decode`` and ``latent_dim``."""
    best = Path(value) / "checkpoints" / "best.ckpt"  # a run dir: its best checkpoint, not its last
    try:
        loaded = load_model(str(best) if best.is_file() else value)
    except GenexpError as err:
        raise GenexpError(f"model.first_stage={value}: {err}") from None
    check_first_stage_family(loaded.model, value)
    loaded.model.requires_grad_(False)
    return loaded


def check_first_stage_family(model: nn.Module, value: object) -> None:
    if not all(hasattr(model, a) for a in ("encode", "decode", "latent_dim")):
        raise GenexpError(
            f"model.first_stage={value}: a {type(model).__name__} checkpoint; latent diffusion needs "
            "an AE or VAE run (a family with encode, decode and latent_dim)"
        )


def first_stage_from_config(stored: DictConfig) -> nn.Module:
    """A first stage rebuilt from the config a latent-diffusion checkpoint stored (weights: none yet;
    the latent model's state dict fills them)."""
    if not isinstance(stored, DictConfig) or "model" not in stored:
        raise GenexpError("model.first_stage.config: the checkpoint's first stage config has no model")
    model = build_model(stored)
    check_first_stage_family(model, "<stored config>")
    return model.eval().requires_grad_(False)


def check_first_stage_fits(cfg: DictConfig, first: DictConfig, value: str) -> None:
    """The first stage must have been trained on images of this run's size and channels: otherwise
    the first forward fails with a matmul shape traceback."""
    data = cfg.get("dataset") or {}
    trained = first.get("dataset") or {}
    for key in ("image_size", "channels"):
        mine, theirs = data.get(key), trained.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            raise GenexpError(
                f"model.first_stage={value}: trained on images of {key}={theirs}, this run's data has "
                f"dataset.{key}={mine}; train the first stage on this data (or set dataset.{key}={theirs})"
            )


@torch.no_grad()
def describe(loaded: LoadedModel) -> str:
    """One line naming the family, dataset and checkpoint (for CLI output)."""
    cfg = loaded.config
    target = str(cfg.model.get("_target_", "?")).rsplit(".", 1)[-1]
    dataset = str(cfg.get("dataset", {}).get("_target_", "?")).rsplit(".", 1)[-1]
    return f"{target} trained on {dataset} ({loaded.path})"
