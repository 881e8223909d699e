"""The local backend: ``ctsliceinterp serve`` as a child process on 127.0.0.1.

Started once, on first local use, and kept warm between runs (the model stays loaded). It
listens on a free port chosen by the server (``--port 0``) and announces itself by writing
``{"url", "pid"}`` to a ready file; a random token, passed in the environment (never on the
command line, where other users could read it), keeps other local processes out. It is stopped,
with every process it started, when the module is cleaned up (application exit, module reload)
and, as a last resort, at interpreter exit. The server also watches this process (``--parent-pid``) and exits when it
ends, so a crashed Slicer leaves no server behind.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

from .backend_path import backend_source_dir, ensure_backend_importable

ensure_backend_importable()

from ctsliceinterp.api import METHODS  # noqa: E402 - the registry (numpy only): each method's model marker
from ctsliceinterp.core.errors import CTSliceInterpError  # noqa: E402
from ctsliceinterp.serving.access import TOKEN_ENV  # noqa: E402 - the variable the server reads

from .i18n import tr as _  # noqa: E402


class BackendError(CTSliceInterpError):
    """The local backend could not be started, or stopped unexpectedly."""


def default_python_executable() -> str:
    """Slicer's ``PythonSlicer`` launcher inside Slicer (it sets up library paths), else this
    interpreter."""
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        launcher = shutil.which("PythonSlicer")
        if launcher:
            return launcher
    return sys.executable


class LocalBackend:
    """One ``ctsliceinterp serve`` child process (with its own children). Thread-safe.

    Inside Slicer the child is the ``PythonSlicer`` launcher (CTKAppLauncher), which runs the
    real interpreter as *its* child; stopping only the launcher would leave the server running
    with its model in memory. So the child starts as the leader of a new process group (POSIX:
    a new session; Windows: a new process group), and ``stop`` stops the whole group (POSIX:
    ``killpg``; Windows: ``taskkill /T``)."""

    def __init__(self, python: str | None = None, models=(), device: str = "auto",
                 extra_args=(), startup_timeout: float = 180.0, environment: dict | None = None):
        self.python = python or default_python_executable()
        self.models = list(models)
        self.device = device
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.environment = dict(environment or {})
        self.token = secrets.token_urlsafe(32)
        self.url: str | None = None
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._log_file = None
        self._started_at = 0.0
        self._lock = threading.Lock()
        _LIVE_BACKENDS.add(self)

    # --- state -----------------------------------------------------------------------------
    @property
    def log_path(self) -> Path | None:
        return None if self._workdir is None else self._workdir / "server.log"

    @property
    def ready_file(self) -> Path | None:
        return None if self._workdir is None else self._workdir / "ready.json"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        command = [self.python, "-m", "ctsliceinterp.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--ready-file", str(self.ready_file), "--device", self.device,
                   "--parent-pid", str(os.getpid())]  # the server exits if Slicer dies
        for model in self.models:
            command += ["--model", str(model)]
        return command + self.extra_args

    def log_tail(self, lines: int = 15) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return ""
        text = path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    # --- start / stop ----------------------------------------------------------------------
    def start(self) -> None:
        """Launch the child (returns at once); ``poll_ready`` / ``wait_ready`` tell when it listens."""
        with self._lock:
            if self.is_running():
                return
            if self.process is not None:  # a crashed child: stop what is left of its group, drop its log
                _stop_process_tree(self.process, timeout=2.0)
                self.process = None
            self._cleanup_files()
            self.url = None
            self._workdir = Path(tempfile.mkdtemp(prefix="ctsliceinterp-backend-"))
            env = dict(os.environ)
            env.update(self.environment)
            env[TOKEN_ENV] = self.token
            env.setdefault("PYTHONUNBUFFERED", "1")
            source = backend_source_dir()
            if source is not None:
                env["PYTHONPATH"] = os.pathsep.join([str(source)] + [p for p in [env.get("PYTHONPATH")] if p])
            self._log_file = open(self.log_path, "wb")
            if sys.platform.startswith("win"):
                kwargs = {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)
                          | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
            else:
                kwargs = {"start_new_session": True}  # its own process group: stopped as a whole
            try:
                self.process = subprocess.Popen(
                    self.command(), env=env, stdin=subprocess.DEVNULL, stdout=self._log_file,
                    stderr=subprocess.STDOUT, cwd=str(self._workdir), **kwargs,
                )
            except OSError as exc:
                raise BackendError(_("could not start the local backend ({python}): {error}").format(
                    python=self.python, error=exc)) from exc
            self._started_at = time.monotonic()

    def poll_ready(self) -> bool:
        """True once the server listens, False while it starts. Raises ``BackendError`` if it
        exited, was stopped, or did not listen within ``startup_timeout``."""
        process = self.process
        if process is None:
            raise BackendError(_("the local backend was stopped before it was ready"))
        if self.url is not None and process.poll() is None:
            return True
        code = process.poll()
        if code is not None:
            raise BackendError(_("the local backend exited during start-up (exit code {code}).").format(code=code)
                               + "\n" + self.log_tail())
        ready = self.ready_file
        if ready is not None and ready.exists():
            try:
                info = json.loads(ready.read_text())
            except (OSError, ValueError):
                return False  # written atomically by the server; a partial read is retried
            self.url = str(info["url"]).rstrip("/")
            return True
        if time.monotonic() - self._started_at > self.startup_timeout:
            log = self.log_tail()
            self.stop()
            raise BackendError(_("the local backend did not start within {seconds:.0f} s.").format(
                seconds=self.startup_timeout) + "\n" + log)
        return False

    def wait_ready(self, cancel: threading.Event | None = None, interval: float = 0.1) -> str:
        """Block until the server listens (at most ``startup_timeout``; ``cancel`` stops waiting)."""
        cancel = cancel or threading.Event()
        while not self.poll_ready():
            if cancel.wait(interval):
                raise BackendError(_("cancelled while the local backend was starting"))
        return self.url

    def ensure_started(self, cancel: threading.Event | None = None) -> str:
        """Start if needed and wait until it listens; return its URL (blocking: worker threads)."""
        if cancel is not None and cancel.is_set():
            raise BackendError(_("cancelled while the local backend was starting"))
        if not self.is_running():
            self.start()
        return self.wait_ready(cancel)

    def crash_message(self) -> str | None:
        """A message if the child has died (None while it runs or before it was started)."""
        if self.process is None or self.process.poll() is None:
            return None
        return (_("the local backend stopped unexpectedly (exit code {code}); it will be restarted on the next "
                  "run.").format(code=self.process.returncode) + "\n" + self.log_tail())

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the child and everything it started (terminate, then kill after ``timeout`` s),
        and remove its files."""
        with self._lock:
            process, self.process = self.process, None
            self.url = None
            if process is not None:
                _stop_process_tree(process, timeout)
            self._cleanup_files()

    def _cleanup_files(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        # Keep the work folder of a crashed child until the next start, for its log.
        if self._workdir is not None and self.process is None:
            shutil.rmtree(self._workdir, ignore_errors=True)  # never abort a reload over a leftover file
            if self._workdir.exists():
                logging.warning("CTSliceInterp: could not remove %s", self._workdir)
            self._workdir = None


def _stop_process_tree(process: subprocess.Popen, timeout: float) -> None:
    """Terminate ``process`` and its descendants (its process group), then kill what is left."""
    if sys.platform.startswith("win"):
        # A windowless console process ignores a polite taskkill; /T takes the launcher's children.
        if process.poll() is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                logging.warning("CTSliceInterp: the local backend (pid %d) did not stop", process.pid)
        return
    group = process.pid  # start_new_session: the child leads its own group
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, signal_number)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None and not _group_alive(group):
                return
            time.sleep(0.05)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        logging.warning("CTSliceInterp: the local backend (pid %d) did not stop", process.pid)


def _group_alive(group: int) -> bool:
    """Whether any live (not zombie) process is left in process group ``group``."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


_LIVE_BACKENDS: "weakref.WeakSet[LocalBackend]" = weakref.WeakSet()


@atexit.register
def _stop_all_backends() -> None:
    for backend in list(_LIVE_BACKENDS):
        try:
            backend.stop(timeout=2.0)
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


MODELS_ENVIRONMENT_VARIABLE = "CTSLICEINTERP_MODELS"


def is_model_folder(folder: Path) -> bool:
    """True when ``folder`` holds a learned method's checkpoint file (``Method.checkpoint_file``)."""
    return any((folder / m.checkpoint_file).is_file() for m in METHODS.values() if m.checkpoint_file)


def local_model_specs() -> list[str]:
    """Models the local backend serves: those shipped in the bundled package
    (``ctsliceinterp/models/weights/<name>/``, each method's that is installed; a shipped model
    whose weights are absent is skipped) and the checkpoint folders listed in
    ``$CTSLICEINTERP_MODELS`` (separated by the OS path separator). Found without importing torch."""
    specs = []
    source = backend_source_dir()
    weights = None if source is None else source / "ctsliceinterp" / "models" / "weights"
    if weights is not None and weights.is_dir():
        specs += [str(folder) for folder in sorted(weights.iterdir()) if is_model_folder(folder)]
    for folder in os.environ.get(MODELS_ENVIRONMENT_VARIABLE, "").split(os.pathsep):
        if folder.strip() and is_model_folder(Path(folder.strip()).expanduser()):
            specs.append(str(Path(folder.strip()).expanduser()))
    return specs


_SHARED: LocalBackend | None = None


def shared_local_backend() -> LocalBackend:
    """The one warm local backend of this Slicer session (GUI and console share it)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = LocalBackend(models=local_model_specs())
    return _SHARED


def stop_shared_local_backend() -> None:
    if _SHARED is not None:
        _SHARED.stop()
