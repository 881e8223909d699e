"""Install what the *local* backend needs into Slicer's Python, once, after one confirmation.

- The backend's own code is not installed: it runs from the bundled source (``backend_path``).
- Its dependencies are read from the bundled ``pyproject.toml`` (core + the ``server`` extra).
- torch comes from the PyTorch extension (``PyTorchUtils``), which picks the build matching the
  GPU driver; it is never installed by pip here.
- SimpleITK ships with Slicer (built from source, sometimes without pip metadata); it is
  checked by import and never reinstalled.
- Everything else goes through ``slicer.packaging.pip_ensure`` (or ``slicer.pydeps.pip_ensure``,
  its name in Slicer 5.11) and, in older Slicer, ``slicer.util.pip_install``.

Remote processing needs none of this: the client uses numpy and the standard library only.
The planning half of this module (what is missing, the confirmation text) is Qt-free and tested.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .backend_path import backend_project_dir

EXTRAS = ("server",)
TORCH_REQUIREMENT_NAME = "torch"
# Provided by Slicer itself or by the PyTorch extension: never pip-installed (import names).
PROVIDED_BY_SLICER = {"torch": "torch", "simpleitk": "SimpleITK"}
# Built into Slicer, possibly without pip metadata: checked by import only.
CHECKED_BY_IMPORT = {"simpleitk": "SimpleITK"}

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return match.group(1).lower().replace("_", "-")


def _load_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Slicer >= 5.8 has Python 3.12
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as handle:
        return tomllib.load(handle)


def backend_requirements(project_dir: Path | None = None, extras=EXTRAS) -> list[str]:
    """Dependencies of the bundled backend (core + ``extras``), as written in pyproject.toml."""
    project_dir = project_dir or backend_project_dir()
    if project_dir is None:
        raise FileNotFoundError("the bundled CTSliceInterp backend was not found")
    project = _load_toml(Path(project_dir) / "pyproject.toml")["project"]
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    unique = {}
    for requirement in requirements:
        unique.setdefault(requirement_name(requirement), requirement)
    return list(unique.values())


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
        lines = ["Local processing needs these Python packages in Slicer's Python:", ""]
        if self.torch:
            lines.append(f"  - PyTorch ({self.torch}), through the PyTorch extension "
                         "(GPU build if an NVIDIA driver is found, else CPU; about 1-3 GB)")
        lines += [f"  - {requirement}" for requirement in self.pip]
        lines += ["", "This is done once and may take several minutes. Remote processing needs none of it."]
        return "\n".join(lines)


def plan_install(requirements: list[str] | None = None) -> InstallPlan:
    requirements = backend_requirements() if requirements is None else requirements
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


def _pip_ensure_function():
    """``pip_ensure`` of this Slicer (``slicer.packaging`` or ``slicer.pydeps``), or None."""
    for module_name in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure"):
            return module.pip_ensure
    return None


def install(plan: InstallPlan) -> None:
    """Carry out ``plan`` inside Slicer (blocking; the caller shows a wait cursor/progress)."""
    import slicer

    if plan.missing_from_slicer:
        raise RuntimeError(
            f"{', '.join(plan.missing_from_slicer)} should come with Slicer but cannot be imported: "
            "reinstall Slicer"
        )
    if plan.torch:
        try:
            import PyTorchUtils
        except ImportError as exc:
            raise RuntimeError(
                "the PyTorch extension is needed for local processing: install 'PyTorch' from the "
                "Extensions Manager, restart Slicer, and try again (or use Remote processing)"
            ) from exc
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=plan.torch)
        if torch is None:
            raise RuntimeError("PyTorch was not installed")
    if plan.pip:
        pip_ensure = _pip_ensure_function()
        if pip_ensure is not None:
            from packaging.requirements import Requirement

            pip_ensure([Requirement(r) for r in plan.pip], skip_packages=sorted(PROVIDED_BY_SLICER.values()),
                       requester="CTSliceInterp")
        else:  # Slicer before slicer.packaging: plain pip, one call
            slicer.util.pip_install(" ".join(f'"{r}"' for r in plan.pip))
    importlib.invalidate_caches()
    left = plan_install()
    if not left.empty:
        logging.warning("CTSliceInterp: still missing after installation: %s", left.describe())
