"""What the ``bench_*.py`` scripts share: composing a run, timing its steps, peak memory, the table.

Every script prints one markdown table row per case, ending in the device and the torch version, and
writes the same rows to ``--json PATH``. Training cases run the real ``genexp.commands.train.train`` with
``genexp.commands.train.Throughput`` swapped for :class:`StepTimes`, a subclass that also keeps the time of every
training step, so warm-up steps can be left out and the wait for data measured.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

import genexp.commands.train
from genexp import families
from genexp.lit.callbacks import Throughput

# a short run: no logger, no validation or test, no checkpoints or sample grids (an EMA stays)
QUIET_RUN = [
    "logger=none",
    "trainer.limit_val_batches=0",
    "trainer.limit_test_batches=0",
    "trainer.max_epochs=-1",
    "trainer.enable_progress_bar=false",
    "~callbacks.model_checkpoint",
    "~callbacks.sample_grid",
]

# --tiny (smoke runs): each family's tiny networks (configs/model/<name>.yaml model.family.tiny, as
# the test suite's) on tiny synthetic data
TINY_DATA = ["dataset=synthetic", "dataset.num_images=200"]
TINY_MODEL: dict[str, list[str]] = {name: list(families.get(name).tiny) for name in families.names()}


def quiet() -> None:
    """Keep Lightning's per-run banners ("GPU available: ...") and known warnings out of the table."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "genexp"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|max_epochs=-1|LeafSpec).*")
    genexp.commands.train.quiet_third_party()


def compose(overrides: list[str]):
    """The composed ``train.yaml`` with ``overrides`` (what ``genexp train ...`` would run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="genexp.configs", version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


def has_config_group(group: str) -> bool:
    """Whether the installed config tree has ``group/`` (e.g. ``performance``, added by a later change)."""
    import genexp.configs

    return (Path(genexp.configs.__file__).parent / group).is_dir()


def device_label(device: torch.device | str) -> str:
    """``cuda (NVIDIA H100 80GB HBM3)`` or ``cpu (2 threads)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def torch_label() -> str:
    return f"torch {torch.__version__}"


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a worker process started in another directory: relative
    ``PYTHONPATH`` entries (``PYTHONPATH=.`` with genexp not installed) made absolute."""
    env = {**os.environ, **extra}
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(
            str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep)
        )
    return env


class StepTimes(Throughput):
    """``Throughput`` that also keeps, for every training step, its duration and the part of it spent
    before ``on_train_batch_start``: fetching the batch, moving it to the device, and the loop's
    bookkeeping between steps (the wait for data, an upper bound on the data pipeline's share).

    A step runs from the previous batch end (or the epoch start) to this batch end, as in
    ``Throughput``. On CUDA each batch end synchronises, so a step's time is the device's time too.

    Args:
        stop: ``(warmup, steps, seconds)``: stop training once at least ``steps`` steps after the
            first ``warmup`` have run and they took at least ``seconds`` (fast steps run longer, so
            their rate is not a handful of milliseconds; slow ones stop at ``steps``). The run needs
            ``trainer.min_epochs=0``, or Lightning finishes the first epoch anyway. One process only:
            under DDP every rank would have to stop at the same step.
    """

    def __init__(self, stop: tuple[int, int, float] | None = None):
        super().__init__()
        self.stop = stop
        self.steps: list[float] = []  # seconds per step
        self.waits: list[float] = []  # seconds from the step's start to on_train_batch_start
        self.step_images: list[int] = []  # images per step over all ranks
        self._mark: float | None = None
        self._batch_start = 0.0
        self._cuda = False
        self.profiled: dict[str, list[float]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._cuda = pl_module.device.type == "cuda"
        self._mark = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._cuda:
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        if self._mark is not None:
            self.steps.append(now - self._mark)
            self.waits.append(self._batch_start - self._mark)
            self.step_images.append(batch[0].shape[0] * trainer.world_size)
        self._mark = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.stop is not None:
            warmup, steps, seconds = self.stop
            if len(self.steps) - warmup >= steps and sum(self.steps[warmup:]) >= seconds:
                trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        # a SimpleProfiler's per-call durations (trainer.profiler=...), kept before its teardown
        self.profiled = {k: list(v) for k, v in getattr(trainer.profiler, "recorded_durations", {}).items()}

    def img_per_sec_after(self, warmup: int) -> float:
        """Images per second over the steps after the first ``warmup``."""
        seconds = sum(self.steps[warmup:])
        return sum(self.step_images[warmup:]) / seconds if seconds else float("nan")

    def wait_share_after(self, warmup: int) -> float:
        """The share of step time spent before ``on_train_batch_start``, after ``warmup`` steps."""
        seconds = sum(self.steps[warmup:])
        return sum(self.waits[warmup:]) / seconds if seconds else float("nan")


@dataclass
class PeakMemory:
    """Peak memory of a block of work, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, not the caching allocator's reserve),
    after ``reset_peak_memory_stats``. CPU: the growth of the process's peak resident set size
    (``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``) over its resident
    size when the block starts; memory freed by earlier cases but kept by the allocator lowers it.
    """

    device: torch.device
    mib: float = float("nan")
    kind: str = ""
    _base: int = field(default=0, repr=False)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
        else:
            gc.collect()
            trim_malloc()
            self._base = _proc_status_kib("VmRSS")
            try:  # "5" resets the peak RSS (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
                self.kind = "peak RSS growth (VmHWM)"
            except OSError:
                self.kind = "peak RSS growth (VmHWM, not reset: includes earlier cases)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mib = max(0, _proc_status_kib("VmHWM") - self._base) / 1024


def _proc_status_kib(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def trim_malloc() -> None:
    """Hand freed heap pages back to the OS (glibc), so the next case's RSS baseline is honest."""
    if platform.system() == "Linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


@contextlib.contextmanager
def step_timers(
    stop: tuple[int, int, float] | None = None, timer: type[StepTimes] = StepTimes
) -> Iterator[list[StepTimes]]:
    """Inside the block every training run ``genexp.commands.train`` builds (``train(cfg)``, or the CLI's
    ``genexp train`` run in this process) times its steps with a ``timer(stop)`` in place of
    ``Throughput``; yields the list of them, one per run (a two-stage run: the first stage's first)."""
    seen: list[StepTimes] = []

    def make() -> StepTimes:
        seen.append(timer(stop))
        return seen[-1]

    with mock.patch.object(genexp.commands.train, "Throughput", make):
        yield seen


def train_timed(cfg, stop: tuple[int, int, float] | None = None) -> tuple[StepTimes, dict]:
    """``genexp.commands.train.train(cfg)`` with a :class:`StepTimes` (``stop``: its early stop) in place of
    ``Throughput``."""
    with step_timers(stop) as seen:
        metrics = genexp.commands.train.train(cfg)
    return seen[0], metrics


class Table:
    """A markdown table printed row by row (so a slow case shows progress) and kept for ``--json``."""

    def __init__(self, columns: list[tuple[str, ...]]):
        """``columns``: ``(key, header)`` or ``(key, header, format)`` (e.g. ``"{:.1%}"``); a row is a
        dict with those keys; floats default to 4 significant digits."""
        self.columns = [(c[0], c[1], c[2] if len(c) > 2 else None) for c in columns]
        self.rows: list[dict] = []
        print("| " + " | ".join(h for _, h, _ in self.columns) + " |")
        print("|" + "---|" * len(self.columns), flush=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print("| " + " | ".join(_cell(row.get(k), f) for k, _, f in self.columns) + " |", flush=True)


def _cell(value, fmt: str | None = None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != value:  # nan
            return "n/a"
        if fmt:
            return fmt.format(value)
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def error_line(output: str, returncode: int | None = None) -> str:
    """The one line that says why a worker process failed: genexp's own (``genexp: error: ...``, or how
    a signal stopped it), else a traceback's last line, else the last line written (300 characters)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("genexp: ")]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b.*", line)]
    found = ours or raised or lines
    line = found[-1] if found else f"exit code {returncode}"
    # HYDRA_FULL_ERROR=1 (CI sets it) shows genexp's error as a traceback: its last line is the same message
    return re.sub(r"^genexp\.errors\.\w+: ", "genexp: error: ", line)[:300]


def write_json(path: str | os.PathLike | None, payload: dict, say: bool = True) -> None:
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        if say:
            print(f"wrote {path}")
