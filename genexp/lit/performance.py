"""Speed options of a run (``performance/`` config group): precision, ``torch.compile``,
channels_last, fused/foreach optimizers, float32 matmul precision and device-resident data.

One object applied in three places by ``run.py``: :meth:`Performance.trainer_precision` picks the
Trainer's precision, :meth:`Performance.optimizer` wraps the optimizer factory, and as a Lightning
callback it sets the matmul precision and channels_last (``setup``) and compiles the family's
networks (``on_fit_start``) in every process, DDP ranks included. ``device_data`` is read by the
DataModule (:mod:`genexp.lit.device_data`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import nn

from genexp.checks import check_bool
from genexp.errors import ConfigError, GenexpError, check_choice
from genexp.lit.compat import cpu_has_amx, fused_devices

log = logging.getLogger("genexp")

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for_loop")
MATMUL_PRECISIONS = ("highest", "high", "medium")


def normalize_precision(key: str, value) -> str:
    """``32`` -> ``32-true``, ``bf16`` -> ``bf16-mixed``, ...; anything else outside PRECISIONS is refused."""
    text = PRECISION_ALIASES.get(str(value), str(value))
    if text not in PRECISIONS:
        raise ConfigError(key, value, f"must be one of {', '.join(PRECISIONS)}")
    return text


def cuda_has_bf16() -> bool:
    """A CUDA GPU that runs bf16 natively (Ampere or later; emulated bf16 is slower than float32)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def networks(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The trained networks of a family: the outermost submodules that define ``forward`` and hold
    trainable parameters (UNet, encoder, G, D, a flow). Containers such as a diffusion process are
    searched inside; frozen parts (latent diffusion's first stage, a GAN's EMA copy of G) are left out."""
    found = []
    for name, child in module.named_children():
        if not any(p.requires_grad for p in child.parameters()):
            continue
        if type(child).forward is nn.Module.forward:  # no forward of its own: look inside
            found += networks(child, f"{prefix}{name}.")
        else:
            found.append((f"{prefix}{name}", child))
    return found


def optimizer_class(factory: Callable) -> type | None:
    """The optimizer class behind a ``_partial_`` (``functools.partial``) or the class itself."""
    target = getattr(factory, "func", factory)
    return target if isinstance(target, type) else None


def clips_under_amp(precision: str, gradient_clip_val, clip_grad_norm: float | None = None) -> bool:
    """Whether the run clips gradients under Lightning's mixed precision, which refuses to clip a
    fused optimizer's gradients (a fused step unscales them itself, after the clipping point).
    ``clip_grad_norm``: a module's own clipping under manual optimization (the GAN's
    ``module.clip_grad_norm``)."""
    clips = bool(gradient_clip_val) or clip_grad_norm is not None
    return str(precision).endswith("-mixed") and clips


def impl_kwargs(cls: type | None, impl: str, device: torch.device, clipped_amp: bool = False) -> dict:
    """The ``fused``/``foreach`` arguments for ``cls`` on ``device``. ``auto``: fused on CUDA when
    the optimizer has a fused kernel (and ``clipped_amp`` is false: see :func:`clips_under_amp`),
    else torch's own default (foreach on CUDA, a loop on CPU, so CPU runs keep their numbers)."""
    name = cls.__name__ if cls is not None else "the optimizer"
    accepts = set(inspect.signature(cls).parameters) if cls is not None else set()
    if impl == "auto":
        fused = device.type == "cuda" and "fused" in accepts and not clipped_amp
        return {"fused": True} if fused else {}
    if impl == "fused":
        if clipped_amp:
            raise GenexpError(
                "performance.optimizer_impl=fused: Lightning's mixed precision cannot clip the "
                "gradients of a fused optimizer; use performance.optimizer_impl=foreach or auto, "
                "or no gradient clipping"
            )
        if "fused" not in accepts:
            raise GenexpError(
                f"performance.optimizer_impl=fused: {name} has no fused implementation; "
                "use performance.optimizer_impl=foreach or auto"
            )
        if device.type not in fused_devices():
            raise GenexpError(
                f"performance.optimizer_impl=fused: no fused {name} on {device.type}; "
                "use performance.optimizer_impl=auto"
            )
        return {"fused": True}
    if "foreach" not in accepts:
        raise GenexpError(
            f"performance.optimizer_impl={impl}: {name} takes no foreach argument; "
            "use performance.optimizer_impl=auto"
        )
    return {"foreach": impl == "foreach"}


class ImplOptimizer:
    """``factory(params, **kwargs)`` plus the implementation ``impl`` chosen for the parameters'
    device, which is only known when the module calls it (``configure_optimizers``, after the
    model moved to its device). A class, not a closure, so ``ddp_spawn`` can pickle it."""

    def __init__(self, factory: Callable, impl: str, clipped_amp: bool = False):
        self.factory = factory
        self.impl = impl
        self.clipped_amp = clipped_amp

    def __call__(self, params, **kwargs) -> torch.optim.Optimizer:
        params = list(params)
        tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        device = tensors[0].device if tensors else torch.device("cpu")
        extra = impl_kwargs(optimizer_class(self.factory), self.impl, device, self.clipped_amp)
        try:
            return self.factory(params, **{**kwargs, **extra})
        except RuntimeError as err:  # e.g. a fused kernel that exists on CPU only
            if not extra:
                raise
            first = str(err).strip().splitlines()[0]
            raise GenexpError(
                f"performance.optimizer_impl={self.impl}: {first[:200]}; use performance.optimizer_impl=auto"
            ) from None


class Performance(pl.Callback):
    """Speed options; every one leaves the math and the checkpoints' format unchanged.

    Args:
        precision: the Trainer's precision; ``auto`` is bf16-mixed on a CUDA GPU with native bf16
            and on a CPU with AMX for the families whose ``family.cpu_bf16`` is true, else 32-true. An explicit ``trainer.precision`` wins over ``auto`` (a recipe that needs
            float32 sets it) and must agree with any other value.
        compile: ``nn.Module.compile()`` each network of the family in place, so state_dict keys
            stay the same and checkpoints load without compiling.
        compile_mode: ``torch.compile``'s ``mode``.
        channels_last: convert 4-D weights to NHWC; convolutions then run NHWC (other nets are
            unaffected).
        optimizer_impl: ``auto`` | ``fused`` | ``foreach`` | ``for_loop`` (see :func:`impl_kwargs`).
        matmul_precision: ``torch.set_float32_matmul_precision`` (``high`` allows TF32).
        device_data: hold each split on the training device and slice batches there
            (:class:`genexp.lit.device_data.DeviceLoader`); data.num_workers and pin_memory are unused.
    """

    def __init__(
        self,
        precision: str | int = "auto",
        compile: bool = False,
        compile_mode: str = "default",
        channels_last: bool = False,
        optimizer_impl: str = "auto",
        matmul_precision: str = "highest",
        device_data: bool = False,
    ):
        self.precision = normalize_precision("precision", precision)
        self.compile = check_bool("compile", compile)
        self.compile_mode = check_choice("compile_mode", compile_mode, COMPILE_MODES)
        self.channels_last = check_bool("channels_last", channels_last)
        self.optimizer_impl = check_choice("optimizer_impl", optimizer_impl, OPTIMIZER_IMPLS)
        self.matmul_precision = check_choice("matmul_precision", matmul_precision, MATMUL_PRECISIONS)
        self.device_data = check_bool("device_data", device_data)
        self.compiled: list[str] = []

    # ---------------------------------------------------------------- before the Trainer exists
    def trainer_precision(
        self, trainer_precision=None, accelerator="auto", strategy="auto", cpu_bf16: bool = False
    ) -> str:
        """The precision to give the Trainer (``trainer.precision`` and ``trainer.accelerator`` as
        configured). ``cpu_bf16``: the family's ``family.cpu_bf16`` (its loss curve in bf16-mixed
        matches fp32's and bf16 pays on the CPU: ``scripts/bench_precision.py``); ``auto`` on a CPU
        with native bf16 matrix units (AMX) then picks bf16-mixed."""
        if trainer_precision is not None:
            try:
                explicit = normalize_precision("trainer.precision", trainer_precision)
            except ConfigError as err:
                raise GenexpError(str(err)) from None
            if self.precision in ("auto", explicit):
                return explicit
            raise GenexpError(
                f"trainer.precision={trainer_precision} conflicts with performance.precision="
                f"{self.precision}; set only performance.precision"
            )
        if self.precision != "auto":
            return self.precision
        on_cpu = str(accelerator) not in ("auto", "gpu", "cuda")
        if on_cpu or (str(accelerator) == "auto" and not torch.cuda.is_available()):
            return "bf16-mixed" if cpu_bf16 and cpu_has_amx() else "32-true"
        if "fork" in str(strategy) or "notebook" in str(strategy):
            # probing the GPU initialises CUDA, after which these strategies cannot fork
            raise GenexpError(
                f"performance.precision=auto: trainer.strategy={strategy} cannot fork after the GPU "
                "is probed; set performance.precision=bf16-mixed or 32-true"
            )
        return "bf16-mixed" if cuda_has_bf16() else "32-true"

    def optimizer(self, factory: Callable, clipped_amp: bool = False) -> Callable:
        """``factory`` with the fused/foreach implementation of ``optimizer_impl``
        (``clipped_amp``: :func:`clips_under_amp` of the run)."""
        return ImplOptimizer(factory, self.optimizer_impl, clipped_amp)

    # ---------------------------------------------------------------- Lightning hooks, every process
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.set_float32_matmul_precision(self.matmul_precision)
        if self.channels_last:  # before DDP wraps the model and callbacks (EMA) copy it
            pl_module.to(memory_format=torch.channels_last)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after every setup hook: copies of the model (EMA) stay eager, a compiled one would not
        # be copied anyway (nn.Module drops its compiled call when copied or pickled)
        if self.compile and not self.compiled:
            for name, net in networks(pl_module.model):
                net.compile(mode=None if self.compile_mode == "default" else self.compile_mode)
                self.compiled.append(name)
        if trainer.is_global_zero:
            log.info(
                "performance: precision %s, matmul %s, optimizer %s, channels_last %s, compiled %s, "
                "device data %s",
                trainer.precision,
                self.matmul_precision,
                self.optimizer_impl,
                self.channels_last,
                ", ".join(self.compiled) or "nothing",
                self.device_data,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed optimizer state brings back the fused/foreach flags it was saved with (torch's
        # load_state_dict restores whole param groups): this run's setting and device win
        own_clip = getattr(pl_module, "clip_grad_norm", None)
        clipped_amp = clips_under_amp(trainer.precision, trainer.gradient_clip_val, own_clip)
        for opt in trainer.optimizers:
            tensors = [p for group in opt.param_groups for p in group["params"]]
            if not tensors:
                continue
            flags = {k: None for k in ("fused", "foreach") if k in opt.defaults}
            flags.update(impl_kwargs(type(opt), self.optimizer_impl, tensors[0].device, clipped_amp))
            for group in (opt.defaults, *opt.param_groups):
                group.update(flags)
