"""Static checks of the Slicer module's files: .ui, widget names, CMake lists, no Qt in the Lib."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "CTSliceInterp"
REPO = MODULE_DIR.parent


def _static_check():
    path = MODULE_DIR / "Testing" / "Python" / "CTSliceInterpStaticCheck.py"
    spec = importlib.util.spec_from_file_location("CTSliceInterpStaticCheck", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_module_files_pass_the_static_check():
    assert _static_check().check(MODULE_DIR) == []


def test_static_check_finds_each_kind_of_problem(tmp_path):
    copy = tmp_path / "CTSliceInterp"
    shutil.copytree(MODULE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "CTSliceInterpLib" / "extra.py").write_text("import imp\n")
    module = copy / "CTSliceInterp.py"
    module.write_text(module.read_text() + "\n# self.ui.missingWidget\ntestLogic = False\n")
    problems = "\n".join(_static_check().check(copy))
    assert "self.ui.missingWidget" in problems
    assert "CTSliceInterpLib/extra.py is not listed" in problems
    assert "'imp' module" in problems
    assert "disables its self-test" in problems
    (copy / "Resources" / "UI" / "CTSliceInterp.ui").write_text("<ui><widget")
    assert "does not parse" in _static_check().check(copy)[0]


def test_static_check_finds_what_issue_14_fixed(tmp_path):
    """The checks that guard the widget's fixes find each problem when it comes back (the widget
    of before issue 14 had all of them: see the commit's report)."""
    copy = tmp_path / "CTSliceInterp"
    shutil.copytree(MODULE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    module = copy / "CTSliceInterp.py"
    text = module.read_text()
    text = text.replace("self.ui.showUncertaintyCheckBox.connect(", "self.ui.showUncertaintyCheckBox.disconnect(")
    text = text.replace("self._setMethods([classical_choice()])", 'self._setMethods([(_("B-spline (classical)"), "bspline")])')
    text = text.replace("        self.refreshMethods()\n        return False", "        return True")
    text += ("\nimport concurrent.futures\nslicer.app.connect('aboutToQuit()', print)\n"
             "class CTSliceInterpTest:\n    def runTest(self):\n        self.skipTest('no')\n"
             "        installer.install(installer.plan_install())\n")
    module.write_text(text)
    ui = copy / "Resources" / "UI" / "CTSliceInterp.ui"
    ui.write_text(ui.read_text().replace('<stringlist notr="true">', "<stringlist>"))
    (copy / "CTSliceInterpLib" / "worker.py").write_text("import threading\nthreading.Thread(target=print).start()\n")
    problems = "\n".join(_static_check().check(copy))
    for expected in ("connects aboutToQuit", "spells the classical menu label", "does not refresh the method list",
                     "checkbox does nothing after a run", "ThreadPoolExecutor", "lacks notr", "calls skipTest",
                     "installs packages", "worker.py:2 starts a thread that is not a daemon"):
        assert expected in problems, expected


def test_module_file_is_valid_python_and_lib_has_no_qt():
    ast.parse((MODULE_DIR / "CTSliceInterp.py").read_text())
    for path in (MODULE_DIR / "CTSliceInterpLib").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import (qt|ctk)\b|from (qt|ctk) import)", text, re.M), f"{path.name} imports Qt"


def test_every_bound_parameter_has_a_widget():
    check = _static_check()
    ui = MODULE_DIR / "Resources" / "UI" / "CTSliceInterp.ui"
    bound = set(check.ui_parameter_names(ui).values())
    assert {"inputVolume", "outputVolume", "spacing", "steps", "samples", "consistency", "showUncertainty"} <= bound


def test_ca_certificate_is_a_per_server_setting_not_a_scene_parameter():
    import xml.etree.ElementTree as ElementTree

    check = _static_check()
    ui = MODULE_DIR / "Resources" / "UI" / "CTSliceInterp.ui"
    widget = next(w for w in ElementTree.parse(ui).getroot().iter("widget") if w.get("name") == "caFilePathLineEdit")
    assert widget.get("class") == "ctkPathLineEdit"
    props = {prop.get("name"): prop for prop in widget.findall("property")}
    assert "self-signed" in props["toolTip"].findtext("string")
    assert "ctkPathLineEdit::Files" in props["filters"].findtext("set")
    assert "(*.pem *.crt *.cer)" in props["nameFilters"].findtext("stringlist/string")
    # Never in the scene: not bound to the parameter node, and no such field on it.
    assert "caFilePathLineEdit" not in check.ui_parameter_names(ui)
    fields = check.parameter_node_fields(MODULE_DIR / "CTSliceInterp.py")
    assert fields and not [f for f in fields if re.search("token|ca_?file|certificate", f, re.I)]
    assert re.search(r"SETTINGS_CA_FILES = \"CTSliceInterp/", (MODULE_DIR / "CTSliceInterp.py").read_text())


def test_extension_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf"set\({key} \"[^\"]+\"", text), key
    assert re.search(r"set\(EXTENSION_DEPENDS \"[^\"]*PyTorch", text)
    assert "add_subdirectory(CTSliceInterp)" in text
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in module_cmake and "WITH_GENERIC_TESTS" in module_cmake
    assert "slicer_add_python_unittest" in module_cmake


def test_icon_is_128_pixels():
    header = (REPO / "CTSliceInterp.png").read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(header[16:20], "big") == 128 and int.from_bytes(header[20:24], "big") == 128


def test_installer_plan_reads_the_bundled_pyproject():
    import sys

    sys.path.insert(0, str(MODULE_DIR))
    from CTSliceInterpLib import installer

    requirements = installer.backend_requirements()
    names = {installer.requirement_name(r) for r in requirements}
    assert {"torch", "numpy", "fastapi", "uvicorn"} <= names
    plan = installer.plan_install(["torch>=99", "numpy>=1.0", "surely-not-installed-pkg>=1", "SimpleITK>=0"])
    assert plan.torch == ">=99" and plan.pip == ["surely-not-installed-pkg>=1"]
    text = plan.describe()
    assert "PyTorch extension" in text and "surely-not-installed-pkg" in text
    with pytest.raises(ValueError):
        installer.requirement_name("   ")


def test_screenshot_url_points_at_a_picture_in_the_repository():
    """EXTENSION_SCREENSHOTURLS names raw.githubusercontent.com/<owner>/<repo>/main/<path>: that
    path is a PNG here, made by the script next to it and labelled as rendered."""
    text = (REPO / "CMakeLists.txt").read_text()
    urls = re.search(r"set\(EXTENSION_SCREENSHOTURLS \"([^\"]+)\"", text).group(1).split()
    for url in urls:
        path = REPO / re.sub(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/", "", url)
        assert path.is_file(), url
        header = path.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(header[16:20], "big") >= 800  # a picture, not an icon
    script = (REPO / "docs" / "images" / "make_slicer_side_by_side.py").read_text()
    assert "not a Slicer screenshot" in script
