"""The patches behind ``GENEXP_FAULT_*`` (see ``tests/faults/__init__.py``), applied to genexp's
classes after their modules are imported, so a process without these variables runs untouched."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import time
from typing import Any


class SlowFile:
    """A file whose first write pauses half-way (a kill lands inside the write)."""

    def __init__(self, file, seconds: float):
        self._file, self._seconds, self._paused = file, seconds, False

    def write(self, data) -> int:
        if self._paused or len(data) < 2:
            return self._file.write(data)
        half = len(data) // 2
        written = self._file.write(memoryview(data)[:half])
        self._file.flush()
        time.sleep(self._seconds)
        self._paused = True
        return written + self._file.write(memoryview(data)[half:])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def _job_num() -> int | None:
    """The Hydra job number of this process's run (a sweep's job), None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return int(HydraConfig.get().job.num) if HydraConfig.initialized() else None


def pause(phase: str, seconds: float) -> None:
    job = os.environ.get("GENEXP_FAULT_PAUSE_JOB")
    if job is not None and _job_num() != int(job):  # a sweep: pause in that job only
        return
    logging.getLogger("genexp").warning("fault injection: pausing in %s", phase)
    time.sleep(seconds)


def slow_writes(module, seconds: float) -> None:
    """``genexp.lit.checkpoint_io``: every checkpoint write pauses half-way."""
    serialize = module.AtomicCheckpointIO.serialize

    def slow_serialize(self, checkpoint, file) -> None:
        serialize(self, checkpoint, SlowFile(file, seconds))

    module.AtomicCheckpointIO.serialize = slow_serialize


def slow_steps(module, seconds: float) -> None:
    """``genexp.lit.checkpointing``: every training step starts late."""
    start = module.StepCheckpoint.on_train_batch_start

    def slow_start(self, *args, **kwargs) -> None:
        start(self, *args, **kwargs)
        time.sleep(seconds)

    module.StepCheckpoint.on_train_batch_start = slow_start


def pause_in_loops(module, phase: str, seconds: float) -> None:
    """``genexp.lit.checkpointing``: pause in the first batch of a fit's validation or of the test."""
    from pytorch_lightning.trainer.states import TrainerFn

    if phase == "validation":

        def on_validation_batch_start(self, trainer, *args, **kwargs) -> None:
            if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
                pause(phase, seconds)

        module.StepCheckpoint.on_validation_batch_start = on_validation_batch_start
    elif phase == "test":
        module.StepCheckpoint.on_test_batch_start = lambda self, *args, **kwargs: pause(phase, seconds)


def pause_in_sample_grid(module, seconds: float) -> None:
    """``genexp.lit.callbacks``: pause before the sample grid's PNG is written."""
    save_png = module.save_png

    def paused_save_png(images, path, nrow: int) -> None:
        if path.name.endswith("_samples.png"):
            pause("sample_grid", seconds)
        save_png(images, path, nrow)

    module.save_png = paused_save_png


def patches(env) -> dict[str, list]:
    """Module name -> the patches that ``env``'s ``GENEXP_FAULT_*`` variables ask for."""
    found: dict[str, list] = {}
    if env.get("GENEXP_FAULT_SLOW_WRITE"):
        seconds = float(env["GENEXP_FAULT_SLOW_WRITE"])
        found.setdefault("genexp.lit.checkpoint_io", []).append(lambda m: slow_writes(m, seconds))
    if env.get("GENEXP_FAULT_SLOW_STEP"):
        seconds = float(env["GENEXP_FAULT_SLOW_STEP"])
        found.setdefault("genexp.lit.checkpointing", []).append(lambda m: slow_steps(m, seconds))
    if env.get("GENEXP_FAULT_PAUSE"):
        phase, _, text = env["GENEXP_FAULT_PAUSE"].partition(":")
        seconds = float(text or 60)
        if phase == "sample_grid":
            found.setdefault("genexp.lit.callbacks", []).append(lambda m: pause_in_sample_grid(m, seconds))
        else:
            found.setdefault("genexp.lit.checkpointing", []).append(
                lambda m: pause_in_loops(m, phase, seconds)
            )
    return found


class PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs the patches of a module right after the module is executed."""

    def __init__(self, todo: dict[str, list]):
        self.todo = todo

    def find_spec(self, name, path, target=None):
        if name not in self.todo:
            return None
        sys.meta_path.remove(self)  # find the module the ordinary way
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module, fixes = spec.loader.exec_module, self.todo.pop(name)

        def exec_and_patch(module) -> None:
            exec_module(module)
            for fix in fixes:
                fix(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install_from_environ(env=None) -> None:
    """Patch now what is imported already, and the rest as it is imported."""
    todo = patches(os.environ if env is None else env)
    for name in [n for n in todo if n in sys.modules]:
        for fix in todo.pop(name):
            fix(sys.modules[name])
    if todo:
        sys.meta_path.insert(0, PatchAfterImport(todo))
