"""HTTP/1.1 to one CTSliceInterp server: the standard library only, nothing trusted.

Each request opens its own connection (a GUI may call from several threads) and is retried with
backoff when the connection fails. Each attempt has a deadline: ``timeout`` plus the time its
bytes take at ``min_rate``; a watchdog closes the socket when it passes, so a server that drips
one byte at a time cannot hold a call. Bodies are bounded before a byte is buffered. An upload
first asks ``Expect: 100-continue``, so a server that refuses it (503, 413) says so before the
body is sent, and an upload cut off midway is sent again (no job exists without the whole body).
"""

from __future__ import annotations

import http.client
import json
import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any, Optional

import numpy as np

from ...core.errors import InputError
from .errors import ClientError, JobCancelled, ServerUnreachable

USER_AGENT = "ctsliceinterp-client"
# Bodies at least this large are read into a numpy buffer: numpy asks the kernel for huge
# pages, so a 250 MB result faults in about 3x faster than into a zero-filled bytearray.
LARGE_BODY = 1024 * 1024
# Uploads go out in slices this size: the socket timeout then bounds each slice, not the whole
# upload (one sendall of 200 MB over a slow link would time out however healthy the link is).
SEND_CHUNK = 1024 * 1024
READ_CHUNK = 1024 * 1024
# A link slower than this is treated as broken: a call may take ``timeout`` plus its bytes at
# this rate (64 KiB/s is half a megabit; a 250 MB result then has more than an hour).
MIN_RATE = 64 * 1024
# How long an upload waits for "100 Continue" before it sends the body anyway (RFC 9110 10.1.1:
# a server or proxy may not answer it at all).
CONTINUE_WAIT = 1.0
SMALL_BODY_LIMIT = 1024 * 1024  # JSON answers and error pages
EXPECTED_JSON = 64 * 1024  # what the deadline allows for a JSON answer
_INTERIM = re.compile(rb"^HTTP/1\.[01] 1\d\d")


class Response:
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


class BodyTooLarge(ClientError):
    """The answer's body is larger than the caller's bound (a lying or hostile server)."""


class _Interrupted(Exception):
    """The connection broke while the body was being sent: the server cannot have the whole body,
    so no job exists and the upload may be sent again."""


class _AfterUpload(Exception):
    """The connection broke after the whole body was sent: the job may exist."""


class _Watchdog:
    """Closes a connection's socket at a deadline (unblocks any read or write in progress)."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float):
        self.conn, self.expired = conn, False
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self._timer.cancel()


class Transport:
    def __init__(self, url: str, token: Optional[str], timeout: float, retries: int, backoff: float,
                 ssl_context: Optional[ssl.SSLContext], ca_file: Optional[str], min_rate: float = MIN_RATE):
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InputError(f"server URL must look like http(s)://host:port, got {url!r}")
        self.url = url.strip().rstrip("/")
        self.scheme, self.host = parsed.scheme, parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.prefix = parsed.path.rstrip("/")  # behind a reverse proxy at https://host/some/path
        self.token = token
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.min_rate = float(min_rate)
        self.ssl_context = (ssl_context or ssl.create_default_context(cafile=ca_file)) if self.scheme == "https" else None

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

    def request(
        self,
        method: str,
        path: str,
        body: Optional[list] = None,
        headers: Optional[dict] = None,
        timeout: Optional[float] = None,
        retries: Optional[int] = None,
        max_body: int = SMALL_BODY_LIMIT,
        expected_bytes: int = EXPECTED_JSON,
        cancel: Optional[threading.Event] = None,
    ) -> Response:
        """One request, retried with backoff when the connection fails. A POST is retried only
        when the server cannot have received all of it (so a job is never submitted twice).
        ``body``: buffers sent one after the other (a NRRD header, then a view of the voxels: no
        copy). ``max_body``: the largest answer accepted for a 2xx (``BodyTooLarge`` above).
        ``expected_bytes``: the answer's likely size, which the deadline allows for. ``cancel``:
        set, it stops an upload between two ``SEND_CHUNK`` slices (``JobCancelled``; the server
        drops a body cut short)."""
        timeout = self.timeout if timeout is None else timeout
        sent_bytes = 0
        if body is not None:
            views = [memoryview(part).cast("B") for part in body]
            sent_bytes = sum(view.nbytes for view in views)
            headers = {**(headers or {}), "Content-Length": str(sent_bytes)}
            body = [view[i:i + SEND_CHUNK] for view in views for i in range(0, view.nbytes, SEND_CHUNK)]
        deadline = timeout + (sent_bytes + expected_bytes) / self.min_rate
        retries = self.retries if retries is None else retries
        last_error: Optional[BaseException] = None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(8.0, self.backoff * 2 ** (attempt - 1)))
            conn = self._connection(timeout)
            watchdog = _Watchdog(conn, deadline)
            try:
                return self._attempt(conn, method, self.prefix + path, body, self._headers(headers), max_body, cancel)
            except _AfterUpload as exc:  # the whole body went out: the job may exist, never resend
                cause = _deadline_error(deadline) if watchdog.expired else exc.__cause__
                raise ServerUnreachable(f"no answer from {self.url} to the upload: {_describe(cause)}") from None
            except (OSError, http.client.HTTPException, _Interrupted) as exc:
                last_error = _deadline_error(deadline) if watchdog.expired else getattr(exc, "__cause__", None) or exc
            finally:
                watchdog.cancel()
                conn.close()
        what = f"the upload to {self.url} failed" if body is not None else f"cannot reach the CTSliceInterp server at {self.url}"
        raise ServerUnreachable(f"{what}: {_describe(last_error)} (after {retries + 1} attempt{'s' if retries else ''})")

    def _attempt(self, conn, method: str, target: str, body: Optional[list], headers: dict, max_body: int,
                 cancel: Optional[threading.Event] = None) -> Response:
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as exc:
            raise ServerUnreachable(
                f"the TLS certificate of {self.url} is not trusted: {exc.verify_message} (pass ca_file / the CA bundle)"
            ) from None
        except ssl.SSLError as exc:
            raise ServerUnreachable(f"TLS handshake with {self.url} failed: {exc.reason or exc}") from None
        if body is None:
            conn.request(method, target, headers=headers)
            return _read(conn.getresponse(), max_body)
        early = self._send_upload(conn, method, target, body, headers, cancel)
        if early is not None:
            return _read(early, SMALL_BODY_LIMIT)
        try:
            return _read(conn.getresponse(), max_body)
        except (OSError, http.client.HTTPException) as exc:
            raise _AfterUpload() from exc

    @staticmethod
    def _send_upload(conn, method: str, target: str, body: list, headers: dict,
                     cancel: Optional[threading.Event] = None) -> Optional[http.client.HTTPResponse]:
        """Headers with ``Expect: 100-continue``, then the body once the server agrees (or does
        not answer within ``CONTINUE_WAIT``). Returns the server's final answer when it came
        before the body (a refusal), else None."""
        conn.putrequest(method, target, skip_accept_encoding=True)
        for key, value in {**headers, "Expect": "100-continue"}.items():
            conn.putheader(key, value)
        conn.endheaders()
        if _readable(conn.sock, CONTINUE_WAIT):
            response = conn.response_class(conn.sock, method=method)
            if not _INTERIM.match(response.fp.peek(12)[:12]):
                response.begin()  # a final answer before the body: the server refused it
                return response
            while response.fp.readline(65537) not in (b"\r\n", b"\n", b""):  # the 100 Continue's header
                pass
            response.fp.close()  # nothing else can have arrived: the server waits for the body
        try:
            for piece in body:
                if cancel is not None and cancel.is_set():
                    raise JobCancelled("cancelled by the user during the upload")
                conn.send(piece)
        except OSError as exc:  # reset, broken pipe, timeout: the server may still have answered
            early = _early_response(conn, method)
            if early is not None:
                return early
            raise _Interrupted(str(exc)) from exc
        return None


def _deadline_error(seconds: float) -> TimeoutError:
    return TimeoutError(f"no complete answer within {seconds:.0f} s (the call's deadline)")


def _readable(sock, seconds: float) -> bool:
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    return bool(select.select([sock], [], [], seconds)[0])


def _early_response(conn, method: str) -> Optional[http.client.HTTPResponse]:
    try:
        response = conn.response_class(conn.sock, method=method)
        response.begin()
        return response
    except Exception:  # noqa: BLE001 - no answer was there
        return None


def _read(response: http.client.HTTPResponse, max_body: int) -> Response:
    """The whole answer, refusing a 2xx body above ``max_body`` bytes before buffering it
    (error answers are small by nature and cut at ``SMALL_BODY_LIMIT``)."""
    limit = max_body if 200 <= response.status < 300 else SMALL_BODY_LIMIT
    length = response.getheader("Content-Length")
    declared = int(length) if length is not None and length.strip().isdigit() else None
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"the server announced a {declared}-byte answer; at most {limit} bytes were expected")
    if declared is not None and declared >= LARGE_BODY and response.status == 200:
        # Read straight into one buffer, which the volume then shares: no copy.
        buffer = np.empty(declared, dtype=np.uint8)
        view, filled = memoryview(buffer), 0
        while filled < declared:
            count = response.readinto(view[filled:])
            if not count:
                raise http.client.IncompleteRead(bytes(view[:0]), declared - filled)
            filled += count
        return Response(response.status, response.headers, buffer)
    chunks, size = [], 0
    while True:
        chunk = response.read1(READ_CHUNK) if declared is None else response.read(min(READ_CHUNK, declared - size))
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the server sent more than the {limit} bytes expected")
        chunks.append(chunk)
        if declared is not None and size >= declared:
            break
    if declared is not None and size < declared:
        raise http.client.IncompleteRead(b"", declared - size)
    return Response(response.status, response.headers, b"".join(chunks))


def _describe(error: Optional[BaseException]) -> str:
    if error is None:
        return "unknown error"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is the server running, and the port right?)"
    if isinstance(error, TimeoutError) and str(error).startswith("no complete answer"):
        return str(error)
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, socket.gaierror):
        return f"unknown host ({error.strerror})"
    return f"{type(error).__name__}: {error}"
