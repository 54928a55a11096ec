"""The library's shape: no import cycles, short functions, and components/pipelines importing only downwards.

The layer contracts themselves live in pyproject.toml ([tool.importlinter]) and `make test` runs `lint-imports`;
these tests cover what import-linter does not: cycles of any length between modules, and the KFP definitions in
components/ and pipelines/, which install as preftune.components / preftune.pipelines from outside src/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "preftune"
MAX_FUNCTION_LINES = 80

#: What the KFP definitions may import from the library: every layer but orchestration (which imports them).
KFP_DEFINITIONS_MAY_NOT_IMPORT = ("preftune.orchestration",)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the groups of modules that import each other (size > 1, or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in graph.get(node, ()):
                    found.append(sorted(group))
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(strongly_connected(graph)) == [["a", "b", "c"], ["e"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_library_modules():
    graph = grimp.build_graph("preftune")
    modules = {m for m in graph.modules if m.startswith("preftune.")}
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i in modules} for m in modules}
    assert strongly_connected(edges) == []


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_in_src_is_longer_than_80_lines():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in _functions(ast.parse(path.read_text(encoding="utf-8"))):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_the_length_rule_counts_decorators_out_and_nested_functions_in():
    tree = ast.parse("@dec\ndef outer():\n    def inner():\n        return 1\n    return inner\n")
    assert {n.name: n.end_lineno - n.lineno + 1 for n in _functions(tree)} == {"outer": 4, "inner": 2}


def _preftune_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("preftune"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("preftune"))
    return found


@pytest.mark.parametrize("folder", ["components", "pipelines"])
def test_kfp_definitions_import_only_downwards(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for module in _preftune_imports(path):
            if module.startswith(KFP_DEFINITIONS_MAY_NOT_IMPORT):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
            if folder == "components" and module.startswith("preftune.pipelines"):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert bad == []
