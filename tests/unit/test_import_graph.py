"""The project's import graph, read from the sources (every import, also those inside functions):
layers only import downward (core `epochwise/` < `blocks/` < `tasks/` < `flows/` < `deployments/` <
the CLI `epochwise/cli/`, which starts flows and applies deployments) and no modules import each other
in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("epochwise", "blocks", "tasks", "flows", "deployments")


def layer(module: str) -> int:
    if module == "epochwise.cli" or module.startswith("epochwise.cli."):
        return len(PACKAGES)
    return PACKAGES.index(module.split(".")[0])


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def test_layers_import_only_downward():
    graph = import_graph()
    assert len(graph) > 50  # the walk found the project's modules
    upward = sorted((a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a))
    assert upward == []


def test_no_import_cycle():
    graph = import_graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for target in sorted(graph[module]):
            if seen.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in seen:
                visit(target, [*path, target])
        seen[module] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])
    assert cycles == []
