"""The layers of docs/architecture.md, read from the source: no import cycle in genexp/, the
Lightning-free and Hydra-free modules stay so, commands never import each other, and functions stay
short enough to read at once (outside nets/, which hold the papers' architectures)."""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "genexp"
ROOT = PACKAGE.parent

# the Lightning and Hydra distributions, by top-level module name
LIGHTNING_HYDRA = ("lightning", "pytorch_lightning", "lightning_fabric", "hydra")
# modules a user imports without paying for Lightning or Hydra (reading a checkpoint, sampling, a report)
LIGHT = ["genexp.checkpoints", "genexp.commands.sample", "genexp.commands.report"]
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, top_level: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements; with ``top_level`` only those that run when the module is imported (module
    and class bodies, under ``if``/``try``/``with``), not those in functions (deferred on purpose) or
    under ``if TYPE_CHECKING:`` (never run)."""
    if not top_level:
        yield from (n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom))
        return
    todo = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules (genexp's or others') that an import statement in ``module`` loads by name:
    ``from genexp.x import y`` means ``genexp.x.y`` when y is a submodule, else ``genexp.x``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the module's own package upwards
        package = module if _is_package(module) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    names = [a.name for a in node.names if f"{base}.{a.name}" not in MODULES]
    return [*submodules, *([base] if names or not submodules else [])]


def _resolve(name: str) -> str | None:
    """The genexp module that ``import name`` executes last (``genexp.a.b.C`` -> ``genexp.a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@functools.cache
def _parse(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))


def _graph(top_level: bool = True) -> dict[str, dict[str, int]]:
    """module -> {imported genexp module: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for module in MODULES:
        edges: dict[str, int] = {}
        for node in _imports(_parse(module), top_level):
            for target in _targets(module, node):
                resolved = _resolve(target) if target.split(".")[0] == "genexp" else None
                if resolved and resolved != module:
                    edges.setdefault(resolved, node.lineno)
        graph[module] = edges
    return graph


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in component and w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a component of size > 1 has one


def _describe(graph: dict[str, dict[str, int]], path: list[str]) -> str:
    return " -> ".join(f"{a} ({_where(a, graph[a][b])})" for a, b in zip(path, path[1:])) + f" -> {path[-1]}"


def test_the_import_graph_has_no_cycle():
    """A cycle makes the import order matter and drags a whole stack into a small import (the one
    between run.py and checkpoints.py loaded Lightning for reading a checkpoint)."""
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles in genexp/ (module-level imports):\n" + "\n".join(
        _describe(graph, c) for c in cycles
    )


def _external_imports(module: str) -> dict[str, int]:
    """Top-level distributions a module imports at its top -> the line."""
    found: dict[str, int] = {}
    for node in _imports(_parse(module), top_level=True):
        if isinstance(node, ast.ImportFrom) and node.level:
            continue
        for target in _targets(module, node):
            found.setdefault(target.split(".")[0], node.lineno)
    return found


def _chain_to_forbidden(module: str) -> str:
    """Where ``module`` reaches Lightning or Hydra through module-level imports (a shortest chain)."""
    graph = _graph()
    parents: dict[str, str | None] = {module: None}
    frontier = [module]
    while frontier:
        nxt = []
        for v in frontier:
            hits = {d: line for d, line in _external_imports(v).items() if d in LIGHTNING_HYDRA}
            if hits:
                chain = [v]
                while parents[chain[-1]] is not None:
                    chain.append(parents[chain[-1]])
                chain.reverse()
                steps = [f"{a} ({_where(a, graph[a][b])})" for a, b in zip(chain, chain[1:])]
                last = ", ".join(f"{d} at {_where(v, line)}" for d, line in sorted(hits.items()))
                return " -> ".join([*steps, f"{v} imports {last}"])
            for w in sorted(graph[v]):
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return "no module-level chain found in genexp/ (a third-party import brings it in)"


# imports the modules one after another in a fresh interpreter and stops at the first that loads
# Lightning or Hydra: each module's own import is judged, since what the earlier ones loaded was clean
_PROBE = """
import json, sys
forbidden = {forbidden!r}
for module in {modules!r}:
    __import__(module)
    bad = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
    if bad:
        print(json.dumps({{"module": module, "loaded": bad}}))
        break
"""


def test_checkpoints_sample_and_report_import_no_lightning_or_hydra():
    """Reading a checkpoint, sampling and building a report must not pay Lightning's and Hydra's
    import (~5 s): they import them inside the functions that need them, if at all."""
    failures = []
    todo = list(LIGHT)
    while todo:  # one interpreter when all are clean; a fresh one after each offender
        code = _PROBE.format(forbidden=LIGHTNING_HYDRA, modules=todo)
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout.strip()
        if not out:
            break
        found = json.loads(out.splitlines()[-1])
        roots = sorted({m.split(".")[0] for m in found["loaded"]})
        failures.append(f"{found['module']} loads {', '.join(roots)}: {_chain_to_forbidden(found['module'])}")
        todo = todo[todo.index(found["module"]) + 1 :]
    assert not failures, "\n".join(failures)


def test_commands_never_import_each_other():
    """Commands share code through the layers below them (build, checkpoints, checks, metrics), so
    one command can change without breaking another; imports inside functions count too."""
    commands = {m for m in MODULES if m.startswith("genexp.commands.")}
    graph = _graph(top_level=False)
    offenders = [
        f"{_where(module, line)}: {module} imports {target}"
        for module in sorted(commands)
        for target, line in sorted(graph[module].items())
        if target in commands
    ]
    assert not offenders, "commands import each other:\n" + "\n".join(offenders)


def _long_functions() -> Iterator[tuple[str, int, int, str]]:
    for module, path in MODULES.items():
        if module.startswith("genexp.nets"):
            continue
        for node in ast.walk(_parse(module)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    yield str(path.relative_to(ROOT)), node.lineno, length, node.name


def test_no_function_outside_nets_is_longer_than_60_lines():
    """STYLE.md: functions short enough to read at once (def line to last line, docstring included)."""
    offenders = sorted(_long_functions())
    assert not offenders, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(
        f"{file}:{line} {name}: {length} lines" for file, line, length, name in offenders
    )


_READS = {
    "import": ("import genexp.lit.module\n", {"genexp.lit.module"}),
    "from-package-submodule": ("from genexp.lit import module\n", {"genexp.lit.module"}),
    "from-module-name": ("from genexp.lit.module import GenerativeModule\n", {"genexp.lit.module"}),
    "two-submodules": ("from genexp import errors, layout\n", {"genexp.errors", "genexp.layout"}),
    "relative": ("from . import sample\n", {"genexp.commands.sample"}),
    "relative-parent": ("from ..errors import GenexpError\n", {"genexp.errors"}),
    "in-function": ("def f():\n    import genexp.build\n", set()),
    "type-checking": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import genexp.build\n",
        set(),
    ),
    "under-try": ("try:\n    import genexp.build\nexcept ImportError:\n    pass\n", {"genexp.build"}),
}


@pytest.mark.parametrize(("source", "expected"), _READS.values(), ids=_READS.keys())
def test_the_import_reader_resolves_what_python_imports(source, expected):
    """The graph above is only as good as its reading of import statements (seen from a command)."""
    module = "genexp.commands.train"
    found = {
        r
        for node in _imports(ast.parse(source), top_level=True)
        for t in _targets(module, node)
        if (r := _resolve(t)) and r.startswith("genexp.") and r != module
    }
    assert found == expected


def test_the_cycle_finder_names_the_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []
