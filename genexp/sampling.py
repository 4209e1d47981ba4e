"""Sampling a trained run: the device, the model rebuilt with the chosen sampler, the ``sample`` options.

What ``genexp sample`` and ``genexp evaluate`` share, so both read the same checkpoint the same way
and refuse the same options in the same words. The loop itself is :mod:`genexp.metrics.sampling`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from genexp import families
from genexp.checkpoints import LoadedModel, MissingNode, load_model, run_dir_of
from genexp.checks import check_finite, user
from genexp.errors import GenexpError, check_choice

DEVICES = ("auto", "cpu", "cuda")
TEMPERATURE_FIX = "pass temperature=<T >= 0> (0: the most likely value, 1: the model's own distribution)"
TRUNCATION_FIX = "pass truncation=<t > 0>, e.g. 1.5, or leave it out for untruncated noise"


def resolve_device(value: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``/``cuda:N`` (N a device here)."""
    value = str(value)
    if value != "auto" and not value.startswith("cuda:"):
        user(lambda: check_choice("device", value, DEVICES))
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise GenexpError(f"device={value}: no CUDA device here; use device=cpu or device=auto")
    index = value.partition(":")[2]
    count = torch.cuda.device_count() if index else 0
    if index and not (index.isdigit() and int(index) < count):
        raise GenexpError(
            f"device={value}: no such CUDA device (this machine has {count}); use device=cuda or "
            f"device=cuda:<0..{count - 1}>"
        )
    return torch.device(value)


def family_name(config: DictConfig) -> str:
    """The model option a run was trained with (``vae``), from its stored model node; a family from
    outside genexp's configs is named after its class (``genexp.models.vae.VAE`` -> ``vae``)."""
    family = families.of_model_config(config.model)
    return family.name if family else str(config.model.get("_target_", "?")).rsplit(".", 1)[-1].lower()


def output_dir(path: Path) -> Path:
    """Where a checkpoint's samples and evaluation go by default: its run dir, or the folder of a
    .ckpt kept outside one."""
    return run_dir_of(path) or path.parent


def load_for_sampling(ckpt: str, sampler: dict | None = None, solver: dict | None = None) -> LoadedModel:
    """The model of ``ckpt``; ``sampler`` (a ``sampler/`` node) replaces the run's ``model.sampler``,
    ``solver`` (a ``solver/`` node) its ``model.solver``.

    The node replaces the stored one as a whole (another sampler class takes other arguments: DDPM's
    ``variance`` is not DDIM's); the model is built once, with it.
    """
    overrides = {key: node for key, node in (("model.sampler", sampler), ("model.solver", solver)) if node}
    if not overrides:
        return load_model(ckpt)
    overrides.update(_selected(ckpt, sampler, solver))
    try:
        return load_model(ckpt, overrides)
    except MissingNode as err:
        option = err.key.removeprefix("model.")
        which = ", ".join(f.name for f in map(families.get, families.names()) if option in f.sample_options)
        raise GenexpError(
            f"{option}: {family_name(err.config)} has no {option} to choose (it applies to {which}, whose "
            f"model.{option} it replaces); drop the {option} option"
        ) from None


def _selected(ckpt: str, sampler: dict | None, solver: dict | None) -> dict:
    """The model keys the chosen option sets for a family that samples by either node (its
    ``family.selects``: ``solver=heun`` on a score SDE also sets ``model.sample_with=ode``)."""
    from genexp.checkpoints import read, stored_config, weights_of

    path = weights_of(ckpt)
    config = stored_config(read(path), path)
    family = families.of_model_config(config.model)
    chosen = [option for option, node in (("sampler", sampler), ("solver", solver)) if node]
    if family is None or not family.selects:
        return {}
    if len(chosen) > 1:
        raise GenexpError(
            f"sampler, solver: {family.name} samples with one of them at a time; pass either sampler= or solver="
        )
    return dict(family.selects.get(chosen[0], {}))


def sample_kwargs(loaded: LoadedModel, temperature: Any, truncation: Any) -> dict:
    """The optional ``sample`` arguments the user set, refused where the family takes none (its
    ``family.sample_options``; a family without that node: its ``sample`` signature).

    ``temperature=0`` is allowed: the autoregressive families then take the most likely level at
    every step (greedy decoding), the flows the mode z = 0."""
    family = families.of_model_config(loaded.config.model)
    takes = family.sample_options if family else tuple(inspect.signature(loaded.model.sample).parameters)
    kwargs = {}
    for key, value, fix, positive in (
        ("temperature", temperature, TEMPERATURE_FIX, False),
        ("truncation", truncation, TRUNCATION_FIX, True),
    ):
        if value is None:
            continue
        if key not in takes:
            which = ", ".join(f.name for f in map(families.get, families.names()) if key in f.sample_options)
            raise GenexpError(
                f"{key}={value}: {family_name(loaded.config)} sampling takes no {key} (it applies to {which})"
            )
        kwargs[key] = check_finite(key, value, fix, positive=positive)
    return kwargs


def sampler_description(config: DictConfig, model: Any = None) -> dict | None:
    """The diffusion sampler or flow matching ODE solver in use (class and arguments) for the
    metadata, or None; with the built ``model``, also ``nfe``: its network evaluations per sample
    (Heun's differ from its steps; an adaptive solver's: the mean over the ``sample`` calls made)."""
    option = families.active_node(families.of_model_config(config.model), config.model)
    node = config.model.get(option) if option else None
    if node is None:
        return None
    plain = OmegaConf.to_container(node, resolve=True)
    plain = {k: v for k, v in plain.items() if k != "_partial_"}
    plain["name"] = str(plain.pop("_target_", "?")).rsplit(".", 1)[-1]
    nfe = getattr(getattr(getattr(model, "diffusion", None), "sampler", None), "nfe", None)
    spent = getattr(model, "nfe_log", None)  # what each sample() call spent (an ODE solver's count)
    if spent:
        nfe = sum(spent) / len(spent)
        nfe = int(nfe) if nfe == int(nfe) else round(nfe, 1)
    if nfe is not None:
        plain["nfe"] = nfe if isinstance(nfe, float) else int(nfe)
    return plain
