"""What genexp knows of each family besides its constructor: the ``family:`` node of its config.

Every ``configs/model/<name>.yaml`` carries, under ``model.family``, the facts the commands need
about the family without building it: its label, the talk's ratings, which ``genexp sample``
options apply and whether it trains on a first stage's latents, plus the overrides that shrink it
for tests and benchmarks. Keeping them in the family's own file means a new family is one model
file and one YAML: no command holds a list of family names.

Reads the YAML files of the installed config package (``genexp.configs``) as plain data; imports
neither Hydra nor Lightning, so any command may ask it cheaply. ``build.instantiate`` drops the node
before the model's constructor sees it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from genexp.errors import GenexpError

ASPECTS = ("likelihood", "stability", "fidelity", "speed")  # the talk's Summary table, in its order
RATINGS = ("○", "△", "×")  # good, fair, poor (the talk's marks)
NOT_RATED = "—"  # a family the talk does not rate
SAMPLE_OPTIONS = ("temperature", "truncation", "sampler", "solver")  # genexp sample's family-specific keys
NODE_OPTIONS = ("sampler", "solver")  # the sample options that replace a model node
FIELDS = ("label", "ratings", "sample_options", "needs_first_stage", "cpu_bf16", "tiny", "renamed", "selects")
OPTIONAL = ("renamed", "selects")  # fields a family node may leave out (every other one is written out)
NODE = "family"  # under the model node: model.family


@dataclass(frozen=True)
class Family:
    """One family's metadata; ``ratings`` maps every aspect of :data:`ASPECTS` to a mark."""

    name: str  # the model option: configs/model/<name>.yaml
    label: str
    ratings: dict[str, str]
    sample_options: tuple[str, ...]
    needs_first_stage: bool
    tiny: tuple[str, ...]
    target: str = ""  # the model node's _target_: how a stored config finds its family
    # config keys the family has renamed, old -> new: a run dir written before resumes (resume.py)
    renamed: dict[str, str] = field(default_factory=dict)
    # a family that samples by either node: the model keys choosing an option also sets
    # (``solver: {model.sample_with: ode}``), so ``genexp sample solver=heun`` samples by the ODE
    selects: dict[str, dict[str, Any]] = field(default_factory=dict)
    # performance.precision=auto trains it in bf16-mixed on a CPU with native bf16 (AMX)
    cpu_bf16: bool = False

    @property
    def rated(self) -> bool:
        return any(mark != NOT_RATED for mark in self.ratings.values())


def _model_dir():
    return resources.files("genexp.configs") / "model"


def names() -> list[str]:
    """The model options (``configs/model/*.yaml``), sorted."""
    return sorted(p.name.removesuffix(".yaml") for p in _model_dir().iterdir() if p.name.endswith(".yaml"))


def get(name: str) -> Family:
    """The family of the model option ``name``; one line if there is no such option."""
    known = _all()
    if name not in known:
        raise GenexpError(f"model={name}: not a model option; pick one of {', '.join(sorted(known))}")
    return known[name]


def of_model_config(model_node: Mapping) -> Family | None:
    """The family of a composed or stored model node, by its ``_target_`` (a checkpoint written
    before the ``family:`` node existed has none); else the node's own ``family:`` (a family from a
    user's config group), or None."""
    if isinstance(model_node, DictConfig):
        model_node = OmegaConf.to_container(model_node, resolve=False)
    if not isinstance(model_node, Mapping):
        return None
    target = str(model_node.get("_target_", ""))
    for family in _all().values():
        if family.target == target:
            return family
    node = model_node.get(NODE)
    if target and isinstance(node, Mapping):
        name = target.rsplit(".", 1)[-1].lower()
        return parse(name, node, where=f"the stored config of {target}: ", target=target)
    return None


@functools.cache
def _all() -> dict[str, Family]:
    return {name: _read(name) for name in names()}


def _read(name: str) -> Family:
    where = f"configs/model/{name}.yaml: "
    try:
        data = yaml.safe_load((_model_dir() / f"{name}.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise GenexpError(f"{where}cannot be read ({type(err).__name__}); restore it") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get(NODE), dict):
        raise GenexpError(
            f"{where}no model.{NODE} node; add one with {', '.join(FIELDS)} (as every configs/model/*.yaml has)"
        )
    return parse(name, model[NODE], where=where, target=str(model.get("_target_", "")))


def parse(name: str, node: Mapping, where: str, target: str = "") -> Family:
    """A ``family:`` node as a :class:`Family`, checked: it is data only, so a misspelt field or
    mark is refused in one line naming the file and key rather than ignored. ``where``: what the
    message starts with (``"configs/model/vae.yaml: "``; empty for the composed config)."""
    key = f"model.{NODE}"
    node = dict(node)
    unknown = [k for k in node if k not in FIELDS]
    if unknown:
        raise GenexpError(
            f"{where}{key}.{unknown[0]}: not a family field; the fields are {', '.join(FIELDS)}"
        )
    label = node.get("label")
    if not isinstance(label, str) or not label.strip():
        raise GenexpError(f"{where}{key}.label={label!r}: must be the family's name in words")
    return Family(
        name=name,
        label=label,
        ratings=_ratings(node.get("ratings", {}), where, f"{key}.ratings"),
        sample_options=_strings(
            node.get("sample_options", []), where, f"{key}.sample_options", SAMPLE_OPTIONS
        ),
        needs_first_stage=_flag(node.get("needs_first_stage", False), where, f"{key}.needs_first_stage"),
        tiny=_overrides(node.get("tiny", []), where, f"{key}.tiny"),
        target=target,
        renamed=_renamed(node.get("renamed", {}), where, f"{key}.renamed"),
        selects=_selects(node.get("selects", {}), where, f"{key}.selects"),
        cpu_bf16=_flag(node.get("cpu_bf16", False), where, f"{key}.cpu_bf16"),
    )


def _ratings(value: Any, where: str, key: str) -> dict[str, str]:
    """Every aspect's mark; an aspect the node leaves out is not rated."""
    if not isinstance(value, Mapping):
        raise GenexpError(f"{where}{key}={value!r}: must map {', '.join(ASPECTS)} to a mark")
    for aspect, mark in value.items():
        if aspect not in ASPECTS:
            raise GenexpError(f"{where}{key}.{aspect}: not an aspect; the aspects are {', '.join(ASPECTS)}")
        if mark not in (*RATINGS, NOT_RATED):
            raise GenexpError(
                f"{where}{key}.{aspect}={mark!r}: not one of {', '.join((*RATINGS, NOT_RATED))}"
            )
    return {aspect: str(value.get(aspect, NOT_RATED)) for aspect in ASPECTS}


def _strings(value: Any, where: str, key: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise GenexpError(f"{where}{key}={value!r}: must be a list (of {', '.join(allowed)})")
    for item in value:
        if item not in allowed:
            raise GenexpError(f"{where}{key}: {item!r} is not one of {', '.join(allowed)}")
    return tuple(value)


def _flag(value: Any, where: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise GenexpError(f"{where}{key}={value!r}: must be true or false")
    return value


def _overrides(value: Any, where: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(o, str) and "=" in o for o in value):
        raise GenexpError(f"{where}{key}={value!r}: must be a list of key=value overrides")
    return tuple(value)


def _renamed(value: Any, where: str, key: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in value.items()
    ):
        raise GenexpError(f"{where}{key}={value!r}: must map each old config key to its new one")
    return dict(value)


def _selects(value: Any, where: str, key: str) -> dict[str, dict[str, Any]]:
    """``{sampler|solver: {model.<key>: <scalar>}}``: the model keys each option sets."""
    fix = "must map sampler/solver to {model.<key>: <value>}"
    if not isinstance(value, Mapping):
        raise GenexpError(f"{where}{key}={value!r}: {fix}")
    out = {}
    for option, keys in value.items():
        if option not in NODE_OPTIONS:
            raise GenexpError(f"{where}{key}.{option}: not one of {', '.join(NODE_OPTIONS)}")
        if not isinstance(keys, Mapping) or not all(
            isinstance(k, str) and k.startswith("model.") and isinstance(v, str | int | float | bool)
            for k, v in keys.items()
        ):
            raise GenexpError(f"{where}{key}.{option}={keys!r}: {fix}")
        out[option] = dict(keys)
    return out


def active_node(family: Family | None, model_node: Mapping) -> str | None:
    """``sampler`` or ``solver``: the node a built model samples with. A family that samples by
    either (its ``selects``) uses the option whose selected values the node holds; any other the
    first node it has (None: it has neither)."""
    present = [k for k in NODE_OPTIONS if model_node.get(k) is not None]
    if family is not None:
        for option in present:
            chosen = family.selects.get(option)
            if chosen and all(_value(model_node, k) == v for k, v in chosen.items()):
                return option
    return present[0] if present else None


def _value(model_node: Mapping, key: str) -> Any:
    """``model_node``'s value at the dotted ``model.<a>.<b>`` key (None where absent)."""
    node: Any = model_node
    for part in key.removeprefix("model.").split("."):
        if not isinstance(node, Mapping | DictConfig) or part not in node:
            return None
        node = node[part]
    return node
