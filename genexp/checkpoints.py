"""Checkpoint files: which file a run dir means, reading one safely, and rebuilding its family.

Every command that needs a run's weights (``sample``, ``evaluate``, ``compare``, latent diffusion's
first stage, the run's own test) asks :func:`weights_of`, so they all score the same weights; resuming
a run (``ckpt_path=``) continues from ``last.ckpt`` instead (:mod:`genexp.resume`): training state,
not weights. A checkpoint loads with ``weights_only=True`` and its stored config is data, built
through the same registry as a run's (:mod:`genexp.build`).

Lightning-free and Hydra-free: ``genexp sample`` imports this without either.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from genexp.errors import GenexpError
from genexp.layout import BEST_CKPT, LAST_CKPT
from genexp.models.base import Autoencoding
from genexp.resume import resolve_checkpoint
from genexp.rundir import run_dir_of

__all__ = [
    "WEIGHTS",
    "LoadedModel",
    "MissingNode",
    "check_first_stage_family",
    "check_first_stage_fits",
    "check_sections",
    "check_weights_fit",
    "describe",
    "load_first_stage",
    "load_model",
    "model_state",
    "progress",
    "read",
    "run_dir_of",
    "weights_of",
]

# a run dir's weights: the monitored best when the run has one, else its newest state
WEIGHTS = (BEST_CKPT, LAST_CKPT)


def weights_of(value: str | Path) -> Path:
    """The checkpoint file whose weights ``value`` means, by the one rule every command follows:

    - a ``.ckpt`` file is itself;
    - a run dir (or its ``checkpoints/`` folder) means ``checkpoints/best.ckpt`` when it exists (the
      weights the run's own test scored, so ``metrics.json`` and ``genexp evaluate ckpt=<run>`` agree),
      else ``checkpoints/last.ckpt``;
    - ``latest`` means the newest run dir under ``outputs/`` or ``multirun/``, by the same rule.

    Resuming (``ckpt_path=``) is another question, which training state to continue from: always
    ``last.ckpt`` (:func:`genexp.resume.resolve_checkpoint`).
    """
    return resolve_checkpoint(str(value), names=WEIGHTS)


class MissingNode(GenexpError):
    """An override names a node the checkpoint's config does not have (e.g. a sampler for a VAE)."""

    def __init__(self, key: str, config: DictConfig):
        self.key, self.config = key, config
        super().__init__(f"{key}: the checkpoint's config has no such node to replace")


class LoadedModel(NamedTuple):
    model: nn.Module
    config: DictConfig  # the run's resolved config, as stored in the checkpoint (plus any overrides)
    path: Path  # the checkpoint file


def _file_kind(path: Path) -> str | None:
    """What a file that is not a PyTorch checkpoint looks like, from its first bytes (None: it
    may be one: a zip archive, which torch.save writes, or a legacy pickle)."""
    try:
        with open(path, "rb") as file:
            head = file.read(512)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if not head:
        return None  # empty: torch's own error says EOF
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not a PyTorch file (unknown binary data)"
    return "a text file, not a PyTorch checkpoint"


def _first_line(err: BaseException) -> str:
    """``<Type>: <first sentence>`` of an error torch raised, short enough for one line."""
    first = str(err).strip().splitlines()[0].split(". ")[0][:120] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _unpickling_refusal(path: Path, err: pickle.UnpicklingError) -> GenexpError:
    """weights_only met a global it does not allow (nothing ran), or the pickle is broken."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    if found:
        return GenexpError(
            f"ckpt_path={path}: cannot load it safely as a checkpoint: it holds pickled Python objects "
            f"({found.group(1)}) that weights_only=True refuses, so nothing in it was run; use a checkpoint genexp wrote"
        )
    text = str(err).strip()
    return GenexpError(
        f"ckpt_path={path}: cannot load it as a checkpoint: not a valid pickle "
        f"({text.splitlines()[0][:120] if text else 'UnpicklingError'}); "
        "use another checkpoint of the run (checkpoints/best.ckpt) or retrain"
    )


def read(path: Path) -> dict:
    """Load a genexp checkpoint safely (``weights_only=True``): a pickle that would run code is
    refused, and the sections genexp reads are checked to be what genexp writes."""
    kind = _file_kind(path)
    if kind is not None:
        raise GenexpError(
            f"ckpt_path={path}: {kind}; pass a .ckpt that genexp wrote (a run dir's checkpoints/)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _unpickling_refusal(path, err) from None
    except Exception as err:  # truncated zip, empty file, not a PyTorch file at all
        raise GenexpError(
            f"ckpt_path={path}: cannot load it safely as a checkpoint: truncated or not a PyTorch file "
            f"({_first_line(err)}); use another checkpoint of the run (checkpoints/best.ckpt) or retrain"
        ) from None
    if not isinstance(ckpt, dict) or "genexp" not in ckpt or "state_dict" not in ckpt:
        raise GenexpError(f"ckpt_path={path}: not a genexp checkpoint (no genexp section)")
    check_sections(ckpt, path)
    return ckpt


def check_sections(ckpt: dict, path: Path) -> None:
    """A checkpoint's ``genexp`` and ``state_dict`` sections have the types genexp writes."""
    meta, state = ckpt["genexp"], ckpt["state_dict"]
    problem = None
    if not isinstance(meta, dict):
        problem = f"its genexp section is a {type(meta).__name__}, not a mapping"
    elif not isinstance(meta.get("config", {}), dict | type(None)):
        problem = f"its genexp.config is a {type(meta['config']).__name__}, not a mapping"
    elif not isinstance((meta.get("config") or {}).get("model", {}), dict):
        problem = "its genexp.config.model is not a mapping"
    elif not isinstance(state, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()
    ):
        problem = "its state_dict is not a mapping of names to tensors"
    if problem:
        raise GenexpError(
            f"ckpt_path={path}: a malformed genexp checkpoint ({problem}); use a checkpoint genexp wrote"
        )


def check_weights_fit(module: nn.Module, state_dict: dict, path: Path) -> None:
    """A checkpoint of the same family with other sizes (``model.latent_dim``), or of another genexp
    version (weights missing or extra), fails here naming the first tensor that differs, before
    training, not in Lightning's page of mismatches."""
    own = module.state_dict()
    for name, tensor in state_dict.items():
        if name in own and hasattr(tensor, "shape") and tuple(tensor.shape) != tuple(own[name].shape):
            raise GenexpError(
                f"ckpt_path={path}: its weights do not fit this model ({name} is {tuple(tensor.shape)} there, "
                f"{tuple(own[name].shape)} here); pass the run's own model.* settings, or its run dir"
            )
    missing = sorted(set(own) - set(state_dict))
    extra = sorted(set(state_dict) - set(own))
    if missing or extra:
        first, more = (
            (f"lacks {missing[0]}", len(missing) - 1)
            if missing
            else (f"has an unknown {extra[0]}", len(extra) - 1)
        )
        raise GenexpError(
            f"ckpt_path={path}: its weights do not fit this model (it {first}{f' and {more} more' if more > 0 else ''}); "
            "it was written by another genexp version or with other model.* settings: pass the run's own "
            "settings (its run dir), or use the genexp version that wrote it"
        )


def progress(path: Path) -> dict:
    """global_step, epoch and wandb run id of a checkpoint (memory-mapped: the weights are not read).

    An older, non-zip checkpoint gives ``{}``: the numbers are provenance only."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        meta = ckpt.get("genexp") or {}
        return {
            "global_step": ckpt.get("global_step"),
            "epoch": ckpt.get("epoch"),
            "wandb_id": meta.get("wandb_id"),
        }
    except Exception:  # noqa: BLE001 - provenance is optional; loading the weights reports real faults
        return {}


def model_state(state_dict: dict) -> dict:
    """The family's weights out of a LightningModule state dict (``model.`` prefix removed)."""
    return {k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")}


def stored_config(ckpt: dict, path: Path, overrides: dict | None = None) -> DictConfig:
    """The run config a checkpoint stored, as data (never resolved: a stored ``${oc.env:...}`` stays
    text), every ``_target_`` registry-checked; ``overrides``' nodes REPLACE the stored ones."""
    from genexp.build import as_data, check_config

    stored = ckpt["genexp"].get("config") or {}
    if not isinstance(stored, dict):
        raise GenexpError(
            f"ckpt_path={path}: its genexp.config section is not a mapping; use a checkpoint genexp wrote"
        )
    config = as_data(stored)
    check_config(config)  # every _target_ it names is registered, whether or not it gets built
    if "model" not in config:
        raise GenexpError(f"ckpt_path={path}: the checkpoint holds no model config")
    for key, node in (overrides or {}).items():
        if OmegaConf.select(config, key) is None:
            raise MissingNode(key, config)
        OmegaConf.update(config, key, node, merge=False)
    return config


def load_model(value: str | Path, overrides: dict | None = None) -> LoadedModel:
    """``value``: a run dir, a .ckpt file or ``latest`` (which file: :func:`weights_of`).
    ``overrides``: dotted keys whose nodes REPLACE the stored ones before the model is built (e.g.
    ``{"model.sampler": {...ddim...}}``: the whole sampler node is swapped, not merged into it).

    Returns the model in eval mode on the CPU. When the run used weight averaging (EMA), the
    checkpoint's ``state_dict`` holds the averaged weights, so those are what is loaded.
    """
    # build imports this module at its top (a first stage is a checkpoint): import it when building
    from genexp.build import build_model

    path = weights_of(value)
    ckpt = read(path)
    config = stored_config(ckpt, path, overrides)
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
    """The frozen AE/VAE of latent diffusion (its run's weights, by :func:`weights_of`): any family
    with ``encode``, ``decode`` and ``latent_dim``."""
    try:
        loaded = load_model(value)
    except GenexpError as err:
        raise GenexpError(f"model.first_stage={value}: {err}") from None
    check_first_stage_family(loaded.model, value)
    loaded.model.requires_grad_(False)
    return loaded


def check_first_stage_family(model: nn.Module, value: object) -> None:
    if not isinstance(model, Autoencoding):
        raise GenexpError(
            f"model.first_stage={value}: a {type(model).__name__} checkpoint; latent diffusion needs "
            "an AE or VAE run (a family with encode, decode and latent_dim)"
        )


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


def describe(loaded: LoadedModel) -> str:
    """One line naming the family, dataset and checkpoint (for CLI output)."""
    cfg = loaded.config
    target = str(cfg.model.get("_target_", "?")).rsplit(".", 1)[-1]
    dataset = str(cfg.get("dataset", {}).get("_target_", "?")).rsplit(".", 1)[-1]
    return f"{target} trained on {dataset} ({loaded.path})"
