"""Fault injection for tests, kept out of genexp's own code.

A test that starts a ``genexp`` process with ``GENEXP_FAULT_*`` variables passes
:func:`environ` as its environment: it puts this folder on ``PYTHONPATH``, so the child's
``sitecustomize`` (here) patches genexp's checkpoint writer, step checkpoint and sample grid as
they are imported (:mod:`faults.genexp_faults`):

- ``GENEXP_FAULT_SLOW_WRITE=<s>``: every checkpoint write pauses s seconds half-way (a kill lands
  inside the write);
- ``GENEXP_FAULT_SLOW_STEP=<s>``: every training step starts s seconds late;
- ``GENEXP_FAULT_PAUSE=<phase>[:<s>]``: the process logs ``fault injection: pausing in <phase>``
  and sleeps (60 s by default) in the first batch of a fit's validation (``validation``), of the
  test (``test``), or before writing a sample grid (``sample_grid``), so a test can signal it there;
  with ``GENEXP_FAULT_PAUSE_JOB=<n>`` only in job n of a ``-m`` sweep (``hydra.job.num``).
"""

from __future__ import annotations

import os
from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def environ(base: dict | None = None, **variables: str) -> dict[str, str]:
    """``base`` (default ``os.environ``) with this folder first on ``PYTHONPATH`` and ``variables``."""
    env = dict(os.environ if base is None else base)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{FOLDER}{os.pathsep}{path}" if path else str(FOLDER)
    return {**env, **variables}
