"""The local backend's life: every wait ends (deadline, stop, cancel), nothing holds up the
interpreter's exit, and stopping it stops the whole process tree (inside Slicer the child is the
PythonSlicer launcher, which runs the real interpreter as its own child)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from CTSliceInterpLib.local_backend import BackendError, LocalBackend

MODULE_DIR = Path(__file__).resolve().parents[2] / "CTSliceInterp"
posix_only = pytest.mark.skipif(os.name != "posix", reason="process groups and /proc are POSIX")


def _never_ready(tmp_path) -> str:
    """A 'python' that starts and never listens (a backend stuck loading a model)."""
    script = tmp_path / "never-ready"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import time; time.sleep(600)'\n")
    script.chmod(0o755)
    return str(script)


def _wait_all(threads, timeout):
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t for t in threads if t.is_alive()]


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@posix_only
def test_two_waiters_on_a_backend_that_times_out_both_finish(tmp_path):
    """The first waiter's timeout stops the backend; the second must not wait forever."""
    backend = LocalBackend(python=_never_ready(tmp_path), startup_timeout=1.0)
    errors = []

    def wait():
        try:
            backend.ensure_started()
        except BackendError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=wait, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        assert _wait_all(threads, 15) == [], "a waiter is still waiting for a backend that timed out"
        assert len(errors) == 2 and any("did not start within 1 s" in e for e in errors), errors
    finally:
        backend.stop()


@posix_only
def test_stop_during_start_up_ends_the_wait(tmp_path):
    backend = LocalBackend(python=_never_ready(tmp_path), startup_timeout=600)
    errors = []
    waiter = threading.Thread(target=lambda: errors.append(_raised(backend.ensure_started)), daemon=True)
    waiter.start()
    time.sleep(0.5)
    backend.stop()  # module reload, Slicer quitting
    waiter.join(10)
    assert not waiter.is_alive(), "the wait went on after the backend was stopped"
    assert errors and "stopped" in errors[0]


@posix_only
def test_cancel_ends_the_wait(tmp_path):
    backend = LocalBackend(python=_never_ready(tmp_path), startup_timeout=600)
    cancel = threading.Event()
    errors = []
    waiter = threading.Thread(target=lambda: errors.append(_raised(backend.ensure_started, cancel)), daemon=True)
    waiter.start()
    time.sleep(0.3)
    cancel.set()
    waiter.join(5)
    try:
        assert not waiter.is_alive() and "cancelled" in errors[0]
    finally:
        backend.stop()


def _raised(function, *args) -> str:
    try:
        function(*args)
    except BackendError as exc:
        return str(exc)
    return ""


@posix_only
def test_quitting_while_the_model_list_waits_for_the_backend_does_not_hang(tmp_path):
    """Slicer quits (or the module reloads) while Refresh is starting the local backend: the
    interpreter exits at once, and the backend's processes are gone."""
    pid_file = tmp_path / "backend.pid"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(MODULE_DIR)!r})
        from CTSliceInterpLib import logic
        from CTSliceInterpLib.local_backend import LocalBackend
        backend = LocalBackend(python={_never_ready(tmp_path)!r}, startup_timeout=600)
        interp = logic.InterpolationLogic(scene=object(), local_backend_factory=lambda: backend)
        query = interp.startAvailableMethods()
        while backend.pid is None:
            time.sleep(0.05)
        open({str(pid_file)!r}, "w").write(str(backend.pid))
        time.sleep(0.5)
        print("exiting", flush=True)
    """)
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 30
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the backend outlived the interpreter that started it"


@posix_only
def test_stop_stops_the_server_behind_a_launcher(tmp_path):
    """Like PythonSlicer (CTKAppLauncher): the launcher runs the real interpreter as its child
    and waits for it. ``stop`` must stop that child too, not only the launcher."""
    pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn) is not installed")
    pytest.importorskip("uvicorn", reason="the server extra (fastapi, uvicorn) is not installed")
    launcher = tmp_path / "PythonSlicer"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A child, not exec. It runs in another folder: a server whose working folder (the backend's
    # temporary folder) is deleted happens to exit on Linux; only a real stop may end it here.
    launcher.write_text(f'#!/bin/sh\ncd "{elsewhere}"\n"{sys.executable}" "$@"\nexit $?\n')
    launcher.chmod(0o755)
    backend = LocalBackend(python=str(launcher), device="cpu", startup_timeout=120,
                           environment={"OMP_NUM_THREADS": "1"})
    try:
        backend.ensure_started()
        server_pid = json.loads(backend.ready_file.read_text())["pid"]
        assert server_pid != backend.pid  # the server is the launcher's child
        assert _alive(server_pid)
        workdir = backend.ready_file.parent
    finally:
        backend.stop()
    deadline = time.monotonic() + 10
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server_pid), "the server behind the launcher is still running"
    assert not workdir.exists()
