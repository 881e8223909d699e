"""Slicer 5.8 runs Python 3.9.10 (``Slicer_REQUIRED_PYTHON_VERSION`` in Slicer's top CMakeLists.txt
at v5.8.0 and v5.8.1) without ``tomli``; 5.10 and 5.12 run 3.12.10. The module, its Lib and the
backend modules the Lib imports must load there (Remote processing works on 5.8), and local
processing must be refused with a message naming the Slicer it needs, not a traceback.

Two halves: an ``ast`` check that always runs (CTSliceInterpStaticCheck.python39_problems), and
the real thing under a Python 3.9 interpreter where one is found (pyenv, ``python3.9`` on PATH
or ``$CTSLICEINTERP_PYTHON39``); CI machines without one skip it with that reason."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_static import _static_check

MODULE_DIR = Path(__file__).resolve().parents[2] / "CTSliceInterp"
BACKEND = MODULE_DIR.parent / "Backend"
BACKEND_SOURCE = BACKEND / "src"


def _module_files():
    return [MODULE_DIR / "CTSliceInterp.py", *sorted((MODULE_DIR / "CTSliceInterpLib").glob("*.py")),
            *sorted((MODULE_DIR / "Testing" / "Python").glob("*.py"))]


def _files_slicer_58_loads():
    check = _static_check()
    return _module_files() + check.imported_backend_modules(_module_files(), BACKEND_SOURCE.resolve())


def _python39():
    candidates = [os.environ.get("CTSLICEINTERP_PYTHON39"), shutil.which("python3.9"),
                  *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))]
    for candidate in filter(None, candidates):
        try:
            out = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
                                 capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.stdout.strip() == "True":
            return candidate
    pytest.skip("no Python 3.9 interpreter here (pyenv, python3.9 or $CTSLICEINTERP_PYTHON39): "
                "the ast check in test_no_newer_python_features_than_slicer_58 still runs")


def test_backend_modules_the_lib_loads_are_found():
    names = {p.relative_to(BACKEND_SOURCE.resolve()).as_posix() for p in
             _static_check().imported_backend_modules(_module_files(), BACKEND_SOURCE.resolve())}
    # The client and what it needs (Remote processing), found through relative imports too.
    assert any("/client" in name for name in names), names
    assert any(name.endswith("/volume.py") for name in names), names
    assert "ctsliceinterp/__init__.py" in names


def test_no_newer_python_features_than_slicer_58():
    problems = [problem for path in _files_slicer_58_loads() for problem in _static_check().python39_problems(path)]
    assert problems == []


def test_the_python39_check_finds_each_kind_of_problem(tmp_path):
    check = _static_check()
    cases = {
        "match.py": "match x:\n    case 1:\n        pass\n",
        "with.py": "with (open('a') as a, open('b') as b):\n    pass\n",
        "annotation.py": "def f(x: int | None) -> None:\n    pass\n",
        "isinstance.py": "ok = isinstance(1, int | str)\n",
        "zip.py": "pairs = list(zip([1], [2], strict=True))\n",
        "dataclass.py": "from dataclasses import dataclass\n@dataclass(slots=True)\nclass A:\n    x: int = 0\n",
        "tomllib.py": "import tomllib\n",
        "pairwise.py": "from itertools import pairwise\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        assert check.python39_problems(tmp_path / name), name
    fine = tmp_path / "fine.py"
    fine.write_text("from __future__ import annotations\n\ndef f(x: int | None) -> None:\n    pass\n\n"
                    "try:\n    import tomllib\nexcept ImportError:\n    tomllib = None\n"
                    "with open(__file__) as a, open(__file__) as b:\n    pass\n")
    assert check.python39_problems(fine) == []


def test_everything_slicer_58_loads_compiles_under_python39():
    python = _python39()
    files = [str(p) for p in _files_slicer_58_loads()]
    script = ("import sys\nbad = []\nfor path in sys.argv[1:]:\n"
              "    try:\n        compile(open(path, encoding='utf-8').read(), path, 'exec', dont_inherit=True)\n"
              "    except SyntaxError as exc:\n        bad.append(f'{path}:{exc.lineno}: {exc.msg}')\n"
              "print('\\n'.join(bad))\nsys.exit(1 if bad else 0)\n")
    out = subprocess.run([python, "-c", script, *files], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_slicer_58_is_told_which_slicer_local_processing_needs():
    """On Python 3.9 without tomli: the installer reads the bundled pyproject.toml (the same
    fields tomllib reads here) and refuses local processing with one clear message."""
    python = _python39()
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(MODULE_DIR)!r})\n"
        "from CTSliceInterpLib import installer\n"
        "try:\n    installer.plan_install()\n    message = None\n"
        "except installer.LocalProcessingUnavailable as exc:\n    message = str(exc)\n"
        "fields = installer.read_project_fields(installer._pyproject(None))\n"
        "print(json.dumps({'fields': fields, 'message': message, 'tomli': 'tomli' in sys.modules}))\n"
    )
    env = {**os.environ, "CTSLICEINTERP_BACKEND": str(BACKEND)}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([python, "-I", "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    project = _tomllib().loads((BACKEND / "pyproject.toml").read_text())["project"]
    assert answer["fields"]["dependencies"] == project["dependencies"]
    assert answer["fields"]["optional-dependencies"] == project["optional-dependencies"]
    assert answer["fields"]["requires-python"] == project["requires-python"]
    if _requires_python_excludes_39(project["requires-python"]):
        assert answer["message"] and "3D Slicer 5.10 or later" in answer["message"], answer
        assert "Remote processing" in answer["message"] and "3.9" in answer["message"]
    else:
        assert answer["message"] is None, answer


def _tomllib():
    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest brings tomli
        import tomli as tomllib
    return tomllib


def _requires_python_excludes_39(specifier: str) -> bool:
    sys.path.insert(0, str(MODULE_DIR))
    from CTSliceInterpLib import installer

    return not installer.python_satisfies(specifier, (3, 9, 10))


def test_remote_processing_runs_on_python39(tmp_path):
    """Remote processing as on Slicer 5.8: the Lib's request, session and client on a real
    Python 3.9 (with numpy 1.26, Slicer 5.8's) against a real server, B-spline, and the result
    on the requested grid. Needs a Python 3.9 that has numpy (e.g. a venv in
    $CTSLICEINTERP_PYTHON39); skipped otherwise."""
    pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn) is not installed")
    python = _python39()
    if subprocess.run([python, "-c", "import numpy"], capture_output=True).returncode != 0:
        pytest.skip(f"{python} has no numpy (point $CTSLICEINTERP_PYTHON39 at a Python 3.9 with numpy)")
    from CTSliceInterpLib.local_backend import LocalBackend

    server = LocalBackend(python=sys.executable, device="cpu", startup_timeout=120,
                          environment={"OMP_NUM_THREADS": "1"})
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(MODULE_DIR)!r})\n"
        "from CTSliceInterpLib import logic, testing\n"
        "from CTSliceInterpLib.session import ProcessingSession, ServerTarget\n"
        "from ctsliceinterp.core.grid import thin_grid\n"
        "volume = testing.synthetic_thick_volume()\n"
        "target = thin_grid(volume.geometry, 1.0)\n"
        "session = ProcessingSession(volume, logic.job_parameters('bspline', 1.0),\n"
        "                            ServerTarget(url=sys.argv[1], token=sys.argv[2]), expected=target).start()\n"
        "status = session.wait(timeout=120)\n"
        "thin = session.result[0] if session.result else None\n"
        "print(json.dumps({'state': status.state, 'error': status.error, 'python': sys.version.split()[0],\n"
        "                  'same_grid': thin is not None and thin.shape == target.shape\n"
        "                      and bool((abs(thin.geometry.affine - target.affine) < 1e-6).all())}))\n"
    )
    env = {**os.environ, "CTSLICEINTERP_BACKEND": str(BACKEND)}
    env.pop("PYTHONPATH", None)
    try:
        url = server.ensure_started()
        out = subprocess.run([python, "-c", script, url, server.token], capture_output=True, text=True,
                             timeout=180, env=env)
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["python"].startswith("3.9") and answer["state"] == "done", answer
    assert answer["same_grid"], answer
