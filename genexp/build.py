"""The only place a config constructs anything: an explicit registry of configurable targets, the
family's model (with latent diffusion's first stage), and a training run's parts (module,
callbacks, logger, Trainer: :func:`build_run`).

A ``_target_`` is constructed only if its dotted name is registered here, exactly: the classes and
schedule functions that ``configs/`` names, ``torch.optim``'s optimizers, the Lightning classes genexp
uses and the Hydra plugins it launches with. A prefix allow-list (``genexp.``) is not a boundary: every
function defined in the package, one that starts a process or writes a file among them, would become
callable. The check runs before anything is called, on every route a config takes: the command line,
user config groups (``hydra.searchpath``), replayed overrides, Hydra's own callbacks/launchers/sweepers
and the configs stored in checkpoints, which are data (:func:`as_data`: never resolved).

A Python plugin that defines its own family registers it with :func:`register` before genexp builds
a run; nothing read from disk can register anything.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from genexp import checkpoints, families
from genexp.errors import ConfigError, GenexpError

# what configs/ names (tests/test_registry.py checks that both lists agree), one line per class
_GENEXP = """
genexp.data.image_folder.ImageFolder
genexp.data.mnist5k.MNIST5k
genexp.data.synthetic.Synthetic
genexp.data.torchvision_sets.CIFAR10
genexp.data.torchvision_sets.CelebA
genexp.data.torchvision_sets.FashionMNIST
genexp.data.torchvision_sets.MNIST
genexp.diffusion.fast_samplers.DPMSolverPPSampler
genexp.diffusion.fast_samplers.HeunSampler
genexp.diffusion.langevin.LangevinSampler
genexp.diffusion.noise_schedule.NoiseSchedule
genexp.diffusion.ode_solvers.Dopri5Solver
genexp.diffusion.ode_solvers.EulerSolver
genexp.diffusion.ode_solvers.HeunSolver
genexp.diffusion.ode_solvers.MidpointSolver
genexp.diffusion.ode_solvers.RK4Solver
genexp.diffusion.pc.PCSampler
genexp.diffusion.samplers.DDIMSampler
genexp.diffusion.samplers.DDPMSampler
genexp.diffusion.schedules.cosine
genexp.diffusion.schedules.linear
genexp.diffusion.schedules.quadratic
genexp.diffusion.schedules.sigmoid
genexp.diffusion.sde.SubVPSDE
genexp.diffusion.sde.VESDE
genexp.diffusion.sde.VPSDE
genexp.lit.callbacks.SampleGrid
genexp.lit.checkpointing.StepCheckpoint
genexp.lit.datamodule.DataModule
genexp.lit.divergence.DivergenceGuard
genexp.lit.ema.EMA
genexp.lit.fid_callback.FIDCallback
genexp.lit.loggers.CSVLogger
genexp.lit.performance.Performance
genexp.lr_schedulers.WarmupConstant
genexp.lr_schedulers.WarmupCosine
genexp.models.ae.AE
genexp.models.ddpm.DDPM
genexp.models.flow_matching.FlowMatching
genexp.models.gan.GAN
genexp.models.glow.Glow
genexp.models.ldm.LDM
genexp.models.ncsn.NCSN
genexp.models.pixel_transformer.PixelTransformer
genexp.models.pixelcnn.PixelCNN
genexp.models.realnvp.RealNVP
genexp.models.score_sde.ScoreSDE
genexp.models.vae.VAE
genexp.nets.time_mlp.TimeMLP
genexp.nets.unet.UNet
genexp.sweeps.SweepEnd
"""
# torch.optim's optimizers (a user picks any with optimizer._target_=torch.optim.<Name>)
_OPTIMIZERS = "Adadelta Adafactor Adagrad Adam Adamax AdamW ASGD NAdam RAdam RMSprop Rprop SGD"
_LIGHTNING = """
pytorch_lightning.Trainer
pytorch_lightning.callbacks.EarlyStopping
pytorch_lightning.callbacks.LearningRateMonitor
pytorch_lightning.callbacks.ModelCheckpoint
pytorch_lightning.loggers.CSVLogger
pytorch_lightning.loggers.TensorBoardLogger
pytorch_lightning.loggers.WandbLogger
pytorch_lightning.profilers.SimpleProfiler
"""
# Hydra instantiates these itself (hydra.launcher, hydra.sweeper) from the composed config. Searches
# (configs/hparams_search/) run genexp's sweeper with hydra-optuna-sweeper's options and its
# single-objective samplers (hydra/sweeper/sampler=tpe|random|grid|cmaes); the plugin's own sweeper
# class is not registered: its loop restarts job numbers on a rerun (one trial's run dir reused by another)
_HYDRA = """
hydra._internal.core_plugins.basic_launcher.BasicLauncher
hydra._internal.core_plugins.basic_sweeper.BasicSweeper
hydra_plugins.genexp_search.optuna_sweeper.OptunaSweeper
hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher
hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher
optuna.samplers.CmaEsSampler
optuna.samplers.GridSampler
optuna.samplers.RandomSampler
optuna.samplers.TPESampler
"""

REGISTRY: set[str] = {
    *_GENEXP.split(),
    *(f"torch.optim.{name}" for name in _OPTIMIZERS.split()),
    *_LIGHTNING.split(),
    *_HYDRA.split(),
}


def register(*targets: str) -> None:
    """Make dotted names constructible from configs (for Python plugins; configs cannot call it)."""
    for target in targets:
        if not isinstance(target, str) or "." not in target:
            raise ValueError(f"register: {target!r} is not a dotted name (package.module.Class)")
        REGISTRY.add(target)


def refusal(key: str, target: Any) -> GenexpError:
    """The one-line error for an unregistered ``_target_``, with the nearest registered name."""
    close = difflib.get_close_matches(str(target), sorted(REGISTRY), n=1, cutoff=0.8)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return GenexpError(
        f"{key}._target_={target}: not a configurable target{hint}; configs construct only the classes "
        "genexp registers (genexp.build.REGISTRY), so no other code runs from a config"
    )


def check_targets(node: Any, key: str) -> None:
    """Refuse any ``_target_`` anywhere inside ``node`` that is not registered, before anything runs.

    Reading every value also surfaces a ``???`` or a broken ``${...}`` here, before construction."""
    if isinstance(node, DictConfig | dict):
        target = node.get("_target_")
        if target is not None and (not isinstance(target, str) or target not in REGISTRY):
            raise refusal(key, target)
        for k, v in node.items():
            if k != "_target_":
                check_targets(v, f"{key}.{k}")
    elif isinstance(node, list | tuple | ListConfig):
        for i, v in enumerate(node):
            check_targets(v, f"{key}[{i}]")


def checked(node: Any, key: str) -> None:
    """:func:`check_targets`, with a ``???`` or a broken ``${...}`` met on the way as one line."""
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        check_targets(node, key)
    except MissingMandatoryValue as err:
        name = getattr(err, "full_key", None) or key
        raise GenexpError(f"{name}=???: a required value; pass {name}=<value>") from None
    except OmegaConfBaseException as err:
        first = str(err).strip().splitlines()[0]
        raise GenexpError(f"{getattr(err, 'full_key', None) or key}: {first}") from None


def check_config(cfg: DictConfig) -> None:
    """Every ``_target_`` of a whole run config, before any of it is built."""
    for key, node in cfg.items():
        if isinstance(node, DictConfig | ListConfig):
            checked(node, str(key))


FAMILY = "family"  # configs/model/<name>.yaml: the family's metadata node (label, ratings, sample options)


def instantiate(node: Any, key: str, **kwargs) -> Any:
    """``hydra.utils.instantiate`` of registered targets only, whose errors name the config key."""
    import hydra

    checked(node, key)
    if key == "model" and isinstance(node, DictConfig) and FAMILY in node:
        node = node.copy()  # the metadata node is read by genexp.families, never a constructor argument
        with open_dict(node):
            del node[FAMILY]
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except hydra.errors.InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, ConfigError):
            raise GenexpError(f"{key}.{cause.key}={cause.value!r}: {cause.message}") from None
        if isinstance(cause, GenexpError):
            raise cause from None
        lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
        # "Error loading 'x':" says what follows on the next line
        first = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines or [""])[0]
        first = first or type(cause).__name__
        raise GenexpError(f"{key}: {first}") from None


def _escape(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escape(v) for v in value]
    return value


def as_data(container: dict) -> DictConfig:
    """A config read back from disk (a checkpoint's stored config) as data: every string is kept
    literally, so a stored ``${oc.env:SECRET}`` stays that text and is never resolved."""
    if not isinstance(container, dict):
        raise TypeError(f"a stored config must be a mapping, not {type(container).__name__}")
    return OmegaConf.create(_escape(container))


def guard_hydra() -> None:
    """Check what Hydra itself instantiates from the composed config (``hydra.callbacks``,
    ``hydra.launcher``, ``hydra.sweeper``) against the registry too: a user config group can set
    those, and Hydra builds them before any genexp code runs."""
    import hydra.core.plugins as plugins
    import hydra.utils

    if getattr(hydra.utils.instantiate, "_genexp_guarded", False):
        return
    original = hydra.utils.instantiate

    def guarded(config: Any, *args: Any, **kwargs: Any) -> Any:
        key = _hydra_key(config)
        check_targets(config, key)
        target = kwargs.get("_target_")
        if isinstance(target, str) and target not in REGISTRY:
            raise refusal(key, target)
        return original(config, *args, **kwargs)

    guarded._genexp_guarded = True  # type: ignore[attr-defined]
    hydra.utils.instantiate = guarded
    plugins.instantiate = guarded


def _hydra_key(config: Any) -> str:
    try:
        return (config._get_full_key(None) or "hydra") if isinstance(config, DictConfig) else "hydra"
    except Exception:  # noqa: BLE001 - only the message's key
        return "hydra"


def registered(names: Iterable[str]) -> list[str]:
    """The names of ``names`` that are not registered (for tests and ``--help``)."""
    return [n for n in names if n not in REGISTRY]


def plain_config(cfg: DictConfig) -> dict:
    """The resolved config as plain containers (what checkpoints and loggers store)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def build_model(cfg: DictConfig) -> Any:
    """Instantiate ``cfg.model`` (see :func:`build_model_and_first_stage`)."""
    return build_model_and_first_stage(cfg)[0]


def build_model_and_first_stage(cfg: DictConfig) -> tuple[Any, dict | None]:
    """Instantiate ``cfg.model``, and return with it what rebuilds its first stage, if it has one.

    Latent diffusion's ``model.first_stage`` is either a trained AE/VAE's run dir or .ckpt (training:
    loaded with its weights through :func:`genexp.checkpoints.load_first_stage`) or, in a checkpoint
    of such a run, ``{source, config}``: the first stage's own stored config, rebuilt here without
    weights (the latent model's state dict holds them), so that checkpoint needs nothing else."""
    kwargs, record = {}, None
    first_stage = cfg.model.get("first_stage")
    if isinstance(first_stage, str):
        loaded = checkpoints.load_first_stage(first_stage)
        kwargs["first_stage"] = loaded.model
        record = {"source": str(loaded.path), "config": plain_config(loaded.config)}
        checkpoints.check_first_stage_fits(cfg, loaded.config, first_stage)
    elif isinstance(first_stage, DictConfig) and "config" in first_stage:
        kwargs["first_stage"] = first_stage_from_config(first_stage.config)
    elif first_stage is None and "first_stage" in cfg.model:
        raise GenexpError(
            "model.first_stage=null: latent diffusion needs a trained AE/VAE; pass "
            "model.first_stage=<run dir or .ckpt> (or use experiment=ldm_two_stage to train both)"
        )
    try:
        return instantiate(cfg.model, "model", **kwargs), record
    except GenexpError as err:
        # a nested part (net, schedule) reports only its own argument: rebuild the parts one by one
        # so the error names the full key (model.net.num_groups, not model.num_groups)
        for name, child in cfg.model.items():
            if isinstance(child, DictConfig) and "_target_" in child and not child.get("_partial_"):
                instantiate(child, f"model.{name}")
        raise err from None


def first_stage_from_config(stored: DictConfig) -> Any:
    """A first stage rebuilt from the config a latent-diffusion checkpoint stored (weights: none yet;
    the latent model's state dict fills them)."""
    if not isinstance(stored, DictConfig) or "model" not in stored:
        raise GenexpError("model.first_stage.config: the checkpoint's first stage config has no model")
    model = build_model(stored)
    checkpoints.check_first_stage_family(model, "<stored config>")
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- a training run's parts
# Lightning is imported inside these functions: every command imports this module (guard_hydra,
# the stored configs of checkpoints), and only training needs the Trainer.


class Run(NamedTuple):
    """What :func:`build_run` makes of a config: everything ``genexp train`` fits and tests."""

    trainer: Any  # pytorch_lightning.Trainer
    module: Any  # genexp.lit.module.GenerativeModule (or its adversarial subclass)
    datamodule: Any
    model: Any  # the family's nn.Module
    dataset: Any
    logger: Any  # a Lightning logger, or False


def build_run(cfg: DictConfig, output_dir: Path, wandb_id: str | None, extra_callbacks=()) -> Run:
    """Build the run ``cfg`` describes, in the order its parts depend on each other.

    Args:
        wandb_id: the wandb run a resumed run continues (from its checkpoint), or None.
        extra_callbacks: the command's own callbacks (its throughput meter), after the configured ones.
    """
    from genexp.lit.performance import Performance

    # speed options (configs/performance/): the Trainer's precision, the optimizer's kernels, device
    # data here; channels_last and compile as its callback hooks, in every process
    performance = instantiate(cfg.performance, "performance") if cfg.get("performance") else Performance()
    trainer = cfg.trainer
    family = families.of_model_config(cfg.model)
    precision = performance.trainer_precision(
        trainer.get("precision"),
        trainer.get("accelerator", "auto"),
        trainer.get("strategy", "auto"),
        cpu_bf16=bool(family and family.cpu_bf16),
    )
    dataset = instantiate(cfg.dataset, "dataset")
    datamodule = instantiate(cfg.data, "data", dataset=dataset, device_data=performance.device_data)
    model, first_stage = build_model_and_first_stage(cfg)
    config = plain_config(cfg)
    if first_stage is not None:  # the checkpoint rebuilds its first stage without the original run
        config["model"]["first_stage"] = first_stage
    module, divergence = build_module(cfg, model, config, performance, precision)
    callbacks, preemption = build_callbacks(cfg, performance, divergence, extra_callbacks)
    logger = build_logger(cfg, output_dir, wandb_id)
    if logger:
        logger.log_hyperparams(config)
        if is_wandb(logger):
            module.wandb_id = getattr(logger, "version", None)
    return Run(
        build_trainer(cfg, callbacks, logger, precision, preemption),
        module,
        datamodule,
        model,
        dataset,
        logger,
    )


def build_module(
    cfg: DictConfig, model: Any, config: dict, performance: Any, precision: Any
) -> tuple[Any, Any]:
    """The LightningModule that trains ``model``: its optimizer (dry-built, so a bad setting fails
    now, not after the first epoch), LR schedule, divergence guard (returned too: it is also a
    callback) and the family's recipe (the config's ``module:`` node)."""
    import torch

    from genexp.lit.divergence import DivergenceGuard
    from genexp.lit.gan_module import module_for
    from genexp.lit.performance import clips_under_amp

    recipe = plain_config(cfg.module) if cfg.get("module") else None
    clipped_amp = clips_under_amp(
        precision, cfg.trainer.get("gradient_clip_val"), (recipe or {}).get("clip_grad_norm")
    )
    optimizer = performance.optimizer(instantiate(cfg.optimizer, "optimizer"), clipped_amp)
    try:
        optimizer([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise GenexpError(f"optimizer: {err}") from None
    scheduler = instantiate(cfg.lr_scheduler, "lr_scheduler") if cfg.get("lr_scheduler") else None
    divergence = instantiate(cfg.divergence, "divergence") if cfg.get("divergence") else DivergenceGuard()
    module = module_for(
        model, recipe, optimizer=optimizer, scheduler=scheduler, config=config, divergence=divergence
    )
    return module, divergence


def build_callbacks(
    cfg: DictConfig, performance: Any, divergence: Any, extra: Iterable = ()
) -> tuple[list, bool]:
    """The Trainer's callbacks in the order their hooks must run, and whether genexp handles SLURM's
    preemption (the step checkpoint's ``preemption``)."""
    from genexp.lit.resume_position import ResumePosition
    from genexp.lit.rng_state import RNGState

    configured = [
        instantiate(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items() if node
    ]
    step_checkpoint = instantiate(cfg.checkpoint, "checkpoint") if cfg.get("checkpoint") else None
    callbacks = [
        # exact resume (docs/reliability.md): the random streams' hooks run before any other draws
        RNGState(test_seed=int(cfg.seed)),
        performance,  # its setup converts the model before an EMA copies it
        *configured,
        *extra,
        ResumePosition(),  # a run stopped by max_steps/max_time resumes its epoch
        divergence,
        *([step_checkpoint] if step_checkpoint else []),  # saves after the EMA has taken the step
    ]
    bar = progress_bar(cfg)
    return callbacks + ([bar] if bar else []), bool(step_checkpoint and step_checkpoint.preemption)


def progress_bar(cfg: DictConfig) -> Any:
    """A Rich bar in a terminal, plain epoch lines otherwise (None); ``trainer.enable_progress_bar``
    decides where it is set."""
    import sys

    from pytorch_lightning.callbacks import RichProgressBar

    shown = cfg.trainer.get("enable_progress_bar")
    if not (sys.stdout.isatty() if shown is None else bool(shown)):
        return None
    # redrawing every batch costs ~5 ms a step on CPU; every few batches reads the same
    return RichProgressBar(refresh_rate=max(1, min(10, int(cfg.trainer.get("log_every_n_steps") or 1))))


def build_trainer(cfg: DictConfig, callbacks: list, logger: Any, precision: Any, preemption: bool) -> Any:
    """``cfg.trainer`` with genexp's callbacks, logger and checkpoint IO."""
    import pytorch_lightning as pl

    from genexp.lit.checkpoint_io import AtomicCheckpointIO
    from genexp.lit.preemption import slurm_plugins

    return instantiate(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=logger,
        enable_progress_bar=any(isinstance(cb, pl.callbacks.ProgressBar) for cb in callbacks),
        # callbacks=none means no checkpoints, not Lightning's default ones
        enable_checkpointing=any(isinstance(cb, pl.callbacks.ModelCheckpoint) for cb in callbacks),
        # atomic, finite-only checkpoint writes; under SLURM genexp, not Lightning, handles preemption
        plugins=[AtomicCheckpointIO(), *slurm_plugins(preemption)],
        precision=precision,
    )


WANDB_LOGGER = "pytorch_lightning.loggers.WandbLogger"


def build_logger(cfg: DictConfig, output_dir: Path, wandb_id: str | None) -> Any:
    """``cfg.logger`` (False: none); a wandb logger never prompts, resumes ``wandb_id``'s run and, in a
    ``-m`` sweep, joins the sweep's group."""
    from genexp.lit.loggers import prepare_wandb_kwargs
    from genexp.sweeps import wandb_sweep_kwargs

    node = cfg.get("logger")
    if not node:
        return False
    kwargs = {}
    if str(node.get("_target_", "")) == WANDB_LOGGER:
        # a sweep's jobs: group=<sweep id>, job_type=<model option>, a tag per override (genexp.sweeps)
        kwargs = prepare_wandb_kwargs(wandb_sweep_kwargs(node), wandb_id)
    return instantiate(node, "logger", **kwargs)


def is_wandb(logger: Any) -> bool:
    from pytorch_lightning.loggers import WandbLogger

    return isinstance(logger, WandbLogger)
