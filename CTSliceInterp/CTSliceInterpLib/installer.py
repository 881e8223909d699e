"""Install what the *local* backend needs into Slicer's Python, once, after one confirmation.

- The backend's own code is not installed: it runs from the bundled source (``backend_path``).
- Its dependencies and its ``requires-python`` are read from the bundled ``pyproject.toml``
  (core + the ``server`` extra). Slicer 5.8's Python 3.9 has no TOML reader, so below 3.11
  the few fields needed are read by ``_read_project_fields`` (tested against ``tomllib``).
- Local processing needs the backend's ``requires-python``; an older Slicer (5.8: Python
  3.9) is told which Slicer it needs, and keeps Remote processing.
- torch comes from the PyTorch extension (``PyTorchUtils``), which picks the build matching the
  GPU driver; it is never installed by pip here.
- SimpleITK ships with Slicer (built from source, sometimes without pip metadata); it is
  checked by import and never reinstalled.
- Everything else goes through ``slicer.packaging.pip_ensure`` (Slicer >= 5.12) or, before it,
  ``slicer.util.pip_install``. The module asks first, so ``pip_ensure`` does not ask again.

Remote processing needs none of this: the client uses numpy and the standard library only.
The planning half of this module (what is missing, the confirmation text) is Qt-free and tested.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .backend_path import backend_project_dir
from .i18n import tr as _

EXTRAS = ("server",)
TORCH_REQUIREMENT_NAME = "torch"
# Provided by Slicer itself or by the PyTorch extension: never pip-installed (import names).
PROVIDED_BY_SLICER = {"torch": "torch", "simpleitk": "SimpleITK"}
# Built into Slicer, possibly without pip metadata: checked by import only.
CHECKED_BY_IMPORT = {"simpleitk": "SimpleITK"}
# The Python of each Slicer release line (Slicer_REQUIRED_PYTHON_VERSION in Slicer's top
# CMakeLists.txt: 3.9.10 at v5.8.0 and v5.8.1, 3.12.10 at v5.10.0 and v5.12.0).
SLICER_PYTHON = (("5.8", (3, 9, 10)), ("5.10", (3, 12, 10)), ("5.12", (3, 12, 10)))

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_INSTALLING = threading.Lock()


class LocalProcessingUnavailable(RuntimeError):
    """This Slicer cannot run the local backend (its Python is too old); the message says which
    Slicer can."""


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return match.group(1).lower().replace("_", "-")


# --- pyproject.toml ---------------------------------------------------------------------------
def read_project_fields(path: Path) -> dict:
    """``requires-python``, ``dependencies`` and ``optional-dependencies`` of ``[project]``."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python < 3.11 (Slicer 5.8)
        return _read_project_fields(text)
    project = tomllib.loads(text)["project"]
    return {key: project[key] for key in ("requires-python", "dependencies", "optional-dependencies") if key in project}


_TABLE = re.compile(r"^\s*\[([^\[\]]+)\]\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]+\")\s*=\s*(.*)$", re.S)
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'")


def _read_project_fields(text: str) -> dict:
    """The fields of ``read_project_fields`` from TOML text, for Pythons without ``tomllib``.

    Enough TOML for them: ``[table]`` headers, ``key = "string"`` and ``key = [strings]``
    (multi-line, with comments and a trailing comma). Other keys are skipped; a needed value
    in another form raises ``ValueError`` naming it."""
    fields: dict = {}
    table, lines = None, text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        header = _TABLE.match(line)
        if header:
            table = header.group(1).strip()
            continue
        key_match = _KEY.match(line)
        if not key_match or table not in ("project", "project.optional-dependencies"):
            continue
        key, value = key_match.group(1).strip('"'), key_match.group(2)
        wanted = table == "project.optional-dependencies" or key in ("requires-python", "dependencies")
        if value.lstrip().startswith("["):
            while _bracket_depth(value) > 0 and index < len(lines):
                value += "\n" + lines[index]
                index += 1
        if not wanted:
            continue
        parsed = _toml_value(value, key)
        if table == "project":
            fields[key] = parsed
        else:
            fields.setdefault("optional-dependencies", {})[key] = parsed
    return fields


def _without_comments(text: str) -> str:
    """``text`` with its ``#`` comments removed (a ``#`` inside a string stays)."""
    out, quote, index = [], None, 0
    while index < len(text):
        char = text[index]
        if quote is None and char == "#":
            newline = text.find("\n", index)
            index = len(text) if newline < 0 else newline
            continue
        if quote is None and char in "\"'":
            quote = char
        elif quote == '"' and char == "\\":
            out.append(text[index:index + 2])
            index += 2
            continue
        elif char == quote:
            quote = None
        out.append(char)
        index += 1
    return "".join(out)


def _bracket_depth(text: str) -> int:
    code = _STRING.sub('""', _without_comments(text))
    return code.count("[") - code.count("]")


def _toml_value(value: str, key: str):
    code = _without_comments(value).strip()
    strings = [_unquote(token) for token in _STRING.findall(code)]
    rest = _STRING.sub("", code)
    if code.startswith("[") and rest.strip().startswith("[") and rest.strip().endswith("]") \
            and not rest.strip()[1:-1].replace(",", "").strip():
        return strings
    if len(strings) == 1 and _STRING.fullmatch(code):
        return strings[0]
    raise ValueError(f"pyproject.toml: cannot read {key} = {value.strip()[:60]!r} without a TOML library")


def _unquote(token: str) -> str:
    return json.loads(token) if token.startswith('"') else token[1:-1]


def backend_requirements(project_dir: Path | None = None, extras=EXTRAS) -> list[str]:
    """Dependencies of the bundled backend (core + ``extras``), as written in pyproject.toml."""
    project = read_project_fields(_pyproject(project_dir))
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    unique = {}
    for requirement in requirements:
        unique.setdefault(requirement_name(requirement), requirement)
    return list(unique.values())


def _pyproject(project_dir: Path | None) -> Path:
    project_dir = project_dir or backend_project_dir()
    if project_dir is None:
        raise FileNotFoundError(_("the bundled CTSliceInterp backend was not found"))
    return Path(project_dir) / "pyproject.toml"


# --- Python version ---------------------------------------------------------------------------
def _version_tuple(text: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def python_satisfies(specifier: str, version=None) -> bool:
    """Whether ``version`` (default: this Python) meets a ``requires-python`` such as ``>=3.10``
    or ``>=3.9,<3.14`` (numeric release clauses, as Python specifiers are)."""
    version = tuple(version or sys.version_info[:3])
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        match = re.fullmatch(r"(>=|<=|==|!=|~=|>|<)\s*([0-9.*]+)", clause)
        if not match:
            raise ValueError(f"cannot read requires-python clause {clause!r}")
        operator, bound_text = match.groups()
        wildcard = bound_text.endswith(".*")
        bound = _version_tuple(bound_text)
        padded = version[:len(bound)] if (wildcard or operator == "==") else version
        bound_full = bound + (0,) * (len(padded) - len(bound))
        results = {
            ">=": padded >= bound_full, ">": padded > bound_full, "<=": padded <= bound_full,
            "<": padded < bound_full, "==": padded == bound_full, "!=": padded != bound_full,
            "~=": version >= bound_full and version[:len(bound) - 1] == bound[:len(bound) - 1],
        }
        if not results[operator]:
            return False
    return True


def check_local_python(project_dir: Path | None = None, version=None) -> None:
    """Raise ``LocalProcessingUnavailable`` naming the Slicer needed when this Python cannot run
    the backend (its ``requires-python``)."""
    specifier = read_project_fields(_pyproject(project_dir)).get("requires-python")
    version = tuple(version or sys.version_info[:3])
    if not specifier or python_satisfies(specifier, version):
        return
    suitable = [slicer for slicer, python in SLICER_PYTHON if python_satisfies(specifier, python)]
    needed = (_("3D Slicer {version} or later").format(version=suitable[0]) if suitable
              else _("a newer 3D Slicer"))
    raise LocalProcessingUnavailable(
        _("Local processing needs Python {specifier} ({slicer}); this Slicer runs Python {python}. "
          "Use Remote processing with a CTSliceInterp server, or install {slicer}.").format(
            specifier=specifier, slicer=needed, python=".".join(str(v) for v in version)))


# --- what is missing --------------------------------------------------------------------------
def is_satisfied(requirement: str) -> bool:
    """Installed in a version the requirement accepts (SimpleITK: importable)."""
    name = requirement_name(requirement)
    if name in CHECKED_BY_IMPORT:
        return importlib.util.find_spec(CHECKED_BY_IMPORT[name]) is not None
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement

        return Requirement(requirement).specifier.contains(installed, prereleases=True)
    except ImportError:  # no 'packaging': presence is the best we can check
        return True


@dataclass
class InstallPlan:
    torch: str | None = None  # torch requirement to install through PyTorchUtils, or None
    pip: list[str] = field(default_factory=list)  # requirements pip must install or upgrade
    missing_from_slicer: list[str] = field(default_factory=list)  # e.g. SimpleITK: cannot fix here

    @property
    def empty(self) -> bool:
        return self.torch is None and not self.pip

    def describe(self) -> str:
        """The text of the one confirmation shown before anything is installed."""
        lines = [_("Local processing needs these Python packages in Slicer's Python:"), ""]
        if self.torch:
            lines.append("  - " + _("PyTorch ({requirement}), through the PyTorch extension (GPU build if an "
                                    "NVIDIA driver is found, else CPU; about 1-3 GB)").format(requirement=self.torch))
        lines += [f"  - {requirement}" for requirement in self.pip]
        lines += ["", _("This is done once and may take several minutes. Remote processing needs none of it.")]
        return "\n".join(lines)


def plan_install(requirements: list[str] | None = None) -> InstallPlan:
    """What local processing still needs. Raises ``LocalProcessingUnavailable`` on a Python the
    backend does not support (Slicer 5.8), before reading anything else."""
    if requirements is None:
        check_local_python()
        requirements = backend_requirements()
    plan = InstallPlan()
    for requirement in requirements:
        if is_satisfied(requirement):
            continue
        name = requirement_name(requirement)
        if name == TORCH_REQUIREMENT_NAME:
            plan.torch = requirement[len(name):].strip() or ">=0"
        elif name in PROVIDED_BY_SLICER:
            plan.missing_from_slicer.append(requirement)
        else:
            plan.pip.append(requirement)
    return plan


# --- installing -------------------------------------------------------------------------------
def installing() -> bool:
    """True while ``install`` runs (it may take minutes and keeps the GUI painting)."""
    return _INSTALLING.locked()


def _pip_ensure_function():
    """``slicer.packaging.pip_ensure`` (Slicer >= 5.12), or None."""
    try:
        return importlib.import_module("slicer.packaging").pip_ensure
    except (ImportError, AttributeError):
        return None


def install(plan: InstallPlan, replan=None) -> None:
    """Carry out ``plan`` inside Slicer (blocking; the caller disables its controls meanwhile).

    One install at a time: a second call while one runs raises. Afterwards the requirements are
    checked again, and anything still missing raises (Slicer's testing mode, for example, skips
    ``pip_ensure`` installs), so "installed" is never said of a backend that is not.
    ``replan``: how to check again (default ``plan_install``)."""
    if not _INSTALLING.acquire(blocking=False):
        raise RuntimeError(_("the local backend is already being installed: wait until that finishes"))
    try:
        _install(plan)
    finally:
        _INSTALLING.release()
    importlib.invalidate_caches()
    left = (replan or plan_install)()
    if not left.empty:
        missing = ([f"PyTorch {left.torch}"] if left.torch else []) + left.pip
        raise RuntimeError(_("still missing after the installation: {packages}").format(packages=", ".join(missing)))


def _install(plan: InstallPlan) -> None:
    if plan.missing_from_slicer:
        raise RuntimeError(
            _("{packages} should come with Slicer but cannot be imported: reinstall Slicer").format(
                packages=", ".join(plan.missing_from_slicer)))
    if plan.torch:
        try:
            import PyTorchUtils
        except ImportError as exc:
            raise RuntimeError(
                _("the PyTorch extension is needed for local processing: install 'PyTorch' from the "
                  "Extensions Manager, restart Slicer, and try again (or use Remote processing)")
            ) from exc
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=plan.torch)
        if torch is None:
            raise RuntimeError(_("PyTorch was not installed"))
    if plan.pip:
        pip_ensure = _pip_ensure_function()
        if pip_ensure is not None:
            # The user confirmed plan.describe() already: no second prompt.
            pip_ensure(list(plan.pip), prompt_install=False, requester="CTSliceInterp")
        else:  # Slicer before slicer.packaging: plain pip, one call
            import slicer

            slicer.util.pip_install(list(plan.pip))
