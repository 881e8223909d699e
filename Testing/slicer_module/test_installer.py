"""The local backend's installer: pyproject reading without tomllib, the one confirmation, and
never saying "installed" of something that is not (Slicer's testing mode skips pip_ensure)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "CTSliceInterp"
sys.path.insert(0, str(MODULE_DIR))

from CTSliceInterpLib import installer  # noqa: E402

try:
    import tomllib
except ImportError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

TRICKY_PYPROJECT = '''
[build-system]
requires = ["setuptools>=64"]  # not [project]

[project]
name = "x"  # a comment
requires-python = '>=3.10'
license = { text = "Apache-2.0" }
dynamic = ["version"]
classifiers = [
    "Programming Language :: Python :: 3",   # a = b inside a comment
    "License :: OSI Approved",
]
dependencies = [
    "numpy>=1.24",  # with a comment, and a # inside a string next:
    "pkg-with-hash ; extra == '#'",
    'literal>=1',
    "escaped\\"quote",
]

[project.optional-dependencies]
server = ["fastapi>=0.110", "uvicorn>=0.29"]  # inline
"quoted-extra" = [
  "a",
]
empty = []

[tool.other]
dependencies = ["not-these"]
'''


def test_fallback_reader_agrees_with_tomllib():
    expected = tomllib.loads(TRICKY_PYPROJECT)["project"]
    got = installer._read_project_fields(TRICKY_PYPROJECT)
    assert got == {key: expected[key] for key in ("requires-python", "dependencies", "optional-dependencies")}
    real = (MODULE_DIR.parent / "Backend" / "pyproject.toml").read_text()
    project = tomllib.loads(real)["project"]
    assert installer._read_project_fields(real) == {
        key: project[key] for key in ("requires-python", "dependencies", "optional-dependencies")}


def test_fallback_reader_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="dependencies"):
        installer._read_project_fields('[project]\ndependencies = """\nnumpy\n"""\n')


def test_python_versions_against_requires_python():
    assert not installer.python_satisfies(">=3.10", (3, 9, 10))
    assert installer.python_satisfies(">=3.10", (3, 12, 10))
    assert installer.python_satisfies(">=3.9,<3.13", (3, 12, 10))
    assert not installer.python_satisfies(">=3.9,<3.12", (3, 12, 10))
    assert installer.python_satisfies("==3.12.*", (3, 12, 1))
    with pytest.raises(installer.LocalProcessingUnavailable, match=r"3D Slicer 5\.10 or later.*3\.9\.10"):
        installer.check_local_python(version=(3, 9, 10))
    installer.check_local_python(version=(3, 12, 10))  # Slicer 5.10 and 5.12: fine


@pytest.fixture
def slicer_packaging(monkeypatch):
    """``slicer.packaging`` of Slicer >= 5.12 whose pip_ensure records its calls and installs
    nothing (what it does in Slicer's testing mode)."""
    module = types.ModuleType("slicer.packaging")
    module.calls = []

    def pip_ensure(requirements, **options):
        module.calls.append((list(map(str, requirements)), options))
        if module.during is not None:
            module.during()

    module.during = None
    module.pip_ensure = pip_ensure
    monkeypatch.setitem(sys.modules, "slicer.packaging", module)
    return module


def test_pip_ensure_is_asked_once_without_a_second_prompt(slicer_packaging):
    plan = installer.InstallPlan(pip=["surely-not-installed-pkg>=1"])
    installer.install(plan, replan=lambda: installer.InstallPlan())
    [(requirements, options)] = slicer_packaging.calls
    assert requirements == ["surely-not-installed-pkg>=1"]
    assert options.get("prompt_install") is False  # the module asked already
    assert "skip_packages" not in options  # a --no-deps per-package install Slicer discourages


def test_an_install_that_installed_nothing_raises(slicer_packaging):
    plan = installer.plan_install(["surely-not-installed-pkg>=1"])
    with pytest.raises(RuntimeError, match="still missing after the installation: surely-not-installed-pkg>=1"):
        installer.install(plan, replan=lambda: installer.plan_install(["surely-not-installed-pkg>=1"]))


def test_one_install_at_a_time(slicer_packaging):
    seen = {}

    def second_click():
        seen["installing"] = installer.installing()
        with pytest.raises(RuntimeError, match="already being installed"):
            installer.install(installer.InstallPlan(pip=["other>=1"]), replan=lambda: installer.InstallPlan())

    slicer_packaging.during = second_click
    installer.install(installer.InstallPlan(pip=["surely-not-installed-pkg>=1"]), replan=lambda: installer.InstallPlan())
    assert seen == {"installing": True}
    assert len(slicer_packaging.calls) == 1 and not installer.installing()


def test_no_claims_about_slicer_pydeps():
    """``slicer.pydeps`` never existed in Slicer (v5.8.0 to v5.12.x); ``pip_ensure`` is in
    ``slicer.packaging`` from 5.12."""
    for path in (MODULE_DIR / "CTSliceInterpLib" / "installer.py", MODULE_DIR.parent / "docs" / "slicer.md"):
        assert "pydeps" not in path.read_text(), path

