"""The import graph (every import, lazy ones inside functions included) has no circle, and stages
build only on the pipeline's base modules: base ← stages ← runner ← CLI."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# what a stage may import from pipeline/: the contract, typed config and the measuring helpers
BASE = {"pipeline", "pipeline.contract", "pipeline.config", "pipeline.redact", "pipeline.registry",
        "pipeline.measure", "pipeline.roofline", "pipeline.profile", "pipeline.quiet", "pipeline.gpus",
        "pipeline.quiet_timing"}


def modules() -> dict[str, Path]:
    found = {}
    for path in [*(ROOT / "pipeline").glob("*.py"), *(ROOT / "stages").rglob("*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere in it (``from a import b`` counts as a.b if that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in known}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a ring (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

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
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def test_no_module_imports_itself_around_a_circle():
    assert circles(graph()) == []
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself


def test_stages_import_only_the_pipeline_base():
    beyond = {f"{m} imports {d}" for m, deps in graph().items() if m.startswith("stages")
              for d in deps if d.startswith("pipeline") and d not in BASE}
    assert beyond == set()
