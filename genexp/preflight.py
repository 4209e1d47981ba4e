"""Checks of a composed config that must fail before anything is built, trained or written: values
whose error would otherwise surface late (after an epoch, at the first checkpoint, in the test
bound) or as a library's traceback. Each raises :class:`GenexpError` with one line naming the key
and a fix that applies.

The type checks read the annotations of the constructor each ``_target_`` names (YAML keys are
constructor argument names), so a new config group is checked without an entry here.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from genexp.errors import ConfigError, GenexpError
from genexp.hydra_compat import child, is_interpolation, is_null, raw_value

INT64_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1  # numpy's seed range, which Lightning's seed_everything enforces
# the nodes every ``genexp train`` needs; ``~model`` on the command line deletes one
REQUIRED = ("model", "dataset", "data", "optimizer", "trainer", "paths")
# keys the runner interprets itself before the constructor sees them, and checks there:
# genexp.build.build_model_and_first_stage loads model.first_stage (a run dir or a stored config);
# genexp.lit.performance picks trainer.precision (auto included) for the hardware
RUNNER_BUILT = ("model.first_stage", "trainer.precision")


def check(cfg: DictConfig, values: dict | None = None) -> None:
    """Every preflight check of a ``genexp train`` config (``genexp.validate.validate`` calls this).

    ``values``: the resolved config, if :func:`interpolations` has already made it."""
    values = interpolations(cfg) if values is None else values
    try:
        integers_in_range(values)
        optimizer_arguments(values)
        arguments_fit_their_constructors(cfg, values)
        trainer_ranges(values.get("trainer") or {})
    except ConfigError as err:
        raise GenexpError(str(err)) from None
    model_fits_the_data(values)
    family_node(values)
    pairwise_metrics_have_pairs(values)
    from genexp.data.base import check_cache_dir

    check_cache_dir(
        (values.get("paths") or {}).get("cache_dir")
    )  # a file there: one line now, not at first use
    dry_build(cfg)


def interpolations(cfg: DictConfig) -> dict:
    """The nodes a run needs are there and every interpolation resolves: the resolved config.

    Pure OmegaConf (nothing is imported or built), so it can run before any other check reads a
    value: a key that refers to itself fails here with its fix, not in the first reader."""
    required_nodes(cfg)
    return resolved(cfg)


def required_nodes(cfg: DictConfig) -> None:
    for key in REQUIRED:
        if key not in cfg or is_null(child(cfg, key)):
            raise GenexpError(
                f"{key}: missing from the config (deleted with ~{key}?); genexp train needs it: "
                f"drop ~{key}, or pick one with {key}=<option> (genexp train --help lists them)"
            )


def _raw(cfg: DictConfig, key: str) -> Any:
    """The value of ``key`` as written (an interpolation stays a string), or None."""
    try:
        return raw_value(cfg, key)
    except Exception:  # noqa: BLE001 - only used to quote the value in a message
        return None


def resolved(cfg: DictConfig) -> dict:
    """The config with every interpolation resolved, as plain containers; a broken interpolation
    (one that refers to itself, a missing key or environment variable) fails naming its key."""
    values = {}
    for name in cfg:
        try:
            values[name] = _resolved_node(cfg, str(name))
        except _NoHydra:
            continue  # composed without Hydra's runtime (a test): that node is checked where built
        except OmegaConfBaseException as err:
            _interpolation_error(cfg, err)
    return values


class _NoHydra(Exception):
    pass


def _resolved_node(cfg: DictConfig, name: str) -> Any:
    try:
        value = OmegaConf.select(cfg, name, throw_on_missing=False)
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        if "HydraConfig was not set" in str(err):
            raise _NoHydra from None
        raise
    return value


def _interpolation_error(cfg: DictConfig, err: OmegaConfBaseException) -> None:
    """One line for an interpolation that does not resolve: the key, its text and the fix."""
    key = getattr(err, "full_key", None) or "config"
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    raw = _raw(cfg, key)
    shown = f"{key}={raw}" if isinstance(raw, str) else key
    if "Recursive interpolation" in first:
        raise GenexpError(
            f"{shown}: the interpolation refers to itself; pass {key}=<a value> or an interpolation "
            "of another key"
        ) from None
    raise GenexpError(f"{shown}: {first}; fix the interpolation or pass {key}=<a value>") from None


def _model_last(node: Any) -> list:
    """Keys with ``model`` last: its sizes interpolate the dataset's (``${dataset.image_size}``),
    so a bad ``dataset.image_size`` is reported under the key the user set."""
    return sorted(node.keys(), key=lambda k: k == "model")


def _walk(value: Any, key: str):
    """(key, value) of every leaf of a plain container; list items as ``key[i]``."""
    if isinstance(value, dict):
        for k in _model_last(value):
            v = value[k]
            yield from _walk(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{key}[{i}]")
    else:
        yield key, value


def integers_in_range(values: dict) -> None:
    """Seeds in numpy's 32-bit range, every other integer in int64 (torch's), floats finite."""
    for key, value in _walk(values, ""):
        name = key.rsplit(".", 1)[-1]
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and (name == "seed" or name.endswith("_seed")):
            if value < 0:
                raise ConfigError(key, value, "must be >= 0")
            if value > SEED_MAX:
                raise ConfigError(
                    key, value, f"must be <= {SEED_MAX} (seeds are 32-bit); pick a smaller seed"
                )
        elif isinstance(value, int) and abs(value) > INT64_MAX:
            raise ConfigError(
                key, value, "is past the 64-bit integer range torch and numpy use; use a smaller value"
            )
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, value, "must be a finite number")


# ------------------------------------------------------------------ types from the constructors

_KIND_NAMES = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "list": "a list",
    "dict": "a mapping",
    "none": "null",
}


def _kinds(hint: Any) -> tuple[set[str], list, list]:
    """What a YAML value may be for ``hint``: kinds, Literal choices, and the element hints of a
    list/tuple (a tuple's as a fixed-length list). A class YAML cannot produce adds ``other``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return {"any"}, [], []
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        kinds, choices, items = set(), [], []
        for arg in args:
            k, c, i = _kinds(arg)
            kinds |= k
            choices += c
            items = items or i
        return kinds, choices, items
    if origin is typing.Literal:
        return {"literal"}, list(args), []
    if hint is type(None):
        return {"none"}, [], []
    simple = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict", tuple: "list"}
    if hint in simple:
        return {simple[hint]}, [], []
    if origin in (list, tuple) or (origin is not None and getattr(origin, "__name__", "") == "Sequence"):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return {"list"}, [], list(args)  # fixed length
        return {"list"}, [], [args[0]] if args else []
    if origin is dict or getattr(hint, "__name__", "") in ("PathLike", "Path"):
        return ({"dict"} if origin is dict else {"str"}), [], []
    return {"other"}, [], []


def _problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` cannot be an argument annotated ``hint`` (None: it can, or we cannot tell)."""
    kinds, choices, items = _kinds(hint)
    if kinds == {"other"} and isinstance(value, str | int | float | list) and not isinstance(value, bool):
        # an object (a schedule, a sampler, a network) that a YAML scalar cannot be
        return "must be a config node with a _target_, not a value; drop the override to keep the default"
    if "any" in kinds or kinds <= {"other"}:
        return None
    if value is None:
        return None if "none" in kinds or "other" in kinds else "must not be null"
    ok = (
        (isinstance(value, bool) and "bool" in kinds)
        or (isinstance(value, int) and not isinstance(value, bool) and kinds & {"int", "float"})
        or (isinstance(value, float) and "float" in kinds)
        or (isinstance(value, str) and ("str" in kinds or value in choices))
        or (isinstance(value, list) and "list" in kinds)
        or (isinstance(value, dict) and "dict" in kinds)
        or (value in choices and type(value) in {type(c) for c in choices})
    )
    if isinstance(value, str) and ok and value == "" and "none" not in kinds:
        return "must not be empty"
    if ok and isinstance(value, list) and items:
        if len(items) > 1 and len(value) != len(items):
            return f"must be a list of {len(items)} values"
        for i, item in enumerate(value):
            hint = items[i] if len(items) > 1 else items[0]
            if _problem(item, hint):
                return f"must be a list whose items are each {_describe(*_kinds(hint)[:2])}"
    if ok:
        return None
    if choices:
        shown = [("true" if c else "false") if isinstance(c, bool) else str(c) for c in choices]
        shown += [n for k, n in (("bool", "true"), ("bool", "false"), ("none", "null")) if k in kinds]
        return f"must be one of {', '.join(dict.fromkeys(shown))}"
    return f"must be {_describe(kinds, choices)}"


def _describe(kinds: set[str], choices: list) -> str:
    if "float" in kinds:
        kinds = kinds - {"int"}
    names = [_KIND_NAMES[k] for k in _KIND_NAMES if k in kinds and k != "none"]
    return " or ".join(names) or "of another type"


def _hints(target: str) -> dict[str, Any]:
    """The constructor annotations of ``target`` (empty where they cannot be read)."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
        fn = obj.__init__ if inspect.isclass(obj) else obj
        hints = typing.get_type_hints(fn)
        params = inspect.signature(fn).parameters
    except Exception:  # noqa: BLE001 - unknown target: instantiate reports it with its key
        return {}
    return {name: hints.get(name, inspect.Parameter.empty) for name in params}


def arguments_fit_their_constructors(cfg: DictConfig, values: dict) -> None:
    """Each value of a ``_target_`` node against its constructor's annotation."""
    from genexp.build import check_targets

    def visit(node: DictConfig, plain: Any, key: str) -> None:
        if not isinstance(plain, dict):
            return  # not resolved here (see resolved)
        if "_target_" in node:
            check_targets(node, key)  # nothing is imported for a target configs may not name
            hints = _hints(str(plain["_target_"]))
            for name, value in plain.items():
                if (
                    name.startswith("_")
                    or name not in hints
                    or f"{key}.{name}" in RUNNER_BUILT
                    or _is_built(node, name, value)
                ):
                    continue
                problem = _problem(value, hints[name])
                if problem:
                    raise ConfigError(f"{key}.{name}", value, problem)
        for name in _model_last(node):
            sub = child(node, name)
            if isinstance(sub, DictConfig) and not is_interpolation(sub) and not is_null(sub):
                visit(sub, plain.get(name), f"{key}.{name}" if key else str(name))

    visit(cfg, values, "")


def _is_built(node: DictConfig, name: str, value: Any) -> bool:
    """A value that is itself a config node (another ``_target_``, or one that points at one)."""
    return (isinstance(value, dict) and "_target_" in value) or bool(
        is_interpolation(child(node, name)) and isinstance(value, dict)
    )


# ------------------------------------------------------------------ ranges the libraries check late


def _at_least(key: str, value: Any, minimum: float, extra: str = "") -> None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value < minimum:
        raise ConfigError(key, value, f"must be >= {minimum}{extra}")


def trainer_ranges(trainer: dict) -> None:
    """Lightning's own checks name no config key, and some only run once fit has started."""
    for name, minimum in (
        ("min_epochs", 0),
        ("check_val_every_n_epoch", 1),
        ("log_every_n_steps", 1),
        ("num_sanity_val_steps", -1),
        ("num_nodes", 1),
        ("gradient_clip_val", 0),
    ):
        _at_least(f"trainer.{name}", trainer.get(name), minimum)
    for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = trainer.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value < 0 or (isinstance(value, float) and value > 1):
                raise ConfigError(
                    f"trainer.{name}", value, "must be a fraction in [0.0, 1.0] or a number of batches >= 0"
                )
    for name in ("default_root_dir", "max_time"):
        if trainer.get(name) == "":
            raise ConfigError(f"trainer.{name}", "", "must not be empty; drop the override (or null)")
    devices = trainer.get("devices")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices < 1 and devices != -1:
        raise ConfigError("trainer.devices", devices, "must be >= 1, -1 (every device) or auto")
    if isinstance(devices, str) and not re.fullmatch(r"auto|-1|\d+|(\d+,)+\d*", devices.strip()):
        raise ConfigError(
            "trainer.devices", devices, "must be a number of devices, a list of indices or auto"
        )
    if trainer.get("accelerator") == "cpu" and isinstance(devices, list):
        raise ConfigError(
            "trainer.devices", devices, "with accelerator=cpu, must be a number of processes >= 1"
        )
    _choice(trainer, "accelerator", _accelerators())
    _choice(trainer, "strategy", _strategies())


def _choice(trainer: dict, name: str, choices: list[str]) -> None:
    value = trainer.get(name)
    if isinstance(value, str) and choices and value not in choices:
        raise ConfigError(f"trainer.{name}", value, f"must be one of {', '.join(choices)}")


def _accelerators() -> list[str]:
    from pytorch_lightning.accelerators import AcceleratorRegistry

    return ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]


def _strategies() -> list[str]:
    from pytorch_lightning.strategies import StrategyRegistry

    return ["auto", *sorted(StrategyRegistry.available_strategies())]


def family_node(values: dict) -> None:
    """The model's ``family:`` metadata (read by report, compare and sample) is data: a bad
    override of it is refused now, in one line, not ignored."""
    from genexp.families import FIELDS, NODE, parse

    node = (values.get("model") or {}).get(NODE)
    if isinstance(node, dict):
        parse("", node, where="")
    elif node is not None:
        raise GenexpError(f"model.{NODE}={node!r}: must be a mapping with the fields {', '.join(FIELDS)}")


def optimizer_arguments(values: dict) -> None:
    """``optimizer.*`` and each network's extra arguments under ``module.optimizers.<network>`` (a
    recipe such as the GAN's; checked against the optimizer's constructor: they are passed to it)."""
    optimizer = values.get("optimizer") or {}
    _optimizer_ranges(optimizer, "optimizer")
    hints = _hints(str(optimizer.get("_target_", "")))
    for name, node in ((values.get("module") or {}).get("optimizers") or {}).items():
        if isinstance(node, dict):
            key = f"module.optimizers.{name}"
            _optimizer_ranges(node, key)
            for arg, value in node.items():
                problem = _problem(value, hints[arg]) if arg in hints else None
                if problem:
                    raise ConfigError(f"{key}.{arg}", value, problem)


def _optimizer_ranges(args: dict, key: str) -> None:
    betas = args.get("betas")
    if isinstance(betas, list) and (
        len(betas) != 2
        or not all(isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    ):
        raise ConfigError(f"{key}.betas", betas, "must be 2 numbers in [0, 1), e.g. [0.9, 0.999]")
    lr = args.get("lr")
    if isinstance(lr, int | float) and not isinstance(lr, bool) and not lr > 0:
        raise ConfigError(f"{key}.lr", lr, "must be > 0")
    for name in ("weight_decay", "eps", "momentum", "dampening"):
        _at_least(f"{key}.{name}", args.get(name), 0)
    momentum = args.get("momentum")
    if args.get("nesterov") is True and isinstance(momentum, int | float) and momentum <= 0:
        raise ConfigError(
            f"{key}.momentum",
            momentum,
            f"nesterov needs momentum > 0; set {key}.momentum=0.9 or {key}.nesterov=false",
        )


# ------------------------------------------------------------------ the data, the metric, partials


def model_fits_the_data(values: dict) -> None:
    """``model.image_size`` / ``model.channels`` follow the dataset's; an override that differs
    would only fail in the first forward pass (a matmul shape error)."""
    model, dataset = values.get("model") or {}, values.get("dataset") or {}
    for name, what in (("image_size", "{} px images"), ("channels", "{}-channel images")):
        mine, theirs = model.get(name), dataset.get(name)
        if name in model and name in dataset and mine != theirs:
            raise GenexpError(
                f"model.{name}={mine}: the dataset has {what.format(theirs)} (dataset.{name}={theirs}); "
                f"drop the override (model.{name} follows dataset.{name}) or set dataset.{name}={mine}"
            )


def pairwise_metrics_have_pairs(values: dict) -> None:
    """A monitored metric that compares images within a validation batch is never logged with one
    image per batch: the first checkpoint then fails after a whole epoch."""
    batch_size = (values.get("data") or {}).get("batch_size")
    if batch_size != 1:
        return
    pairwise = pairwise_metrics(values)
    for name, node in (values.get("callbacks") or {}).items():
        metric = node.get("monitor") if isinstance(node, dict) else None
        if metric in pairwise:
            raise GenexpError(
                f"data.batch_size=1: callbacks.{name}.monitor={metric} compares images within a validation "
                "batch, so it needs data.batch_size >= 2; use data.batch_size=2 or more"
            )


def pairwise_metrics(values: dict) -> set[str]:
    """The validation metrics the model's family computes from pairs of images within one batch, as
    logged (``val/<name>``): its class's ``pairwise_logs`` (e.g. a GAN's diversity and energy
    distance), none where the class declares none or cannot be imported (instantiate says why)."""
    target = str((values.get("model") or {}).get("_target_", ""))
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return set()
    return {f"val/{log}" for log in getattr(cls, "pairwise_logs", ())}


def dry_build(cfg: DictConfig) -> None:
    """Build the small parts a run builds late (the LR schedule is made in fit) or under another
    key (the noise schedule as ``model.schedule``), so their errors name the key the user set."""
    import torch

    from genexp.build import instantiate

    if _has_target(cfg, "schedule"):
        instantiate(cfg.schedule, "schedule")
    if _has_target(cfg, "lr_scheduler"):
        make = instantiate(cfg.lr_scheduler, "lr_scheduler")
        try:
            make(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
        except ConfigError as err:
            raise GenexpError(f"lr_scheduler.{err.key}={err.value!r}: {err.message}") from None


def _has_target(cfg: DictConfig, key: str) -> bool:
    node = cfg.get(key)
    return isinstance(node, DictConfig) and "_target_" in node
