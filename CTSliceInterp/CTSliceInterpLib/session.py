"""One interpolation job, run off the GUI thread and polled from a timer.

A worker thread does everything that may wait: starting the local backend, encoding and
uploading the volume, polling the job, downloading the result. The GUI thread only calls
``poll()`` (a snapshot under a lock, never I/O) and, once ``state == "done"``, reads
``result``; MRML nodes are made by the caller on the GUI thread. ``cancel()`` returns at once;
the worker cancels the server job and ends in ``"cancelled"``.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .backend_path import ensure_backend_importable

ensure_backend_importable()

from ctsliceinterp.core.errors import CTSliceInterpError, InputError  # noqa: E402
from ctsliceinterp.core.volume import Geometry, Volume  # noqa: E402

from .local_backend import BackendError, LocalBackend  # noqa: E402

FINAL_STATES = ("done", "failed", "cancelled")


def _client_module():
    from ctsliceinterp.serving import client  # imported on use: numpy + standard library only

    return client


@dataclass(frozen=True)
class SessionStatus:
    state: str  # starting | uploading | queued | running | downloading | done | failed | cancelled
    progress: float  # 0..1
    message: str  # one line for the status box
    error: Optional[str] = None
    elapsed: float = 0.0

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


def check_ca_file(path: str) -> str:
    """The absolute path of a CA certificate file (PEM) that TLS can load.

    Raises ``InputError`` naming the file when it is missing or unusable, so the user hears
    about it before anything is sent (``ssl`` itself says "No such file or directory" or
    "[X509] PEM lib" without naming the file)."""
    full = os.path.abspath(os.path.expanduser(path.strip()))
    if not os.path.isfile(full):
        problem = "is a folder, not a file" if os.path.isdir(full) else "does not exist"
        raise InputError(f"the CA certificate file {path} {problem}")
    try:
        ssl.create_default_context(cafile=full)
    except ssl.SSLError as exc:
        detail = f" ({exc.reason.replace('_', ' ').lower()})" if exc.reason else ""
        raise InputError(
            f"the CA certificate file {path} holds no usable PEM certificate{detail}: choose the server's "
            "certificate or its CA in PEM format (text starting with -----BEGIN CERTIFICATE-----; convert a "
            "DER file with: openssl x509 -inform der -in cert.cer -out cert.pem)"
        ) from None
    except OSError as exc:
        raise InputError(f"the CA certificate file {path} cannot be read: {exc.strerror or exc}") from None
    return full


@dataclass
class ServerTarget:
    """Where to run: a local backend (started on demand) or a remote URL with its token and,
    for a self-signed or private-CA certificate, the CA file to trust."""

    url: Optional[str] = None
    token: Optional[str] = None
    local: Optional[LocalBackend] = None
    timeout: float = 30.0
    ca_file: Optional[str] = None

    @property
    def description(self) -> str:
        return "the local backend" if self.local is not None else f"the server at {self.url}"

    def connect(self, cancel: Optional[threading.Event] = None):
        """A ``ctsliceinterp.serving.client.Client`` for this target (blocking: starts the local backend
        if needed)."""
        client_module = _client_module()
        if self.local is not None:
            url = self.local.ensure_started(cancel)
            return client_module.Client(url, token=self.local.token, timeout=self.timeout)
        if not self.url:
            raise client_module.ServerUnreachable("no server URL given for remote processing")
        ca_file = check_ca_file(self.ca_file) if self.ca_file else None  # it may have changed since it was chosen
        return client_module.Client(self.url, token=self.token or None, timeout=self.timeout, ca_file=ca_file)


def describe_error(exc: BaseException, target: ServerTarget) -> str:
    """A message a radiologist can act on, for any failure of a session."""
    client_module = _client_module()
    if isinstance(exc, BackendError):  # start-up failures say so, with the server's log
        return str(exc)
    if target.local is not None:
        crash = target.local.crash_message()
        if crash is not None:
            return crash
    if isinstance(exc, client_module.AuthenticationFailed):
        where = "the local backend" if target.local is not None else target.url
        return (f"{where} rejected the access token: check the token in the module's Remote settings "
                "(it is the one the server was started with)")
    if isinstance(exc, client_module.ServerUnreachable) and isinstance(exc.__context__, ssl.SSLCertVerificationError):
        # The client raises "from None"; the verification error it replaced is still the context.
        reason = exc.__context__.verify_message or exc.__context__.reason or "verification failed"
        if target.ca_file:
            return (f"the TLS certificate of {target.url} is not trusted by the CA certificate {target.ca_file} "
                    f"({reason}): choose the certificate the server was started with (--ssl-certfile) or the CA "
                    "that signed it")
        return (f"the TLS certificate of {target.url} is not trusted ({reason}). If the server uses a self-signed "
                "or private-CA certificate, choose that certificate (or its CA) as 'CA certificate' in the "
                "module's Remote settings (caFile= in Python)")
    if isinstance(exc, client_module.ServerUnreachable):
        return f"cannot reach {target.description}: {exc}. Check the URL, the network and that the server runs."
    if isinstance(exc, client_module.InputRejected):
        return f"the server refused the input: {getattr(exc, 'reason', None) or exc}"
    if isinstance(exc, client_module.JobFailed):
        return f"processing failed on {target.description}: {getattr(exc, 'reason', None) or exc}"
    if isinstance(exc, (BackendError, CTSliceInterpError)):
        return str(exc)
    return f"unexpected error: {type(exc).__name__}: {exc}"


@dataclass
class ProcessingSession:
    volume: Volume
    params: dict
    target: ServerTarget
    expected: Optional[Geometry] = None
    poll_interval: float = 0.5
    result: Optional[tuple] = None  # (thin Volume, uncertainty Volume or None) once done
    job_id: Optional[str] = None
    _state: str = "created"
    _progress: float = 0.0
    _message: str = ""
    _error: Optional[str] = None
    _started: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None
    _listeners: list = field(default_factory=list)

    # --- GUI-thread API -------------------------------------------------------------------
    def start(self) -> "ProcessingSession":
        self._started = time.monotonic()
        self._set("starting", 0.0, f"connecting to {self.target.description}")
        self._thread = threading.Thread(target=self._work, name="CTSliceInterpSession", daemon=True)
        self._thread.start()
        return self

    def poll(self) -> SessionStatus:
        with self._lock:
            return SessionStatus(self._state, self._progress, self._message, self._error,
                                 time.monotonic() - self._started if self._started else 0.0)

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: Optional[float] = None, progress: Optional[Callable[[SessionStatus], None]] = None,
             interval: float = 0.1) -> SessionStatus:
        """Block until finished (console and tests); ``progress`` gets each status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.poll()
            if progress is not None:
                progress(status)
            if status.finished:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the interpolation did not finish within {timeout} s")
            time.sleep(interval)

    # --- worker thread --------------------------------------------------------------------
    def _set(self, state=None, progress=None, message=None, error=None) -> None:
        with self._lock:
            if state is not None:
                self._state = state
            if progress is not None:
                self._progress = float(max(0.0, min(1.0, progress)))
            if message is not None:
                self._message = message
            if error is not None:
                self._error = error

    def _work(self) -> None:
        client_module = _client_module()
        client = None
        try:
            client = self.target.connect(self._cancel)
            if self._cancel.is_set():
                self._set("cancelled", message="cancelled")
                return
            self.job_id = self._submit(client, client_module)
            if self.job_id is None:
                return
            while True:
                if self._cancel.is_set():
                    self._cancel_job(client)
                    return
                # The server holds the answer up to poll_interval s until something changes.
                status = client.status(self.job_id, wait=self.poll_interval)
                state = status.get("state")
                if state == "done":
                    break
                if state == "failed":
                    raise client_module.JobFailed(status.get("error") or "the server reported a failure")
                if state == "cancelled":
                    self._set("cancelled", message="cancelled on the server")
                    return
                self._set(state if state in ("queued", "running") else "running",
                          status.get("progress") or 0.0, _describe_status(status))
            self._set("downloading", 1.0, "downloading the result")
            result = client.result(self.job_id)
            self.result = result
            self._set("done", 1.0, "done")
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a message for the GUI
            if self._cancel.is_set() and not isinstance(exc, client_module.JobFailed):
                if client is not None and self.job_id is not None:
                    self._cancel_job(client)
                else:
                    self._set("cancelled", message="cancelled")
                return
            logging.debug("CTSliceInterp session failed", exc_info=True)
            message = describe_error(exc, self.target)
            self._set("failed", message=message, error=message)

    def _submit(self, client, client_module):
        """Upload and create the job; waits (cancellably) while the server's queue is full."""
        while True:
            self._set("uploading", 0.0, f"sending the volume to {self.target.description}")
            try:
                return client.submit(self.volume, self.params)
            except client_module.ServerBusy as busy:
                self._set("queued", 0.0, f"the server is busy; trying again in {busy.retry_after:.0f} s")
                if self._cancel.wait(busy.retry_after):
                    self._set("cancelled", message="cancelled")
                    return None

    def _cancel_job(self, client) -> None:
        self._set(message="cancelling")
        try:
            client.cancel(self.job_id)
        except Exception:  # noqa: BLE001 - the job is abandoned either way
            logging.debug("cancel request failed", exc_info=True)
        self._set("cancelled", message="cancelled")


def _describe_status(status: dict) -> str:
    state = status.get("state", "running")
    if state == "queued":
        position = status.get("queue_position")
        return f"waiting in the server queue (position {position})" if position else "waiting in the server queue"
    text = f"{status.get('stage') or 'processing'} {100 * float(status.get('progress') or 0):.0f}%"
    eta = status.get("eta_seconds")
    if eta:
        text += f", about {float(eta):.0f} s left"
    return text
