"""The layering of DESIGN.md: the math packages are pure torch; the CLI imports no torch at top."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PURE = [
    "genexp.models",
    "genexp.nets",
    "genexp.flows",
    "genexp.metrics",
    "genexp.data",
    "genexp.diffusion",
    "genexp.lr_schedulers",
    "genexp.errors",
    "genexp.resume",
    "genexp.checks",
    "genexp.layout",
    "genexp.atomic",
]
FORBIDDEN = ("pytorch_lightning", "lightning", "hydra", "omegaconf")
PACKAGE = Path(__file__).resolve().parents[1] / "genexp"


def _modules(package: str) -> list[str]:
    path = PACKAGE.parent / package.replace(".", "/")
    if path.with_suffix(".py").is_file():
        return [package]
    return [package + "." + p.stem if p.stem != "__init__" else package for p in sorted(path.glob("*.py"))]


# one interpreter imports the packages one after another and stops at the first that loads a forbidden
# module; what the earlier ones loaded was clean, so each package's own import is judged (a fresh
# interpreter after each offender): one torch start instead of one per package
_PROBE = """
import json, sys
for package, modules in {packages!r}:
    for m in modules:
        __import__(m)
    bad = sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r})
    if bad:
        print(json.dumps([package, bad]))
        break
"""


def test_pure_packages_import_no_lightning_hydra_omegaconf():
    todo = [(package, _modules(package)) for package in PURE]
    offenders = []
    while todo:
        code = _PROBE.format(packages=todo, forbidden=FORBIDDEN)
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        if not out:
            break
        package, bad = json.loads(out)
        offenders.append(f"{package} pulls in {', '.join(sorted({m.split('.')[0] for m in bad}))}")
        todo = todo[[p for p, _ in todo].index(package) + 1 :]
    assert not offenders, "\n".join(offenders)


def test_cli_imports_no_torch_at_module_top():
    code = "import sys, genexp.cli; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "False"


def test_every_subpackage_is_declared_for_installation():
    """pyproject lists packages explicitly (configs/ is mapped in): a new folder must be added."""
    tomllib = pytest.importorskip("tomllib")

    declared = set(
        tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {"genexp"} | {"genexp." + p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    # Hydra plugins live in its hydra_plugins namespace: hydra_plugins/genexp_search (the search sweeper)
    plugins = {
        "hydra_plugins." + p.parent.name for p in (PACKAGE.parent / "hydra_plugins").glob("*/__init__.py")
    }
    assert plugins and found | plugins | {"genexp.configs"} == declared
