"""Logger set-up: wandb never prompts or hangs (offline without a login or a network)."""

from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("genexp")

WANDB_HOST = "api.wandb.ai"


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        return path.is_file() and netrc.netrc(str(path)).authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode() -> str:
    """``online`` only with a login and a reachable server; ``WANDB_MODE`` in the env wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if not _has_wandb_key():
        return "offline"
    base = os.environ.get("WANDB_BASE_URL") or f"https://{WANDB_HOST}"
    url = urlsplit(base if "://" in base else f"https://{base}")
    try:
        port = url.port or (80 if url.scheme == "http" else 443)  # a local server's own port, not 443
    except ValueError:  # a port out of range: no server to reach
        return "offline"
    return "online" if _reachable(url.hostname or WANDB_HOST, port) else "offline"


def prepare_wandb_kwargs(kwargs: dict, run_id: str | None) -> dict:
    """Fill in the mode and the run id (reused on resume) for ``WandbLogger``."""
    kwargs = dict(kwargs)
    mode = wandb_mode()
    kwargs["offline"] = mode == "offline"
    if mode == "disabled":
        kwargs["mode"] = "disabled"
    if run_id:
        kwargs["id"] = run_id
        kwargs["resume"] = "allow"
    kwargs.setdefault("settings", None)
    if kwargs["settings"] is None:
        import wandb

        # no prompts, no console capture of the Rich progress bar, quiet start
        kwargs["settings"] = wandb.Settings(silent=True, console="off")
    return kwargs


def finish_wandb(logger) -> None:
    """Close the wandb run (needed between multirun jobs) and say how to upload an offline run."""
    import wandb

    run = wandb.run
    if run is None:
        return
    offline = getattr(run.settings, "mode", "") == "offline" or getattr(run.settings, "_offline", False)
    run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
    wandb.finish()
    if offline and run_dir is not None:
        log.info("wandb: offline run saved; upload it with: wandb sync %s", run_dir)


def _appending_csv_logger():
    """Lightning's CSVLogger deletes an existing metrics.csv; on resume we append to it instead."""
    import csv

    from pytorch_lightning.loggers import CSVLogger as _CSVLogger
    from pytorch_lightning.loggers.csv_logs import ExperimentWriter

    class _AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if self._fs.isfile(self.metrics_file_path):  # keep the earlier rows and their columns
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = list(next(csv.reader(f), []))

    class CSVLogger(_CSVLogger):
        """``metrics.csv`` under the run dir; a resumed run appends to it (Lightning's would delete it)."""

        @property
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = _AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return CSVLogger


CSVLogger = _appending_csv_logger()
