"""The package's shape, checked: no import cycle among ditkit's modules (imports inside functions
count), none of them over 500 lines, and the layers contract of pyproject.toml kept."""

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ditkit"
MAX_LINES = 500


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each a list of module names."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(m: str) -> None:
        index[m] = low[m] = counter[0]
        counter[0] += 1
        stack.append(m)
        on_stack.add(m)
        for n in graph.find_modules_directly_imported_by(m):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))  # the depth of an import chain; restored for the tests after this one
    try:
        for m in sorted(graph.modules):
            if m not in index:
                visit(m)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_no_import_cycle():
    graph = grimp.build_graph("ditkit")
    # A package's __init__ re-exporting its submodules is not a cycle of the code; only module-to-module imports count.
    for pkg in [m for m in graph.modules if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()]:
        for child in graph.find_children(pkg):
            if graph.direct_import_exists(importer=child, imported=pkg):
                pytest.fail(f"{child} imports its own package {pkg}; import the module that defines the name instead.")
            if graph.direct_import_exists(importer=pkg, imported=child):
                graph.remove_import(importer=pkg, imported=child)
    assert cycles(graph) == []


def test_no_module_over_500_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these modules: {long}"


def test_layers_contract_is_kept():
    result = subprocess.run([sys.executable, "-m", "importlinter.cli", "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True)
    if "No module named" in result.stderr:
        result = subprocess.run(["lint-imports", "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
