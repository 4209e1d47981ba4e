"""The layering of DESIGN.md: the math packages are pure torch; the CLI imports no torch at top."""

from __future__ import annotations

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


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_import_no_lightning_hydra_omegaconf(package):
    modules = _modules(package)
    code = (
        "import sys\n"
        f"for m in {modules!r}: __import__(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"{package} pulls in {out}"


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
    assert found | {"genexp.configs"} == declared
