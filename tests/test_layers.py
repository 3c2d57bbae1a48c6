"""The package's layers as docs/architecture.md declares them: no module imports from a layer above its own,
no import cycle, no module the table does not place. Imports inside functions count as much as top-level
ones (a lazy import still ties the modules together)."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "llmpar"


def declared_layers(doc: Path) -> dict[str, int]:
    """The ```layers block of the architecture document: module or package name -> layer."""
    block = re.search(r"```layers\n(.*?)```", doc.read_text(), re.S)
    if not block:
        raise AssertionError(f"{doc} has no ```layers block")
    table = {}
    for line in block.group(1).splitlines():
        if line.strip():
            layer, *names = line.split()
            table.update(dict.fromkeys(names, int(layer)))
    return table


def modules(src: Path) -> dict[str, Path]:
    """Every module of the package by its dotted name below the package ('plan.memory', 'strategies' for a
    package's __init__)."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src / PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            out[".".join(parts)] = path
    return out


def layer_of(name: str, table: dict[str, int]) -> int | None:
    """The layer of a module: its own entry, else its nearest package's."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in table:
            return table[key]
    return None


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that a module imports (``from llmpar.x import y`` is module x.y where that is a
    module, else x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name != PACKAGE and not name.startswith(PACKAGE + "."):
                continue
            dotted = name[len(PACKAGE) + 1:]
            if isinstance(node, ast.ImportFrom) and dotted != node.module[len(PACKAGE) + 1:] and dotted not in known:
                continue  # ``from llmpar.x import name``: a name of module x, not a module
            if dotted in known:
                out.add(dotted)
    return out


def violations(src: Path, doc: Path) -> list[str]:
    """Every upward import, unplaced module and import cycle of the package under ``src``."""
    table = declared_layers(doc)
    known = modules(src)
    graph = {name: imported(path, known) - {name} for name, path in known.items()}
    problems = []
    for name in known:
        if layer_of(name, table) is None:
            problems.append(f"{name}: not placed in any layer of {doc.name}")
    for name, targets in graph.items():
        mine = layer_of(name, table)
        for target in sorted(targets):
            theirs = layer_of(target, table)
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{name} (layer {mine}) imports {target} (layer {theirs}): an upward import")
    # cycles: a depth-first search that reports each back edge's loop once
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                loop = stack[stack.index(nxt):] + [nxt]
                problems.append("import cycle: " + " -> ".join(loop))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return problems


def test_the_package_keeps_its_layers():
    problems = violations(REPO / "src", REPO / "docs" / "architecture.md")
    assert not problems, "\n".join(problems)


@pytest.fixture
def tree(tmp_path):
    shutil.copytree(REPO / "src" / PACKAGE, tmp_path / "src" / PACKAGE)
    (tmp_path / "docs").mkdir()
    shutil.copy(REPO / "docs" / "architecture.md", tmp_path / "docs" / "architecture.md")
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


@pytest.mark.parametrize("where, line, expect", [
    ("plan/memory.py", "from llmpar.config import prepare", "plan.memory (layer 3) imports config (layer 4)"),
    ("shape.py", "import llmpar.model", "shape (layer 1) imports model (layer 5)"),
    ("layout.py", "from llmpar.layout import PRESETS  # noqa", None),
    ("config.py", "from llmpar.run_cli import main", "config (layer 4) imports run_cli (layer 9)"),
    ("data/loader.py", "from llmpar import checkpoint", None),
    ("checkpoint.py", "from llmpar.data import loader", "import cycle: checkpoint -> data.loader -> checkpoint"),
])
def test_a_planted_import_is_caught(tree, where, line, expect):
    """An import that goes up, or closes a loop, is named; one within the rules is not."""
    _append(tree / "src" / PACKAGE / where, line)
    if where == "checkpoint.py":  # the other half of the loop: data.loader -> checkpoint
        _append(tree / "src" / PACKAGE / "data" / "loader.py", "from llmpar import checkpoint")
    problems = violations(tree / "src", tree / "docs" / "architecture.md")
    if expect is None:
        assert not problems, problems
    else:
        assert any(expect in p for p in problems), problems


def test_a_module_the_table_does_not_place_is_named(tree):
    (tree / "src" / PACKAGE / "newthing.py").write_text("X = 1\n")
    assert "newthing: not placed in any layer of architecture.md" in violations(tree / "src",
                                                                             tree / "docs" / "architecture.md")
