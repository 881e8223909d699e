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
    for path in [module_path, *sorted((module_dir / f"{MODULE_NAME}Lib").glob("*.py"))]:
        text = path.read_text()
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
