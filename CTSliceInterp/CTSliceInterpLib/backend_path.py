"""Where the bundled backend (the ``ctsliceinterp`` package) lives.

The extension ships the whole ``Backend/`` project as a module resource
(``Resources/Backend``, copied by ``CTSliceInterp/CMakeLists.txt``). In a source checkout used
through "Additional module paths" it is ``../Backend`` next to this module. The light parts of
the package (``volume``, ``grid``, ``client``, ``errors``: numpy and the standard library only)
are imported from there directly, so Remote processing needs no installation at all; the local
server runs from the same source with ``PYTHONPATH`` pointing at it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]
ENVIRONMENT_VARIABLE = "CTSLICEINTERP_BACKEND"


def backend_project_dir() -> Path | None:
    """The folder holding the backend's ``pyproject.toml`` and ``src/``, or None."""
    candidates = []
    if os.environ.get(ENVIRONMENT_VARIABLE):
        candidates.append(Path(os.environ[ENVIRONMENT_VARIABLE]).expanduser())
    candidates += [MODULE_DIR / "Resources" / "Backend", MODULE_DIR.parent / "Backend"]
    for candidate in candidates:
        if (candidate / "src" / "ctsliceinterp" / "__init__.py").is_file():
            return candidate
    return None


def backend_source_dir() -> Path | None:
    project = backend_project_dir()
    return None if project is None else project / "src"


def ensure_backend_importable() -> None:
    """Make ``import ctsliceinterp`` use the bundled source (unless it is already imported)."""
    if "ctsliceinterp" in sys.modules:
        return
    source = backend_source_dir()
    if source is not None and str(source) not in sys.path:
        sys.path.insert(0, str(source))
    try:
        import ctsliceinterp  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "the CTSliceInterp backend sources are missing: expected them in "
            f"{MODULE_DIR / 'Resources' / 'Backend'} (extension build) or {MODULE_DIR.parent / 'Backend'} "
            f"(source checkout), or set {ENVIRONMENT_VARIABLE} to the Backend folder"
        ) from exc
