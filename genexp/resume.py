"""Find the checkpoint behind ``ckpt_path=<ckpt|run dir|latest>`` and replay its run's overrides.

Pure Python (no torch): the console entry point uses it before Hydra composes the config, so a
resumed run recomposes the same config, writes into the same run directory, and takes any new
overrides on top (``genexp train ckpt_path=<run dir> trainer.max_epochs=50``).
"""

from __future__ import annotations

import re
from pathlib import Path

from genexp.errors import GenexpError
from genexp.layout import CHECKPOINTS, LAST_CKPT, config_yaml, overrides_yaml
from genexp.rundir import SEARCH_ROOTS, is_restart, newest_run, run_dir_of

_SAFE = re.compile(r"^[A-Za-z0-9_./:\-]+$")


def resolve_checkpoint(
    value: str, roots: tuple[str, ...] = SEARCH_ROOTS, names: tuple[str, ...] = (LAST_CKPT,)
) -> Path:
    """``latest`` | a run dir | a checkpoints dir | a .ckpt file -> an existing checkpoint file.

    In a folder, the first of ``names`` found there: resuming continues from ``last.ckpt`` (the
    newest training state); :func:`genexp.checkpoints.weights_of` asks for the run's weights."""
    if value == "latest":
        return latest_checkpoint(roots, names)
    path = Path(value).expanduser()
    if path.is_dir():
        for folder in (path / CHECKPOINTS, path):
            for name in names:
                if (folder / name).is_file():
                    return (folder / name).resolve()
        raise GenexpError(
            f"ckpt_path={value}: no checkpoints/last.ckpt in that folder; pass a run dir or a .ckpt file"
        )
    if not path.is_file():
        raise GenexpError(f"ckpt_path={value}: no such file or folder")
    return path.resolve()


def latest_checkpoint(roots: tuple[str, ...] = SEARCH_ROOTS, names: tuple[str, ...] = (LAST_CKPT,)) -> Path:
    """``ckpt_path=latest``: the newest run dir (the one started or resumed last), and the first of
    ``names`` in its ``checkpoints/``. A newest run that has none (killed before its first
    checkpoint) is an error that says so: silently taking an older run's checkpoint would resume
    the wrong run."""
    newest = newest_run(roots)
    if newest is None:
        raise GenexpError(
            f"ckpt_path=latest: no checkpoints/last.ckpt under {' or '.join(r + '/' for r in roots)} "
            f"in {Path.cwd()} (no runs there yet); pass a run dir or a .ckpt file"
        )
    found = [newest / CHECKPOINTS / name for name in names if (newest / CHECKPOINTS / name).is_file()]
    if not found:
        raise GenexpError(
            f"ckpt_path=latest: the newest run, {newest}, has no checkpoints/last.ckpt (it stopped before its "
            "first checkpoint); start it again, or pass an older run's dir as ckpt_path=<run dir>"
        )
    return found[0].resolve()


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
    if run_dir is None or not overrides_yaml(run_dir).is_file():  # a checkpoint outside a Hydra run dir
        return rest + out

    original = replayed_overrides(run_dir)
    new_keys = {override_key(a) for a in rest if "=" in a}
    replay = [
        o
        for o in original
        if override_key(o) not in new_keys
        and override_key(o) != "ckpt_path"
        and not override_key(o).startswith("hydra.")
    ]
    return replay + rest + out + [f"hydra.run.dir={quote(str(run_dir))}"]


_RESOLVER = re.compile(r"\$\{\s*[A-Za-z_][\w.]*\s*:")


def replayed_overrides(run_dir: Path) -> list[str]:
    """A run dir's ``.hydra/overrides.yaml``, read as data to replay on resume: a list of strings,
    none calling a resolver (``${oc.env:...}`` would read the environment into the run). Whatever
    ``_target_`` they set is checked against the registry when the run is built, like any config."""
    import yaml

    path = overrides_yaml(run_dir)
    try:
        original = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError) as err:
        raise GenexpError(
            f"ckpt_path={run_dir}: cannot read {path} ({type(err).__name__}); pass the .ckpt file instead"
        ) from None
    if not isinstance(original, list) or not all(isinstance(o, str) for o in original):
        raise GenexpError(
            f"ckpt_path={run_dir}: {path} is not a list of overrides; pass the .ckpt file instead"
        )
    for o in original:
        if _RESOLVER.search(o):
            raise GenexpError(
                f"ckpt_path={run_dir}: {path} holds {o!r}, which calls a resolver; a replayed override is data, "
                "so remove that line (or pass the .ckpt file and your own overrides)"
            )
    renames = _renamed_keys(run_dir)
    return [renamed_key(o, renames) for o in original]


def _renamed_keys(run_dir: Path) -> dict[str, str]:
    """The keys the run's family has renamed since (its ``family.renamed``), found from the run's
    stored config (read as data); none where the family is unknown."""
    import yaml

    from genexp.families import of_model_config

    try:
        stored = yaml.safe_load(config_yaml(run_dir).read_text()) or {}
        family = of_model_config(stored.get("model") or {})
    except (OSError, yaml.YAMLError, AttributeError, GenexpError):
        return {}
    return dict(family.renamed) if family else {}


def renamed_key(override: str, renames: dict[str, str]) -> str:
    """``model.d_optimizer.lr=4e-4`` -> ``module.optimizers.discriminator.lr=4e-4`` under the rename
    ``model.d_optimizer -> module.optimizers.discriminator``; ``+``/``~`` prefixes are kept."""
    key = override_key(override)
    for old, new in renames.items():
        if key == old or key.startswith(old + "."):
            start = override.index(key)
            return override[:start] + new + override[start + len(old) :]
    return override


def requeue_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a restarted job (a requeued SLURM job, a torchrun restart) resumes from.

    Such a job recomputes the same run dir (``genexp.rundir``) with the same arguments; it continues
    from the newest checkpoint there: ``checkpoints/last.ckpt`` or Lightning's ``hpc_ckpt_<n>.ckpt``
    (written at SLURM's pre-emption signal when Lightning handles the requeue). None for a first
    run, so a run never resumes by accident from a directory it did not write.
    """
    if not is_restart():
        return None
    found = [p for p in (run_dir / CHECKPOINTS / LAST_CKPT, *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime).resolve() if found else None
