"""Data flows one way between the packages of `moekit`, and none reaches into another's private names.

Every import counts, also those inside functions (they are dependencies all the same, only deferred). A package is
`moekit.<name>` (a top-level module such as `cli` is its own).
"""

from __future__ import annotations

import ast
import re
import importlib
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "moekit"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports_of(module: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import in the file, relative ones resolved."""
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(target, alias.name) for alias in node.names]
    return [(target, name) for target, name in found if target.split(".")[0] == "moekit"]


def dependency_graph() -> tuple[dict[str, set[str]], list[str]]:
    graph: dict[str, set[str]] = {}
    private = []
    for module, path in modules().items():
        source = package_of(module)
        graph.setdefault(source, set())
        for target, name in imports_of(module, path):
            if target in modules() or target == "moekit":
                destination = package_of(target) if target != "moekit" else "moekit"
            else:  # `from package import module`
                destination = package_of(f"{target}.{name}")
            if destination not in (source, "moekit"):
                graph[source].add(destination)
            names = [name] if name else []
            if destination != source and any(n.startswith("_") and not n.startswith("__") for n in names):
                private.append(f"{module} imports {target}.{name}")
            if destination != source and any(part.startswith("_") and not part.startswith("__")
                                             for part in target.split(".")):
                private.append(f"{module} imports {target}")
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("module", sorted(m for m in modules() if not m.endswith("__main__")))  # that one runs the CLI
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_cycle_between_packages_and_no_private_name_across_them():
    graph, private = dependency_graph()
    assert not private, "\n".join(private)
    assert not cycles(graph), f"import cycles between packages: {cycles(graph)}; edges: {graph}"


def test_the_check_sees_a_cycle_and_a_private_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_examples_and_readme_use_only_the_public_api():
    """DESIGN.md: the public API is `moekit/__init__.py`, and nothing else is imported from internals in examples
    (the Python blocks of the README and docs/ included); every name they import from `moekit` exists there."""
    import moekit

    root = PACKAGE_ROOT.parent
    sources = {str(path): path.read_text(encoding="utf-8") for path in sorted((root / "examples").rglob("*.py"))}
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        sources[str(page)] = "\n".join(re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S))
    internal, missing = [], []
    for where, text in sources.items():
        for target, names in re.findall(r"from (moekit[\w.]*) import ([^\n(]+|\([^)]*\))", text):
            if target != "moekit" and not target.startswith("moekit.demo"):
                internal.append(f"{where}: from {target} import ...")
            for name in re.findall(r"\w+", names if target == "moekit" else ""):
                if name not in ("noqa", "E402") and not hasattr(moekit, name):
                    missing.append(f"{where}: moekit.{name}")
    assert not internal and not missing, internal + missing


def test_public_names_are_the_functions_whatever_was_imported_first():
    """`moekit.export` is a subpackage too: importing it must not turn the public name into the module."""
    import importlib

    import moekit

    for module in ("moekit.export.native", "moekit.evaluation", "moekit.training.routers"):
        importlib.import_module(module)
    assert callable(moekit.export) and moekit.export.__name__ == "export"
    for name in moekit._LAZY:
        assert not isinstance(getattr(moekit, name), type(moekit)), name
