"""Find the checkpoint behind ``ckpt_path=<ckpt|run dir|latest>`` and replay its run's overrides.

Pure Python (no torch): the console entry point uses it before Hydra composes the config, so a
resumed run recomposes the same config, writes into the same run directory, and takes any new
overrides on top (``genexp train ckpt_path=<run dir> trainer.max_epochs=50``).
"""

from __future__ import annotations

import re
from pathlib import Path

from genexp.errors import GenexpError

SEARCH_ROOTS = ("outputs", "multirun")
_SAFE = re.compile(r"^[A-Za-z0-9_./:\-]+$")


def resolve_checkpoint(value: str, roots: tuple[str, ...] = SEARCH_ROOTS) -> Path:
    """``latest`` | a run dir | a checkpoints dir | a .ckpt file -> an existing checkpoint file."""
    if value == "latest":
        found = [p for root in roots for p in Path(root).glob("**/checkpoints/last.ckpt")]
        if not found:
            raise GenexpError(
                f"ckpt_path=latest: no checkpoints/last.ckpt under {' or '.join(r + '/' for r in roots)} "
                f"in {Path.cwd()}; pass a run dir or a .ckpt file"
            )
        return max(found, key=lambda p: p.stat().st_mtime).resolve()
    path = Path(value).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate.resolve()
        raise GenexpError(
            f"ckpt_path={value}: no checkpoints/last.ckpt in that folder; pass a run dir or a .ckpt file"
        )
    if not path.is_file():
        raise GenexpError(f"ckpt_path={value}: no such file or folder")
    return path.resolve()


def run_dir_of(ckpt: Path) -> Path | None:
    """The run directory that holds ``ckpt`` (``<run>/checkpoints/x.ckpt``), if it is one."""
    parent = ckpt.parent
    if parent.name == "checkpoints" and (parent.parent / ".hydra" / "overrides.yaml").is_file():
        return parent.parent
    return None


def override_key(override: str) -> str:
    """``+model.x=1`` -> ``model.x``; ``~foo`` -> ``foo``."""
    return override.lstrip("+~").split("=", 1)[0]


def quote(value: str) -> str:
    return value if _SAFE.match(value) else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_argv(args: list[str]) -> list[str]:
    """Rewrite ``train`` arguments that carry ``ckpt_path=...`` (single runs only).

    The checkpoint becomes an absolute file; if it lives in a run directory, that run's original
    overrides come first (new ones replace them key by key) and the run writes into that directory.
    """
    if any(a in ("-m", "--multirun") for a in args):
        return args
    given = [a for a in args if override_key(a) == "ckpt_path" and "=" in a]
    if not given:
        return args
    value = given[-1].split("=", 1)[1].strip("'\"")
    if value in ("", "null", "None"):
        return args
    ckpt = resolve_checkpoint(value)
    rest = [a for a in args if override_key(a) != "ckpt_path"]
    out = [f"ckpt_path={quote(str(ckpt))}"]
    run_dir = run_dir_of(ckpt)
    if run_dir is None:
        return rest + out
    import yaml

    original = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    new_keys = {override_key(a) for a in rest if "=" in a}
    replay = [
        o
        for o in original
        if override_key(o) not in new_keys
        and override_key(o) != "ckpt_path"
        and not override_key(o).startswith("hydra.")
    ]
    return replay + rest + out + [f"hydra.run.dir={quote(str(run_dir))}"]


def requeue_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a restarted job (a requeued SLURM job, a torchrun restart) resumes from.

    Such a job recomputes the same run dir (``genexp.rundir``) with the same arguments; it continues
    from the newest checkpoint there: ``checkpoints/last.ckpt`` or Lightning's ``hpc_ckpt_<n>.ckpt``
    (written at SLURM's pre-emption signal when Lightning handles the requeue). None for a first
    run, so a run never resumes by accident from a directory it did not write.
    """
    from genexp.rundir import is_restart

    if not is_restart():
        return None
    found = [
        p for p in (run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()
    ]
    return max(found, key=lambda p: p.stat().st_mtime).resolve() if found else None
