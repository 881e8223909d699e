"""Static checks of the CTSliceInterp module's files (standard library only).

Usable as a script (``python CTSliceInterpStaticCheck.py MODULE_DIR``, exit code 1 on problems)
and imported by pytest. Each check returns a list of problems (empty: fine)."""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

MODULE_NAME = "CTSliceInterp"
# The oldest Python of a supported Slicer (5.8: Python 3.9.10, Slicer_REQUIRED_PYTHON_VERSION in
# its top CMakeLists.txt). The module, its Lib and the backend modules the Lib imports for Remote
# processing must load on it.
OLDEST_PYTHON = (3, 9)
# Standard-library names that came after Python 3.9 (attribute or keyword -> version).
NEWER_STANDARD_LIBRARY = {"pairwise": "3.10", "aiter": "3.10", "anext": "3.10", "bit_count": "3.10",
                          "TypeAlias": "3.10", "ParamSpec": "3.10", "Concatenate": "3.10", "TypeGuard": "3.10",
                          "tomllib": "3.11", "Self": "3.11", "TaskGroup": "3.11", "StrEnum": "3.11"}
NEWER_KEYWORDS = {("zip", "strict"): "3.10", ("dataclass", "slots"): "3.10", ("dataclass", "kw_only"): "3.10"}


def ui_widget_names(ui_path: Path) -> set[str]:
    """Names of all widgets in a Qt Designer file (raises ``ParseError`` if it is not XML)."""
    root = ElementTree.parse(ui_path).getroot()
    return {w.get("name") for w in root.iter("widget")}


def ui_parameter_names(ui_path: Path) -> dict[str, str]:
    """widget name -> SlicerParameterName dynamic property."""
    root = ElementTree.parse(ui_path).getroot()
    names = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names[widget.get("name")] = prop.findtext("string")
    return names


def used_ui_names(module_path: Path) -> set[str]:
    """Every ``self.ui.<name>`` the module's code uses."""
    return set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", module_path.read_text()))


def parameter_node_fields(module_path: Path) -> set[str]:
    tree = ast.parse(module_path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == f"{MODULE_NAME}ParameterNode":
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    return set()


def cmake_listed_scripts(cmake_path: Path) -> set[str]:
    text = cmake_path.read_text().replace("${MODULE_NAME}", MODULE_NAME)
    block = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S)
    return set(block.group(1).split()) if block else set()


def cmake_listed_resources(cmake_path: Path) -> set[str]:
    text = cmake_path.read_text().replace("${MODULE_NAME}", MODULE_NAME)
    block = re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", text, re.S)
    return set(block.group(1).split()) if block else set()


def python39_problems(path: Path) -> list[str]:
    """What in ``path`` does not run on Python 3.9: newer syntax (``ast`` with ``feature_version``
    finds ``match``; parenthesised context managers are found here), ``X | Y`` types evaluated
    at run time (annotations without ``from __future__ import annotations``, ``isinstance``), and
    standard-library names or keywords added later. A real 3.9 compile is the other half
    (Testing/slicer_module/test_python39.py)."""
    text = Path(path).read_text(encoding="utf-8")
    name = Path(path).name
    try:
        tree = ast.parse(text, feature_version=OLDEST_PYTHON)
    except SyntaxError as exc:
        return [f"{name}:{exc.lineno}: not Python 3.9 syntax: {exc.msg}"]
    lines = text.splitlines()
    lazy_annotations = any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
                           and any(alias.name == "annotations" for alias in node.names) for node in tree.body)
    problems = []

    def union(node) -> bool:
        return any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(node))

    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.With, ast.AsyncWith)) and len(node.items) > 1:
            line = lines[node.lineno - 1]
            opening = re.match(r"\s*(async\s+)?with\s*\(", line)
            if opening and node.items[0].context_expr.col_offset >= opening.end() and node.lineno == node.items[0].context_expr.lineno:
                problems.append(f"{where}: parenthesised context managers need Python 3.10")
        if not lazy_annotations:
            annotations = []
            if isinstance(node, ast.AnnAssign):
                annotations.append(node.annotation)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                arguments += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
                annotations += [a.annotation for a in arguments if a.annotation is not None]
                annotations += [node.returns] if node.returns is not None else []
            if any(union(annotation) for annotation in annotations):
                problems.append(f"{where}: 'X | Y' in an annotation needs Python 3.10 "
                                "(or 'from __future__ import annotations')")
        if isinstance(node, ast.Call):
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if function in ("isinstance", "issubclass") and len(node.args) == 2 and union(node.args[1]):
                problems.append(f"{where}: {function}() with 'X | Y' needs Python 3.10")
            for keyword in node.keywords:
                version = NEWER_KEYWORDS.get((function, keyword.arg))
                if version:
                    problems.append(f"{where}: {function}({keyword.arg}=...) needs Python {version}")
        if isinstance(node, ast.Attribute) and node.attr in NEWER_STANDARD_LIBRARY:
            problems.append(f"{where}: .{node.attr} needs Python {NEWER_STANDARD_LIBRARY[node.attr]}")
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name in NEWER_STANDARD_LIBRARY and (node.module or "").split(".")[0] in (
                        "itertools", "typing", "asyncio", "enum", "builtins"):
                    problems.append(f"{where}: {node.module}.{alias.name} needs Python {NEWER_STANDARD_LIBRARY[alias.name]}")
        if isinstance(node, ast.Import) and not _guarded(tree, node):
            for alias in node.names:
                if alias.name in NEWER_STANDARD_LIBRARY:
                    problems.append(f"{where}: import {alias.name} needs Python {NEWER_STANDARD_LIBRARY[alias.name]} "
                                    "(guard it with a version check or try/except ImportError)")
    return problems


def _guarded(tree, target) -> bool:
    """``target`` sits in a ``try`` that catches ImportError or under an ``if`` (a version check)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Try, ast.If)) and any(child is target for child in ast.walk(node)):
            return True
    return False


def imported_backend_modules(paths, backend_source: Path, package: str = "ctsliceinterp") -> list[Path]:
    """The backend files that the module files ``paths`` load: their ``package`` imports (at any
    level: the Lib imports the client where it is used), followed through the backend's own
    module-level imports (relative or absolute; a package's ``__init__`` included)."""
    found, queue = set(), [(Path(p), False) for p in paths]
    while queue:
        path, in_backend = queue.pop()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        statements = list(_module_level(tree)) if in_backend else list(ast.walk(tree))
        if in_backend:
            parts = list(path.relative_to(backend_source).with_suffix("").parts)
            own_package = parts[:-1]  # for __init__.py, parts[-1] is "__init__"
        for node in statements:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    if not in_backend:
                        continue
                    base = own_package[: len(own_package) - (node.level - 1)]
                    module = ".".join(base + ([module] if module else []))
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            for name in names:
                parts_of_name = name.split(".")
                if parts_of_name[0] != package:
                    continue
                for end in range(1, len(parts_of_name) + 1):
                    for candidate in (backend_source.joinpath(*parts_of_name[:end]).with_suffix(".py"),
                                      backend_source.joinpath(*parts_of_name[:end], "__init__.py")):
                        if candidate.is_file() and candidate not in found:
                            found.add(candidate)
                            queue.append((candidate, True))
    return sorted(found)


def _module_level(tree):
    """Statements run on import: the module body, descending into if/try/with but not functions."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                stack.extend(getattr(node, field, []))
        if isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)


def ui_translation_problems(ui_path: Path) -> list[str]:
    """Node class names in the .ui are not for translators (``notr="true"``, as Slicer's own .ui)."""
    root = ElementTree.parse(ui_path).getroot()
    problems = []
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            stringlist = prop.find("stringlist")
            if prop.get("name") == "nodeTypes" and stringlist is not None and stringlist.get("notr") != "true":
                problems.append(f"{ui_path.name}: nodeTypes of {widget.get('name')} lacks notr=\"true\"")
    return problems


def _function_source(tree, text: str, class_name: str, function_name: str) -> str:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == function_name:
                    return ast.get_source_segment(text, item) or ""
    return ""


def widget_problems(module_path: Path) -> list[str]:
    """What the widget and the self-test must do that no test without Qt can run."""
    text = module_path.read_text()
    tree = ast.parse(text)
    widget, test = f"{MODULE_NAME}Widget", f"{MODULE_NAME}Test"
    problems = []
    if "aboutToQuit" in text:
        problems.append(f"{module_path.name} connects aboutToQuit: Slicer unloads modules on quit, which calls "
                        "cleanup(); a second connection outlives a reload")
    if '"B-spline (classical)"' in text:
        problems.append(f"{module_path.name} spells the classical menu label itself; use logic.classical_choice() "
                        "(one translated label)")
    install = _function_source(tree, text, widget, "_ensureLocalBackendInstalled")
    if "installer.install(" in install:
        before = install[:install.index("installer.install(")]
        if ".enabled = False" not in before:
            problems.append("the widget leaves its controls enabled while the install keeps the GUI painting")
        if "self.refreshMethods()" not in install[install.index("installer.install("):]:
            problems.append("the widget does not refresh the method list after installing the local backend")
    if "installer.installing()" not in _function_source(tree, text, widget, "onApplyButton"):
        problems.append("onApplyButton does not refuse a second Interpolate while the install runs")
    if "self._run.cancel()" not in _function_source(tree, text, widget, "onSceneStartClose"):
        problems.append("closing the scene does not cancel the run")
    if not re.search(r"showUncertaintyCheckBox\.connect\(\s*\"toggled\(bool\)\"", text):
        problems.append("the 'Show uncertainty overlay' checkbox does nothing after a run (not connected)")
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == test:
            source = ast.get_source_segment(text, node) or ""
            if "skipTest" in re.sub(r"#.*", "", source):
                problems.append(f"{test} calls skipTest, an error when Reload and Test calls runTest()")
            if "installer.install(" in source:
                problems.append(f"{test} installs packages into the Slicer under test")
    return problems


def check(module_dir: Path) -> list[str]:
    module_dir = Path(module_dir)
    problems = []
    ui_path = module_dir / "Resources" / "UI" / f"{MODULE_NAME}.ui"
    module_path = module_dir / f"{MODULE_NAME}.py"
    cmake_path = module_dir / "CMakeLists.txt"
    try:
        widgets = ui_widget_names(ui_path)
    except (OSError, ElementTree.ParseError) as exc:
        return [f"{ui_path} does not parse: {exc}"]
    for name in sorted(used_ui_names(module_path) - widgets):
        problems.append(f"{module_path.name} uses self.ui.{name}, which is not in {ui_path.name}")
    fields = parameter_node_fields(module_path)
    for widget, parameter in sorted(ui_parameter_names(ui_path).items()):
        if parameter not in fields:
            problems.append(f"widget {widget} is bound to parameter {parameter!r}, not a field of the parameter node")
    listed = cmake_listed_scripts(cmake_path)
    lib_files = {p.relative_to(module_dir).as_posix() for p in (module_dir / f"{MODULE_NAME}Lib").glob("*.py")}
    for name in sorted(lib_files | {f"{MODULE_NAME}.py"}):
        if name not in listed:
            problems.append(f"{name} is not listed in MODULE_PYTHON_SCRIPTS of {cmake_path}")
    for name in sorted(listed):
        if not (module_dir / name).is_file():
            problems.append(f"{cmake_path.name} lists {name}, which does not exist")
    for name in sorted(cmake_listed_resources(cmake_path)):
        if not (module_dir / name).is_file():
            problems.append(f"{cmake_path.name} lists resource {name}, which does not exist")
    problems += ui_translation_problems(ui_path)
    problems += widget_problems(module_path)
    for path in [module_path, *sorted((module_dir / f"{MODULE_NAME}Lib").glob("*.py"))]:
        text = path.read_text()
        if re.search(r"ThreadPoolExecutor|concurrent\.futures", text):
            problems.append(f"{path.name} uses a ThreadPoolExecutor, whose workers Python joins at exit "
                            "(a waiting worker hangs Slicer's exit): use a daemon thread")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Thread":
                daemon = [k.value for k in node.keywords if k.arg == "daemon"]
                if not (daemon and isinstance(daemon[0], ast.Constant) and daemon[0].value is True):
                    problems.append(f"{path.name}:{node.lineno} starts a thread that is not a daemon "
                                    "(Python joins it at exit)")
        if re.search(r"^\s*import imp\s*$|^\s*from imp import", text, re.M):
            problems.append(f"{path.name} imports the removed 'imp' module")
        if re.search(r"testLogic\s*=\s*False|enableTest\w*\s*=\s*False", text):
            problems.append(f"{path.name} disables its self-test")
    return problems


if __name__ == "__main__":
    found = check(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2])
    for problem in found:
        print(problem)
    print("static check:", "FAILED" if found else "passed")
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        sys.modules["slicer"].util.exit(1 if found else 0)
    sys.exit(1 if found else 0)
