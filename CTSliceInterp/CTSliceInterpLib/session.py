"""One interpolation job, run off the GUI thread and polled from a timer.

A worker thread does everything that may wait: starting the local backend, then
``Client.run`` (upload, busy-retry, long-poll, download; the client's one job loop). The GUI
thread only calls ``poll()`` (a snapshot under a lock, never I/O) and, once
``state == "done"``, reads ``result``; MRML nodes are made by the caller on the GUI thread.
``cancel()`` returns at once; the worker cancels the server job and ends in ``"cancelled"``, also
when the cancel comes while the result downloads (the result is then dropped).
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

from .i18n import tr as _  # noqa: E402
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
        if os.path.isdir(full):
            raise InputError(_("the CA certificate file {path} is a folder, not a file").format(path=path))
        raise InputError(_("the CA certificate file {path} does not exist").format(path=path))
    try:
        ssl.create_default_context(cafile=full)
    except ssl.SSLError as exc:
        detail = f" ({exc.reason.replace('_', ' ').lower()})" if exc.reason else ""
        raise InputError(_(
            "the CA certificate file {path} holds no usable PEM certificate{detail}: choose the server's "
            "certificate or its CA in PEM format (text starting with -----BEGIN CERTIFICATE-----; convert a "
            "DER file with: openssl x509 -inform der -in cert.cer -out cert.pem)").format(path=path, detail=detail)
        ) from None
    except OSError as exc:
        raise InputError(_("the CA certificate file {path} cannot be read: {error}").format(
            path=path, error=exc.strerror or exc)) from None
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
        return _("the local backend") if self.local is not None else _("the server at {url}").format(url=self.url)

    def connect(self, cancel: Optional[threading.Event] = None):
        """A ``ctsliceinterp.serving.client.Client`` for this target (blocking: starts the local backend
        if needed)."""
        client_module = _client_module()
        if self.local is not None:
            url = self.local.ensure_started(cancel)
            return client_module.Client(url, token=self.local.token, timeout=self.timeout)
        if not self.url:
            raise client_module.ServerUnreachable(_("no server URL given for remote processing"))
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
        return _("{where} rejected the access token: check the token in the module's Remote settings "
                 "(it is the one the server was started with)").format(
            where=_("the local backend") if target.local is not None else target.url)
    if isinstance(exc, client_module.ServerUnreachable) and isinstance(exc.__context__, ssl.SSLCertVerificationError):
        # The client raises "from None"; the verification error it replaced is still the context.
        reason = exc.__context__.verify_message or exc.__context__.reason or _("verification failed")
        if target.ca_file:
            return _("the TLS certificate of {url} is not trusted by the CA certificate {ca_file} ({reason}): choose "
                     "the certificate the server was started with (--ssl-certfile) or the CA that signed it").format(
                url=target.url, ca_file=target.ca_file, reason=reason)
        return _("the TLS certificate of {url} is not trusted ({reason}). If the server uses a self-signed or "
                 "private-CA certificate, choose that certificate (or its CA) as 'CA certificate' in the module's "
                 "Remote settings (caFile= in Python)").format(url=target.url, reason=reason)
    if isinstance(exc, client_module.ServerUnreachable):
        return _("cannot reach {where}: {error}. Check the URL, the network and that the server runs.").format(
            where=target.description, error=exc)
    if isinstance(exc, client_module.InputRejected):
        return _("the server refused the input: {reason}").format(reason=getattr(exc, "reason", None) or exc)
    if isinstance(exc, client_module.JobFailed):
        return _("processing failed on {where}: {reason}").format(
            where=target.description, reason=getattr(exc, "reason", None) or exc)
    if isinstance(exc, (BackendError, CTSliceInterpError)):
        return str(exc)
    return _("unexpected error: {kind}: {error}").format(kind=type(exc).__name__, error=exc)


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

    # --- GUI-thread API -------------------------------------------------------------------
    def start(self) -> "ProcessingSession":
        self._started = time.monotonic()
        self._set("starting", 0.0, _("connecting to {where}").format(where=self.target.description))
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
        try:
            client = self.target.connect(self._cancel)
            result = client.run(self.volume, self.params, progress=self._on_progress, cancel=self._cancel,
                                poll_interval=self.poll_interval)
            if self._cancel.is_set():  # cancelled while the result came down: drop it
                self._set("cancelled", message=_("cancelled"))
                return
            self.result = result
            self._set("done", 1.0, _("done"))
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a message for the GUI
            if self._cancel.is_set() and not isinstance(exc, client_module.JobFailed):
                self._set("cancelled", message=_("cancelled"))
                return
            if isinstance(exc, client_module.JobCancelled):
                self._set("cancelled", message=_("cancelled on the server"))
                return
            logging.debug("CTSliceInterp session failed", exc_info=True)
            message = describe_error(exc, self.target)
            self._set("failed", message=message, error=message)

    def _on_progress(self, event) -> None:
        """A ``JobProgress`` from ``Client.run``: the state, the bar and a translated line."""
        if event.job_id:
            self.job_id = event.job_id
        progress = {"uploading": 0.0, "downloading": 1.0, "done": 1.0}.get(event.state, event.fraction)
        # Only _work ends a session (it sets ``result`` first): the client's own "done" is still
        # "downloading" here, or the GUI could finish a run whose result is not yet stored.
        state = event.state if event.state in PROGRESS_STATES else "downloading" if event.state == "done" else "running"
        self._set(state, progress, describe_progress(event, self.target))


PROGRESS_STATES = ("uploading", "queued", "running", "downloading")  # what Client.run reports before the end


def describe_progress(event, target: ServerTarget) -> str:
    """One status line for a ``JobProgress`` (made here, from its fields, so it is translated)."""
    if event.state == "uploading":
        return _("sending the volume to {where}").format(where=target.description)
    if event.state == "queued" and event.stage == "busy":
        return _("the server is busy; trying again shortly")
    if event.state == "queued":
        if event.queue_position:
            text = _("waiting in the server queue (position {position})").format(position=event.queue_position)
        else:
            text = _("waiting in the server queue")
    elif event.state == "downloading":
        return _("downloading the result")
    elif event.state == "done":
        return _("done")
    else:
        text = _("{stage} {percent:.0f}%").format(stage=event.stage or _("processing"), percent=100 * event.fraction)
    if event.eta_seconds:
        text += _(", about {seconds:.0f} s left").format(seconds=event.eta_seconds)
    return text
