"""No import cycles in the backend, Training/ or the Slicer module (issue 11).

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``, at module
level or inside a function (a lazy import still ties the two modules together), between modules
of the same tree. ``python Testing/test_import_cycles.py`` prints the cycles it finds.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (folder that is put on sys.path, the packages or script folders in it that are searched)
TREES = [
    (REPO / "Backend" / "src", ["ctsliceinterp"]),
    (REPO / "Training", ["."]),
    (REPO / "CTSliceInterp", ["."]),
]


def module_files(root: Path, tops: list[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under ``root/top`` (``.``: scripts in root)."""
    modules: dict[str, Path] = {}
    for top in tops:
        base = root / top
        files = base.glob("*.py") if top == "." else base.rglob("*.py")
        for path in files:
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
        if top == ".":  # packages next to the scripts (CTSliceInterpLib)
            for init in base.glob("*/__init__.py"):
                modules.update(module_files(root, [init.parent.name]))
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules in ``known`` that module ``name`` (file ``path``) imports."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:  # `import a.b.c` of a non-module attribute: its module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}" if base else alias.name
                add(submodule if submodule in known else base)
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for root, tops in TREES:
        modules = module_files(root, tops)
        for name, path in modules.items():
            graph[name] = imports_of(name, path, set(modules))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import thing\n")
    (package / "b.py").write_text("def thing():\n    from .a import other\n")
    (package / "c.py").write_text("from . import a\n")
    modules = module_files(tmp_path, ["pkg"])
    graph = {name: imports_of(name, path, set(modules)) for name, path in modules.items()}
    assert graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_the_graph_sees_the_backend_training_and_the_slicer_module():
    graph = import_graph()
    assert "ctsliceinterp.core.errors" in graph["ctsliceinterp.cli"]
    assert "ctsliceinterp.core.volume" in graph["ctsliceinterp.api"]
    assert any(name.startswith("CTSliceInterpLib.") for name in graph)
    assert "loop" in graph


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


if __name__ == "__main__":
    found = cycles(import_graph())
    for component in found:
        print(" <-> ".join(component))
    print(f"{len(found)} import cycle(s)")
    sys.exit(1 if found else 0)
