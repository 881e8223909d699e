"""The local backend: ``ctsliceinterp serve`` as a child process on 127.0.0.1.

Started once, on first local use, and kept warm between runs (the model stays loaded). It
listens on a free port chosen by the server (``--port 0``) and announces itself by writing
``{"url", "pid"}`` to a ready file; a random token, passed in the environment (never on the
command line, where other users could read it), keeps other local processes out. It is stopped
when the module is cleaned up (application exit, module reload) and, as a last resort, at
interpreter exit. The server also watches this process (``--parent-pid``) and exits when it
ends, so a crashed Slicer leaves no server behind.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

from .backend_path import backend_source_dir, ensure_backend_importable

ensure_backend_importable()

from ctsliceinterp.core.errors import CTSliceInterpError  # noqa: E402

TOKEN_ENVIRONMENT_VARIABLE = "CTSLICEINTERP_TOKEN"


class BackendError(CTSliceInterpError):
    """The local backend could not be started, or stopped unexpectedly."""


def default_python_executable() -> str:
    """Slicer's ``PythonSlicer`` launcher inside Slicer (it sets up library paths), else this
    interpreter."""
    import shutil

    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        launcher = shutil.which("PythonSlicer")
        if launcher:
            return launcher
    return sys.executable


class LocalBackend:
    """One ``ctsliceinterp serve`` child process. Thread-safe ``ensure_started``."""

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
        self._workdir: tempfile.TemporaryDirectory | None = None
        self._log_file = None
        self._lock = threading.Lock()
        _LIVE_BACKENDS.add(self)

    # --- state -----------------------------------------------------------------------------
    @property
    def log_path(self) -> Path | None:
        return None if self._workdir is None else Path(self._workdir.name) / "server.log"

    @property
    def ready_file(self) -> Path | None:
        return None if self._workdir is None else Path(self._workdir.name) / "ready.json"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def is_ready(self) -> bool:
        return self.is_running() and self.url is not None

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
            self.process = None  # a crashed child: its log goes with its folder now
            self._cleanup_files()
            self.url = None
            self._workdir = tempfile.TemporaryDirectory(prefix="ctsliceinterp-backend-")
            env = dict(os.environ)
            env.update(self.environment)
            env[TOKEN_ENVIRONMENT_VARIABLE] = self.token
            env.setdefault("PYTHONUNBUFFERED", "1")
            source = backend_source_dir()
            if source is not None:
                env["PYTHONPATH"] = os.pathsep.join([str(source)] + [p for p in [env.get("PYTHONPATH")] if p])
            self._log_file = open(self.log_path, "wb")
            kwargs = {}
            if sys.platform.startswith("win"):
                kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
            try:
                self.process = subprocess.Popen(
                    self.command(), env=env, stdin=subprocess.DEVNULL, stdout=self._log_file,
                    stderr=subprocess.STDOUT, cwd=self._workdir.name, **kwargs,
                )
            except OSError as exc:
                raise BackendError(f"could not start the local backend ({self.python}): {exc}") from exc
            self._started_at = time.monotonic()

    def poll_ready(self) -> bool:
        """True once the server listens. Raises ``BackendError`` if it exited or timed out."""
        if self.url is not None and self.is_running():
            return True
        if self.process is None:
            return False
        code = self.process.poll()
        if code is not None:
            raise BackendError(f"the local backend exited during start-up (exit code {code}).\n{self.log_tail()}")
        ready = self.ready_file
        if ready is not None and ready.exists():
            try:
                info = json.loads(ready.read_text())
            except (OSError, ValueError):
                return False  # written atomically by the server; a partial read is retried
            self.url = str(info["url"]).rstrip("/")
            return True
        if time.monotonic() - self._started_at > self.startup_timeout:
            self.stop()
            raise BackendError(
                f"the local backend did not start within {self.startup_timeout:.0f} s.\n{self.log_tail()}"
            )
        return False

    def wait_ready(self, cancel: threading.Event | None = None, interval: float = 0.1) -> str:
        while not self.poll_ready():
            if cancel is not None and cancel.is_set():
                raise BackendError("cancelled while the local backend was starting")
            time.sleep(interval)
        return self.url

    def ensure_started(self, cancel: threading.Event | None = None) -> str:
        """Start if needed and wait until it listens; return its URL (blocking: worker threads)."""
        if not self.is_running():
            self.start()
        return self.wait_ready(cancel)

    def crash_message(self) -> str | None:
        """A message if the child has died (None while it runs or before it was started)."""
        if self.process is None or self.process.poll() is None:
            return None
        return (f"the local backend stopped unexpectedly (exit code {self.process.returncode}); "
                f"it will be restarted on the next run.\n{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the child (then kill it if it does not exit) and remove its files."""
        with self._lock:
            process, self.process = self.process, None
            self.url = None
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout)
            self._cleanup_files()

    def _cleanup_files(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        # Keep the work folder of a crashed child until the next start, for its log.
        if self._workdir is not None and self.process is None:
            self._workdir.cleanup()
            self._workdir = None


_LIVE_BACKENDS: "weakref.WeakSet[LocalBackend]" = weakref.WeakSet()


@atexit.register
def _stop_all_backends() -> None:
    for backend in list(_LIVE_BACKENDS):
        try:
            backend.stop(timeout=2.0)
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


MODELS_ENVIRONMENT_VARIABLE = "CTSLICEINTERP_MODELS"


def local_model_specs() -> list[str]:
    """Models the local backend serves: those shipped in the bundled package
    (``ctsliceinterp/models/weights/<name>/model.json``) and the checkpoint folders listed in
    ``$CTSLICEINTERP_MODELS`` (separated by the OS path separator). Found without importing torch."""
    specs = []
    source = backend_source_dir()
    weights = None if source is None else source / "ctsliceinterp" / "models" / "weights"
    if weights is not None and weights.is_dir():
        specs += [str(folder) for folder in sorted(weights.iterdir()) if (folder / "model.json").is_file()]
    for folder in os.environ.get(MODELS_ENVIRONMENT_VARIABLE, "").split(os.pathsep):
        if folder.strip() and (Path(folder.strip()).expanduser() / "model.json").is_file():
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
