"""``Client``: one method per API call, and ``run`` (submit, follow, fetch) on top.

Each method is one short request with a deadline, so a GUI can call ``submit``/``status``/
``result``/``cancel`` from a timer; ``run`` is the blocking convenience for scripts, the CLI
and a GUI's worker thread. Nothing the server says is trusted: a result must have the grid the
request asks for, and is bounded in size before it is read.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from typing import Any, Callable, Optional

import numpy as np

from ...core.errors import CTSliceInterpError
from ...core.grid import DEFAULT_SPACING_MM, like_grid, thin_grid
from ...core.volume import Geometry, Volume
from ..access import TOKEN_ENV, is_loopback
from ..nrrd_bytes import MAX_HEADER_BYTES, volume_from_nrrd_bytes, volume_to_nrrd_parts
from .errors import (
    AuthenticationFailed,
    ClientError,
    InputRejected,
    JobCancelled,
    JobFailed,
    JobNotFound,
    ServerBusy,
    ServerUnreachable,
)
from .progress import JobProgress, Reporter
from .transport import MIN_RATE, Response, Transport

PARAMS_HEADER = "X-CTSliceInterp-Params"
API = "/v1"
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
# A job that has not ended after this long is abandoned (and cancelled on the server).
JOB_DEADLINE = 24 * 3600.0
# The largest result accepted when the client cannot know the grid (``result`` called without
# one): the server's status then gives the shape, and this bounds even that.
MAX_UNKNOWN_RESULT_BYTES = 16 * 1024**3
GEOMETRY_TOLERANCE_MM = 1e-3


class Client:
    def __init__(
        self,
        url: str,
        token: Optional[str] = None,
        timeout: float = 30.0,
        retries: int = 3,
        ssl_context=None,
        ca_file: Optional[str] = None,
        compress: Optional[bool] = None,
        backoff: float = 0.5,
        min_rate: float = MIN_RATE,
    ):
        """``compress``: gzip the volumes on the wire (default: yes, except on loopback where
        compressing costs more than sending). ``retries``: extra attempts, with exponential
        backoff from ``backoff`` seconds, on connection errors only. ``timeout`` bounds each
        network operation; each call may also take its bytes at ``min_rate`` bytes/s, no more."""
        self.transport = Transport(url, token, timeout, retries, backoff, ssl_context, ca_file, min_rate)
        self.url, self.timeout = self.transport.url, self.transport.timeout
        self.compress = (not is_loopback(self.transport.host)) if compress is None else bool(compress)

    # --- one request each -------------------------------------------------------------------
    def health(self) -> dict:
        return self._json("GET", f"{API}/health")

    def models(self) -> list[dict]:
        return self._json("GET", f"{API}/models")["models"]

    def submit(self, volume: Volume, params: Optional[dict] = None, cancel: Optional[threading.Event] = None) -> str:
        """Upload ``volume`` with job ``params`` (method, spacing, target, model, steps, sampler,
        samples, consistency, seed); returns the job id. ``target`` may be a ``Geometry``.
        ``cancel``: set during the upload, it stops it (``JobCancelled``; no job is made)."""
        params = _wire_params(params)
        body = list(volume_to_nrrd_parts(volume, gzip=self.compress))
        headers = {"Content-Type": "application/x-nrrd", PARAMS_HEADER: json.dumps(params, separators=(",", ":"))}
        try:
            response = self.transport.request("POST", f"{API}/jobs", body=body, headers=headers, cancel=cancel)
        except ServerUnreachable:
            self._explain_upload_failure(sum(memoryview(part).nbytes for part in body))
            raise
        data = self._check(response).json()
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise ClientError(f"{self.url} did not return a job id")
        return data["id"]

    def status(self, job_id: str, wait: float = 0.0) -> dict:
        """The job's state. ``wait`` > 0 lets the server hold the answer up to that many seconds
        until something changes (fewer requests, faster reaction); 0 answers at once."""
        query = f"?wait={wait:g}" if wait > 0 else ""
        status = self._json("GET", f"{API}/jobs/{_quote(job_id)}{query}", job_id, timeout=self.timeout + wait)
        if not isinstance(status, dict) or status.get("state") not in JOB_STATES:
            state = status.get("state") if isinstance(status, dict) else status
            raise ClientError(f"the server reported an unknown state {str(state)[:40]!r} for job {job_id[:8]}...")
        return status

    def result(self, job_id: str, status: Optional[dict] = None, expected: Optional[Geometry] = None) -> tuple[Volume, Optional[Volume]]:
        """(thin volume, uncertainty or None); then deletes the job on the server.

        ``status``: the job's last status when the caller has it (saves one request).
        ``expected``: the grid the request asks for (``expected_grid``); the result must be on
        it, and may not be larger. Without it, the status's shape bounds the download."""
        if status is None or status.get("state") != "done":
            status = self.status(job_id)
        _raise_for_state(status)
        if status["state"] != "done":
            raise ClientError(f"job {job_id[:8]}... is {status['state']}: no result yet")
        parts = status.get("parts") or ["volume"]
        voxels = _voxels(expected.shape if expected is not None else status.get("shape"))
        uncertainty = self._download(job_id, "uncertainty", voxels, expected) if "uncertainty" in parts else None
        thin = self._download(job_id, "volume", voxels, expected)
        # Read and checked: delete it now, in one try (the server keeps a sent result for a short
        # grace time anyway, because a dropped download looks the same to it as a finished one).
        self._cancel_quietly(job_id, retries=0)
        return thin, uncertainty

    def cancel(self, job_id: str, retries: Optional[int] = None) -> None:
        """Cancel the job (queued or running) and delete its data on the server."""
        self._json("DELETE", f"{API}/jobs/{_quote(job_id)}", job_id, retries=retries)

    # --- the whole job ------------------------------------------------------------------------
    def run(
        self,
        volume: Volume,
        params: Optional[dict] = None,
        progress: Optional[Callable[[JobProgress], None]] = None,
        cancel: Optional[threading.Event] = None,
        poll_interval: float = 0.5,
        busy_timeout: float = 600.0,
        deadline: float = JOB_DEADLINE,
    ) -> tuple[Volume, Optional[Volume]]:
        """Submit, follow progress, fetch and check: blocking (scripts, the CLI, a GUI's worker thread).

        ``progress`` gets a ``JobProgress`` at each change: uploading, queued (with the queue
        position), running (stage, fraction, ETA), downloading, done. Waits and resubmits while
        the server's queue is full (up to ``busy_timeout`` s). A job not done ``deadline`` s after
        it was accepted is cancelled on the server and raises ``ClientError``. If ``cancel`` is
        set, the server job is cancelled and ``JobCancelled`` raised."""
        report = Reporter(progress)
        job_id = self._submit_when_free(volume, params, report, cancel, busy_timeout)
        ends = time.monotonic() + deadline
        try:
            expected = expected_grid(volume, params)
            while True:
                _check_cancel(cancel)
                if time.monotonic() > ends:
                    raise ClientError(f"job {job_id[:8]}... did not finish within {deadline:g} s (the job's deadline); it was cancelled")
                status = self.status(job_id, wait=min(poll_interval, max(0.0, ends - time.monotonic())))
                _raise_for_state(status)
                if status["state"] == "done":
                    break
                report(JobProgress.from_status(status, job_id))
            report(JobProgress("download", 0, 0, state="downloading", message="downloading the result", job_id=job_id))
            result = self.result(job_id, status, expected)
        except BaseException as exc:  # cancel, deadline, a bad result, Ctrl-C: the server job goes too
            asked = isinstance(exc, (JobCancelled, KeyboardInterrupt))
            self._cancel_quietly(job_id, retries=None if asked else 0)  # one quick try when the server is the problem
            raise
        report(JobProgress("done", 1, 1, state="done", message="done", job_id=job_id))
        return result

    def _submit_when_free(self, volume, params, report, cancel, busy_timeout: float) -> str:
        ends = time.monotonic() + busy_timeout
        while True:
            _check_cancel(cancel)
            report(JobProgress("upload", 0, 0, state="uploading", message=f"sending the volume to {self.url}"))
            try:
                return self.submit(volume, params, cancel)
            except ServerBusy as busy:
                if time.monotonic() + busy.retry_after > ends:
                    raise
                report(JobProgress("busy", 0, 0, state="queued", message=f"the server is busy; trying again in {busy.retry_after:.0f} s"))
                _sleep(busy.retry_after, cancel)

    # --- helpers ------------------------------------------------------------------------------
    def _download(self, job_id: str, part: str, voxels: Optional[int], expected: Optional[Geometry]) -> Volume:
        encoding = "gzip" if self.compress else "raw"
        # float64 at most, plus the header; gzip of incompressible data adds well under 1 %.
        max_body = MAX_UNKNOWN_RESULT_BYTES if voxels is None else voxels * 8 + voxels // 50 + MAX_HEADER_BYTES
        response = self._check(self.transport.request(
            "GET", f"{API}/jobs/{_quote(job_id)}/result?part={part}&encoding={encoding}",
            headers={"Accept": "application/x-nrrd"}, max_body=max_body,
            expected_bytes=MAX_UNKNOWN_RESULT_BYTES if voxels is None else voxels * 4,  # float32
        ), job_id)
        try:
            volume = volume_from_nrrd_bytes(response.body, voxels)  # the header's size is checked before inflating
        except CTSliceInterpError as exc:
            raise ClientError(f"the server sent an unreadable {part}: {exc}") from None
        if expected is not None:
            check_result_grid(volume, expected, part)
        if not volume.array.flags.writeable:  # gzip path: give callers an array they may edit
            volume = volume.replace(array=volume.array.copy())
        return volume

    def _explain_upload_failure(self, size: int) -> None:
        """A connection dropped mid-upload is often the server refusing an oversized body."""
        try:
            limit = int(self.health().get("max_upload_bytes", 0))
        except (ClientError, TypeError, ValueError):
            return
        if limit and size > limit:
            raise InputRejected(f"the upload ({size / 2**20:.0f} MiB) is larger than the server's limit of {limit / 2**20:.0f} MiB", 413)

    def _check(self, response: Response, job_id: Optional[str] = None) -> Response:
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
        response = self._check(self.transport.request(method, path, timeout=timeout, retries=retries), job_id)
        data = response.json()
        if data is None:
            raise ClientError(f"{self.url} did not answer JSON: is it a CTSliceInterp server?")
        return data

    def _cancel_quietly(self, job_id: str, retries: Optional[int] = None) -> None:
        try:
            self.cancel(job_id, retries)
        except ClientError:
            pass


# --- checking what comes back ------------------------------------------------------------------
def expected_grid(volume: Volume, params: Optional[dict]) -> Geometry:
    """The grid a job's result must have: the request's target on the input's in-plane grid, or
    the thin grid at its spacing (as the server computes it)."""
    params = params or {}
    target = params.get("target")
    if isinstance(target, dict):
        target = Geometry.from_dict(target, "target")
    try:
        if target is not None:
            return like_grid(volume.geometry, target)
        spacing = params.get("spacing")
        return thin_grid(volume.geometry, DEFAULT_SPACING_MM if spacing is None else spacing)
    except CTSliceInterpError as exc:  # the server accepted what the grid code refuses
        raise ClientError(f"the server accepted a job whose grid cannot be computed here: {exc}") from None


def check_result_grid(volume: Volume, expected: Geometry, part: str = "volume") -> None:
    """``ClientError`` unless ``volume`` lies on ``expected`` (shape, and every corner within
    ``GEOMETRY_TOLERANCE_MM``)."""
    if tuple(volume.shape) != tuple(expected.shape):
        raise ClientError(f"the server returned a {part} of shape {volume.shape}, but the request asks for {tuple(expected.shape)}")
    nz, ny, nx = expected.shape
    corners = np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)], dtype=float)
    offset = np.abs(volume.geometry.index_to_physical(corners) - expected.index_to_physical(corners)).max()
    if not offset <= GEOMETRY_TOLERANCE_MM:
        raise ClientError(f"the server returned a {part} whose geometry is {offset:.3g} mm off the requested grid")


def _wire_params(params: Optional[dict]) -> dict:
    params = dict(params or {})
    if isinstance(params.get("target"), Geometry):
        params["target"] = params["target"].to_dict()
    return params


def _voxels(shape) -> Optional[int]:
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        return None
    return int(shape[0]) * int(shape[1]) * int(shape[2])


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
