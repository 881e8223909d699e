"""Client for the CTSliceInterp server: the standard library and numpy only.

It runs in Slicer's Python as is (no torch, SimpleITK or requests). Every method is one short
HTTP request with a timeout, so a GUI can call ``submit``/``status``/``result``/``cancel`` from
a timer without blocking; ``run`` is the blocking convenience for scripts and the CLI.

Only geometry and voxels leave the machine: ``volume_to_nrrd_bytes`` writes no metadata
(DICOM tags and patient identifiers stay local, and ``interpolate_remote`` puts them back on the
result).

    client = Client("https://gpu-host:8000", token=open("token").read().strip())
    thin, uncertainty = client.run(thick, {"method": "bspline", "spacing": 1.0})
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import json
import os
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..core.errors import Cancelled, CTSliceInterpError, InputError
from .nrrd_bytes import geometry_to_dict, volume_from_nrrd_bytes, volume_to_nrrd_parts
from ..core.progress import ProgressEvent
from ..core.volume import Geometry, Volume

TOKEN_ENV = "CTSLICEINTERP_TOKEN"
PARAMS_HEADER = "X-CTSliceInterp-Params"
API = "/v1"
USER_AGENT = "ctsliceinterp-client"
# Bodies at least this large are read into a numpy buffer: numpy asks the kernel for huge
# pages, so a 250 MB result faults in about 3x faster than into a zero-filled bytearray.
LARGE_BODY = 1024 * 1024
# Uploads go out in slices this size: the socket timeout then bounds each slice, not the whole
# upload (one sendall of 200 MB over a slow link would time out however healthy the link is).
SEND_CHUNK = 1024 * 1024


# --- errors ----------------------------------------------------------------------------------
class ClientError(CTSliceInterpError):
    """Talking to the server failed; the message says why."""


class ServerUnreachable(ClientError):
    """No connection (wrong URL, server down or restarting, network, TLS)."""


class AuthenticationFailed(ClientError):
    """The server refused the token (missing or wrong)."""


class InputRejected(ClientError):
    """The server refused the volume or the parameters; ``reason`` is its message."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(f"the server rejected the job: {reason}")
        self.reason, self.status = reason, status


class JobFailed(ClientError):
    """The job ran and failed on the server; ``reason`` is the server's message."""

    def __init__(self, reason: str):
        super().__init__(f"the job failed on the server: {reason}")
        self.reason = reason


class JobCancelled(ClientError, Cancelled):
    """The job was cancelled (here or on the server). Also a ``Cancelled``, like a local cancel."""


class JobNotFound(ClientError):
    """The server does not know the job: downloaded, expired, deleted, or the server restarted."""


class ServerBusy(ClientError):
    """The server's queue is full; ``retry_after`` is its suggested wait in seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


# --- progress ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobProgress(ProgressEvent):
    """One step of ``Client.run``, with what a progress bar and a status line need.

    ``state``: uploading | queued | running | downloading | done. ``stage``/``done``/``total``
    are the server's (e.g. "sample", 12, 50) while running; ``fraction`` is 0..1 of that stage
    (1.0 once done). ``queue_position`` is 1 for the next job to run and 0 when not waiting;
    ``eta_seconds`` is None until the server knows it. ``message`` is one line for a status box."""

    state: str = "running"
    queue_position: int = 0
    eta_seconds: Optional[float] = None
    message: str = ""
    job_id: Optional[str] = None

    @property
    def fraction(self) -> float:
        return 1.0 if self.state == "done" else ProgressEvent.fraction.fget(self)

    @classmethod
    def from_status(cls, status: dict, job_id: str) -> "JobProgress":
        state = status.get("state") or "running"
        eta = status.get("eta_seconds")
        eta = float(eta) if isinstance(eta, (int, float)) and not isinstance(eta, bool) else None
        if state == "queued":
            position = _int(status.get("queue_position"))
            where = f" (position {position})" if position else ""
            return cls("queued", 0, 0, state="queued", queue_position=position, eta_seconds=eta,
                       message=f"waiting in the server queue{where}" + _eta_text(eta), job_id=job_id)
        stage, done, total = str(status.get("stage") or state), _int(status.get("done")), _int(status.get("total"))
        message = f"{stage} {100 * min(1.0, done / total) if total > 0 else 0:.0f}%" + _eta_text(eta)
        return cls(stage, done, total, state="running", eta_seconds=eta, message=message, job_id=job_id)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "fraction": self.fraction}


def _eta_text(eta: Optional[float]) -> str:
    return f", about {eta:.0f} s left" if eta else ""


def _int(value) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


class _Reporter:
    """Calls ``progress`` only when the event changed (a long-poll may answer the same status twice)."""

    def __init__(self, progress: Optional[Callable[[JobProgress], None]]):
        self.progress, self.last = progress, None

    def __call__(self, event: JobProgress) -> None:
        if self.progress is not None and event != self.last:
            self.progress(event)
        self.last = event


# --- tokens ----------------------------------------------------------------------------------
def read_token(token_file: Optional[str] = None, environ=os.environ) -> Optional[str]:
    """The token from a file (its first line) or from ``$CTSLICEINTERP_TOKEN``; None if neither."""
    if token_file:
        path = Path(token_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").strip().splitlines()
        except OSError as exc:
            raise InputError(f"cannot read the token file {path}: {exc.strerror}") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise InputError(f"the token file {path} is empty")
        return token
    return environ.get(TOKEN_ENV, "").strip() or None


def _is_loopback_host(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- the client --------------------------------------------------------------------------------
class _Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes | bytearray | np.ndarray):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        try:
            return json.loads(bytes(self.body) if isinstance(self.body, np.ndarray) else self.body)
        except ValueError:
            return None

    def reason(self) -> str:
        data = self.json()
        if isinstance(data, dict) and data.get("error"):
            return str(data["error"])
        text = bytes(self.body[:200]).decode("utf-8", "replace").strip()
        return text or f"HTTP {self.status}"


class Client:
    def __init__(
        self,
        url: str,
        token: Optional[str] = None,
        timeout: float = 30.0,
        retries: int = 3,
        ssl_context: Optional[ssl.SSLContext] = None,
        ca_file: Optional[str] = None,
        compress: Optional[bool] = None,
        backoff: float = 0.5,
    ):
        """``compress``: gzip the volumes on the wire (default: yes, except on loopback where
        compressing costs more than sending). ``retries``: extra attempts, with exponential
        backoff from ``backoff`` seconds, on connection errors only."""
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InputError(f"server URL must look like http(s)://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.scheme, self.host = parsed.scheme, parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.prefix = parsed.path.rstrip("/")  # behind a reverse proxy at https://host/some/path
        self.token = token
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.compress = (not _is_loopback_host(self.host)) if compress is None else bool(compress)
        if self.scheme == "https":
            self.ssl_context = ssl_context or ssl.create_default_context(cafile=ca_file)
        else:
            self.ssl_context = None

    # --- transport ------------------------------------------------------------------------
    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.ssl_context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _headers(self, extra: Optional[dict] = None) -> dict:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers

    def _request(
        self,
        method: str,
        path: str,
        body: Optional[list] = None,
        headers: Optional[dict] = None,
        timeout: Optional[float] = None,
        retries: Optional[int] = None,
    ) -> _Response:
        """One request, retried with backoff when the connection fails. A POST is retried only
        when it could not connect (so a job is never submitted twice). ``body``: a list of
        buffers sent one after the other (a NRRD header, then a view of the voxels: no copy)."""
        timeout = self.timeout if timeout is None else timeout
        if body is not None:
            views = [memoryview(part).cast("B") for part in body]
            headers = {**(headers or {}), "Content-Length": str(sum(view.nbytes for view in views))}
            body = [view[i:i + SEND_CHUNK] for view in views for i in range(0, view.nbytes, SEND_CHUNK)]
        target = self.prefix + path
        retries = self.retries if retries is None else retries
        last_error: Optional[BaseException] = None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(8.0, self.backoff * 2 ** (attempt - 1)))
            conn = self._connection(timeout)
            try:
                try:
                    conn.connect()
                except ssl.SSLCertVerificationError as exc:
                    raise ServerUnreachable(
                        f"the TLS certificate of {self.url} is not trusted: {exc.verify_message} (pass ca_file / the CA bundle)"
                    ) from None
                except ssl.SSLError as exc:
                    raise ServerUnreachable(f"TLS handshake with {self.url} failed: {exc.reason or exc}") from None
                except OSError as exc:
                    last_error = exc
                    continue
                try:
                    conn.request(method, target, body=body, headers=self._headers(headers))
                except OSError as exc:  # reset, broken pipe, timeout, TLS error
                    # The server may have answered early (413, 503) and closed: read that answer.
                    response = self._early_response(conn)
                    if response is not None:
                        return response
                    if method == "POST":
                        raise ServerUnreachable(f"the upload to {self.url} failed: {_describe(exc)}") from None
                    last_error = exc
                    continue
                try:
                    return self._read(conn.getresponse())
                except (OSError, http.client.HTTPException) as exc:
                    if method == "POST":
                        raise ServerUnreachable(f"no answer from {self.url} to the upload: {_describe(exc)}") from None
                    last_error = exc
                    continue
            finally:
                conn.close()
        raise ServerUnreachable(
            f"cannot reach the CTSliceInterp server at {self.url}: {_describe(last_error)} "
            f"(after {retries + 1} attempt{'s' if retries else ''})"
        )

    @staticmethod
    def _early_response(conn: http.client.HTTPConnection) -> Optional[_Response]:
        try:
            return Client._read(conn.getresponse())
        except Exception:  # noqa: BLE001 - no answer was there
            return None

    @staticmethod
    def _read(response: http.client.HTTPResponse) -> _Response:
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) >= LARGE_BODY and response.status == 200:
            # Read straight into one buffer, which the volume then shares: no copy.
            buffer = np.empty(int(length), dtype=np.uint8)
            view, filled = memoryview(buffer), 0
            while filled < len(buffer):
                count = response.readinto(view[filled:])
                if not count:
                    raise http.client.IncompleteRead(bytes(view[:0]), len(buffer) - filled)
                filled += count
            return _Response(response.status, response.headers, buffer)
        return _Response(response.status, response.headers, response.read())

    def _check(self, response: _Response, job_id: Optional[str] = None) -> _Response:
        status = response.status
        if 200 <= status < 300:
            return response
        reason = response.reason()
        if status in (401, 403):
            raise AuthenticationFailed(f"the server at {self.url} refused the token ({reason}); check --token-file / {TOKEN_ENV}")
        if status == 404 and job_id is not None:
            raise JobNotFound(f"job {job_id[:8]}... is unknown to the server: {reason}")
        if status == 404:
            raise ClientError(f"{self.url} answered 404: is it a CTSliceInterp server (and the path right)?")
        if status == 503:
            retry_after = _float(response.headers.get("Retry-After"), 5.0)
            raise ServerBusy(f"the server is busy: {reason} (retry in {retry_after:g} s)", retry_after)
        if 400 <= status < 500:
            raise InputRejected(reason, status)
        raise ClientError(f"server error {status} from {self.url}: {reason}")

    def _json(self, method: str, path: str, job_id: Optional[str] = None, timeout: Optional[float] = None,
              retries: Optional[int] = None) -> Any:
        response = self._check(self._request(method, path, timeout=timeout, retries=retries), job_id)
        data = response.json()
        if data is None:
            raise ClientError(f"{self.url} did not answer JSON: is it a CTSliceInterp server?")
        return data

    # --- API ------------------------------------------------------------------------------
    def health(self) -> dict:
        return self._json("GET", f"{API}/health")

    def models(self) -> list[dict]:
        return self._json("GET", f"{API}/models")["models"]

    def submit(self, volume: Volume, params: Optional[dict] = None) -> str:
        """Upload ``volume`` with job ``params`` (method, spacing, target, model, steps, sampler,
        samples, consistency, seed); returns the job id. ``target`` may be a ``Geometry``."""
        params = dict(params or {})
        if isinstance(params.get("target"), Geometry):
            params["target"] = geometry_to_dict(params["target"])
        body = list(volume_to_nrrd_parts(volume, gzip=self.compress))
        headers = {"Content-Type": "application/x-nrrd", PARAMS_HEADER: json.dumps(params, separators=(",", ":"))}
        try:
            response = self._request("POST", f"{API}/jobs", body=body, headers=headers)
        except ServerUnreachable:
            self._explain_upload_failure(sum(memoryview(part).nbytes for part in body))
            raise
        data = self._check(response).json()
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise ClientError(f"{self.url} did not return a job id")
        return data["id"]

    def _explain_upload_failure(self, size: int) -> None:
        """A connection dropped mid-upload is often the server refusing an oversized body."""
        try:
            limit = int(self.health().get("max_upload_bytes", 0))
        except (ClientError, TypeError, ValueError):
            return
        if limit and size > limit:
            raise InputRejected(f"the upload ({size / 2**20:.0f} MiB) is larger than the server's limit of {limit / 2**20:.0f} MiB", 413)

    def status(self, job_id: str, wait: float = 0.0) -> dict:
        """The job's state. ``wait`` > 0 lets the server hold the answer up to that many seconds
        until something changes (fewer requests, faster reaction); 0 answers at once."""
        query = f"?wait={wait:g}" if wait > 0 else ""
        return self._json("GET", f"{API}/jobs/{_quote(job_id)}{query}", job_id, timeout=self.timeout + wait)

    def result(self, job_id: str, status: Optional[dict] = None) -> tuple[Volume, Optional[Volume]]:
        """(thin volume, uncertainty or None); then deletes the job on the server.
        ``status``: the job's last status when the caller has it (saves one request)."""
        if status is None or status.get("state") != "done":
            status = self.status(job_id)
        _raise_for_state(status)
        if status["state"] != "done":
            raise ClientError(f"job {job_id[:8]}... is {status['state']}: no result yet")
        parts = status.get("parts") or ["volume"]
        uncertainty = self._download(job_id, "uncertainty") if "uncertainty" in parts else None
        thin = self._download(job_id, "volume")
        # Read and checked: delete it now, in one try (the server keeps a sent result for a short
        # grace time anyway, because a dropped download looks the same to it as a finished one).
        self._cancel_quietly(job_id, retries=0)
        return thin, uncertainty

    def _download(self, job_id: str, part: str) -> Volume:
        encoding = "gzip" if self.compress else "raw"
        response = self._check(
            self._request("GET", f"{API}/jobs/{_quote(job_id)}/result?part={part}&encoding={encoding}", headers={"Accept": "application/x-nrrd"}),
            job_id,
        )
        try:
            volume = volume_from_nrrd_bytes(response.body)
        except CTSliceInterpError as exc:
            raise ClientError(f"the server sent an unreadable {part}: {exc}") from None
        if not volume.array.flags.writeable:  # gzip path: give callers an array they may edit
            volume = volume.replace(array=volume.array.copy())
        return volume

    def cancel(self, job_id: str, retries: Optional[int] = None) -> None:
        """Cancel the job (queued or running) and delete its data on the server."""
        self._json("DELETE", f"{API}/jobs/{_quote(job_id)}", job_id, retries=retries)

    def run(
        self,
        volume: Volume,
        params: Optional[dict] = None,
        progress: Optional[Callable[[JobProgress], None]] = None,
        cancel: Optional[threading.Event] = None,
        poll_interval: float = 0.5,
        busy_timeout: float = 600.0,
    ) -> tuple[Volume, Optional[Volume]]:
        """Submit, follow progress, fetch: blocking (scripts, the CLI, a GUI's worker thread).

        ``progress`` gets a ``JobProgress`` at each change: uploading, queued (with the queue
        position), running (stage, fraction, ETA), downloading, done. Waits and resubmits while
        the server's queue is full (up to ``busy_timeout`` s). If ``cancel`` is set, the server
        job is cancelled and ``JobCancelled`` raised."""
        report = _Reporter(progress)
        deadline = time.monotonic() + busy_timeout
        while True:
            _check_cancel(cancel)
            report(JobProgress("upload", 0, 0, state="uploading", message=f"sending the volume to {self.url}"))
            try:
                job_id = self.submit(volume, params)
                break
            except ServerBusy as busy:
                if time.monotonic() + busy.retry_after > deadline:
                    raise
                report(JobProgress("busy", 0, 0, state="queued", message=f"the server is busy; trying again in {busy.retry_after:.0f} s"))
                _sleep(busy.retry_after, cancel)
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    self._cancel_quietly(job_id)
                    raise JobCancelled("cancelled by the user")
                status = self.status(job_id, wait=poll_interval)
                _raise_for_state(status)
                if status["state"] == "done":
                    break
                report(JobProgress.from_status(status, job_id))
            report(JobProgress("download", 0, 0, state="downloading", message="downloading the result", job_id=job_id))
            result = self.result(job_id, status)
            report(JobProgress("done", 1, 1, state="done", message="done", job_id=job_id))
            return result
        except KeyboardInterrupt:
            self._cancel_quietly(job_id)
            raise

    def _cancel_quietly(self, job_id: str, retries: Optional[int] = None) -> None:
        try:
            self.cancel(job_id, retries)
        except ClientError:
            pass


def _raise_for_state(status: dict) -> None:
    if status.get("state") == "failed":
        raise JobFailed(status.get("error") or "unknown error")
    if status.get("state") == "cancelled":
        raise JobCancelled("the job was cancelled on the server")


def _check_cancel(cancel: Optional[threading.Event]) -> None:
    if cancel is not None and cancel.is_set():
        raise JobCancelled("cancelled by the user")


def _sleep(seconds: float, cancel: Optional[threading.Event]) -> None:
    if cancel is None:
        time.sleep(seconds)
    elif cancel.wait(seconds):
        raise JobCancelled("cancelled by the user")


def _quote(job_id: str) -> str:
    return urllib.parse.quote(str(job_id), safe="")


def _float(value, default: float) -> float:
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return default


def _describe(error: Optional[BaseException]) -> str:
    if error is None:
        return "unknown error"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is the server running, and the port right?)"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, socket.gaierror):
        return f"unknown host ({error.strerror})"
    return f"{type(error).__name__}: {error}"


# --- the CLI's entry --------------------------------------------------------------------------
def request_params(request) -> dict:
    """Job parameters from an ``run.InterpolationRequest`` (only what the server accepts)."""
    params: dict[str, Any] = {"spacing": request.spacing}
    if request.method:  # empty: the server's own default (its model, or B-spline)
        params["method"] = request.method
    if request.target is not None:
        params["target"] = geometry_to_dict(request.target)
    for key in ("model", "steps", "sampler", "seed"):
        if getattr(request, key, None) is not None:
            params[key] = getattr(request, key)
    params["samples"] = int(request.samples)
    params["consistency"] = bool(request.consistency)
    return params


def interpolate_remote(url, volume, request, token_file=None, token=None, progress=None, cancel=None, **client_options):
    """``run.interpolate`` on a server: same request in, same ``InterpolationResult`` out.

    The token is ``token``, else the first line of ``token_file``, else ``$CTSLICEINTERP_TOKEN``.
    Only voxels and geometry are sent; the input's metadata (DICOM tags) goes back onto the result
    here, as the local path does."""
    from ..api import InterpolationResult  # not needed by GUI users of Client

    client = Client(url, token=token or read_token(token_file), **client_options)
    start = time.perf_counter()
    thin, uncertainty = client.run(volume, request_params(request), progress=progress, cancel=cancel)
    local = {k: v for k, v in volume.metadata.items() if k != "slice_thickness"}
    thin = thin.replace(**{**local, **thin.metadata})
    if uncertainty is not None:
        uncertainty = uncertainty.replace(**{**local, **uncertainty.metadata})
    return InterpolationResult(thin, uncertainty, seconds=time.perf_counter() - start, method=request.method or "server default")
