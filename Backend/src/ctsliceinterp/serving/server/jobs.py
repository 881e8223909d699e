"""The job queue: one worker thread per device runs jobs one at a time from a bounded queue.

Everything lives in memory: the uploaded volume until its job ends, the result until the client
deletes it after reading it, a short grace time after it was sent, or its time-to-live. The
results held (by size) are bounded, as the queue is. A cancel sets the job's
``threading.Event``, which ``run.interpolate`` checks at every unit of work (chunk or sampling
step).
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from ...core.errors import Cancelled, CTSliceInterpError
from ...core.progress import ProgressEvent
from ...api import InterpolationRequest, InterpolationResult, get_method, interpolate
from ...core.volume import Geometry, Volume
from .config import ServerConfig
from .models import ModelRegistry

log = logging.getLogger("ctsliceinterp.serving.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


class QueueFull(Exception):
    def __init__(self, retry_after: int, reason: str = "the job queue is full"):
        super().__init__(reason)
        self.retry_after = retry_after


def new_job_id() -> str:
    return secrets.token_urlsafe(24)  # 192 random bits


@dataclass(eq=False)
class Job:
    id: str
    request: InterpolationRequest
    volume: Optional[Volume]
    target: Geometry
    created: float = field(default_factory=time.monotonic)
    state: str = QUEUED
    stage: str = "queued"
    done: int = 0
    total: int = 0
    started: Optional[float] = None
    finished: Optional[float] = None
    error: Optional[str] = None
    result: Optional[InterpolationResult] = None
    downloaded: set = field(default_factory=set)
    delete_at: Optional[float] = None  # set once every part was sent (the download grace)
    cancel: threading.Event = field(default_factory=threading.Event)
    watchers: list = field(default_factory=list)  # callables, called on any state or progress change
    # The samples it runs: the request's, or for none its model's default (ModelRegistry.samples).
    samples: int = 1

    @property
    def output_voxels(self) -> int:
        nz, ny, nx = self.target.shape
        return nz * ny * nx * max(1, self.samples)

    @property
    def result_bytes(self) -> int:
        """Memory its result takes: float32 thin volume, plus the uncertainty (the spread) when
        it runs more than one sample."""
        nz, ny, nx = self.target.shape
        return nz * ny * nx * 4 * (2 if self.samples > 1 else 1)

    @property
    def cost_key(self) -> str:
        return f"{self.request.method}:{self.request.model or ''}:{self.request.steps or ''}"

    def parts(self) -> list[str]:
        if self.result is None:
            return []
        return ["volume"] + (["uncertainty"] if self.result.uncertainty is not None else [])


class JobManager:
    def __init__(self, config: ServerConfig, registry: ModelRegistry):
        self.config = config
        self.registry = registry
        self._jobs: dict[str, Job] = {}
        self._queue: collections.deque[Job] = collections.deque()
        self._running: Optional[Job] = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._seconds_per_voxel: dict[str, float] = {}  # moving average, for ETAs
        self.completed = 0
        self._worker = threading.Thread(target=self._work, name="ctsliceinterp-worker", daemon=True)

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            for job in self._queue:
                job.cancel.set()
            if self._running is not None:
                self._running.cancel.set()
            self._wake.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout)
        with self._lock:
            self._jobs.clear()  # nothing is kept after exit
            self._queue.clear()

    # --- client operations (called from the event loop; all quick) ------------------------
    def submit(self, volume: Volume, request: InterpolationRequest, target: Geometry, samples: int = 1) -> Job:
        """``samples``: what the job runs (``ModelRegistry.samples``), for its memory and ETA."""
        with self._lock:
            self._purge_expired()
            if len(self._queue) >= self.config.queue_size:
                raise QueueFull(self._retry_after())
            job = Job(new_job_id(), request, volume, target, samples=samples)
            held = self._held_result_bytes()
            if held and held + job.result_bytes > self.config.max_held_result_bytes:
                raise QueueFull(self._retry_after(), (
                    f"the server holds {held / 2**30:.1f} GiB of results that are queued, running or not yet "
                    f"downloaded; this job's {job.result_bytes / 2**30:.1f} GiB would pass its limit of "
                    f"{self.config.max_held_result_bytes / 2**30:.1f} GiB"
                ))
            self._jobs[job.id] = job
            self._queue.append(job)
            self._wake.notify_all()
        log.info("job %s queued: %s, %dx%dx%d -> %d slices", job.id[:8], request.method, *volume.shape, target.shape[0])
        return job

    def queue_full(self) -> Optional[int]:
        """Retry-After seconds when a new job would be refused, else None (checked before an
        upload is read, so a busy server does not read a body it would throw away)."""
        with self._lock:
            return self._retry_after() if len(self._queue) >= self.config.queue_size else None

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            self._purge_expired()
            return self._jobs.get(job_id)

    def status(self, job: Job) -> dict:
        with self._lock:
            now = time.monotonic()
            position, eta = 0, None
            if job.state == QUEUED and job in self._queue:
                ahead = list(self._queue)[: list(self._queue).index(job)]
                position = len(ahead) + 1
                eta = self._eta(now, ahead, job)
            elif job.state == RUNNING:
                eta = self._remaining(job, now)
            progress = 1.0 if job.state == DONE else (min(1.0, job.done / job.total) if job.total > 0 else 0.0)
            return {
                "id": job.id,
                "state": job.state,
                "progress": progress,
                "stage": job.stage,
                "done": job.done,
                "total": job.total,
                "queue_position": position,
                "eta_seconds": None if eta is None else round(eta, 1),
                "error": job.error,
                "method": job.request.method,
                "model": job.request.model,
                "parts": job.parts(),
                "shape": list(job.target.shape),
                "elapsed_seconds": round((job.finished or now) - (job.started or now), 3),
            }

    def watch(self, job: Job, callback) -> None:
        """Call ``callback()`` (from any thread, so it must be thread-safe and quick) whenever the
        job's state or progress changes, until ``unwatch``: long-polls answer at that instant."""
        with self._lock:
            job.watchers.append(callback)

    def unwatch(self, job: Job, callback) -> None:
        with self._lock:
            if callback in job.watchers:
                job.watchers.remove(callback)

    @staticmethod
    def _notify(job: Job) -> None:
        for callback in list(job.watchers):
            try:
                callback()
            except Exception:  # noqa: BLE001 - a gone listener must never break the job
                pass

    def cancel(self, job: Job) -> None:
        """Cancel (queued or running) and purge the data; a tombstone keeps the state visible."""
        with self._lock:
            job.cancel.set()
            if job in self._queue:
                self._queue.remove(job)
            if job.state in (QUEUED, RUNNING):
                job.state, job.stage = CANCELLED, "cancelled"
                job.finished = time.monotonic()
            if job.state != RUNNING:
                job.volume = None
            job.result = None
            if job.state in (DONE, FAILED):  # nothing left to cancel: DELETE just purges
                self._jobs.pop(job.id, None)
        self._notify(job)
        log.info("job %s cancelled", job.id[:8])

    def result_part(self, job: Job, part: str) -> Optional[Volume]:
        with self._lock:
            if job.state != DONE or job.result is None:
                return None
            return job.result.volume if part == "volume" else job.result.uncertainty

    def mark_downloaded(self, job: Job, part: str) -> None:
        """Called once a part was sent. "Sent" is not "received" (a dropped connection looks the
        same to the server), so the result stays for the download grace time, in which a broken
        transfer can be retried; the client's DELETE after reading it removes it at once."""
        with self._lock:
            job.downloaded.add(part)
            if job.result is not None and set(job.parts()) <= job.downloaded and job.delete_at is None:
                job.delete_at = time.monotonic() + self.config.download_grace_seconds
                log.info("job %s result sent; deleted on the client's DELETE or in %g s", job.id[:8], self.config.download_grace_seconds)

    def _held_result_bytes(self) -> int:
        return sum(job.result_bytes for job in self._jobs.values() if job.state in (QUEUED, RUNNING) or job.result is not None)

    def counts(self) -> dict:
        with self._lock:
            self._purge_expired()
            return {
                "queued": len(self._queue),
                "running": int(self._running is not None),
                "capacity": self.config.queue_size,
                "held": len(self._jobs),
                "held_result_bytes": self._held_result_bytes(),
                "max_held_result_bytes": self.config.max_held_result_bytes,
                "completed": self.completed,
            }

    # --- ETA ------------------------------------------------------------------------------
    def _estimate(self, job: Job) -> Optional[float]:
        rate = self._seconds_per_voxel.get(job.cost_key)
        return None if rate is None else rate * job.output_voxels

    def _remaining(self, job: Job, now: float) -> Optional[float]:
        elapsed = now - (job.started or now)
        estimate = self._estimate(job)
        if job.total > 0 and job.done > 0 and estimate is None:
            estimate = elapsed * job.total / job.done  # single-stage extrapolation
        return None if estimate is None else max(0.0, estimate - elapsed)

    def _eta(self, now: float, ahead: list[Job], job: Job) -> Optional[float]:
        total = 0.0
        if self._running is not None:
            remaining = self._remaining(self._running, now)
            if remaining is None:
                return None
            total += remaining
        for other in ahead + [job]:
            estimate = self._estimate(other)
            if estimate is None:
                return None
            total += estimate
        return total

    def _retry_after(self) -> int:
        now = time.monotonic()
        eta = self._remaining(self._running, now) if self._running is not None else 0.0
        return int(min(60, max(1, round(eta or 5))))

    # --- housekeeping ---------------------------------------------------------------------
    def _purge_expired(self) -> None:
        now = time.monotonic()
        ttl = self.config.result_ttl_seconds
        for job_id, job in list(self._jobs.items()):
            expired = job.state in FINISHED and job.finished is not None and now - job.finished > ttl
            if expired or (job.delete_at is not None and now > job.delete_at):
                job.result = job.volume = None
                del self._jobs[job_id]
                log.info("job %s %s and deleted", job_id[:8], "expired" if expired else "downloaded")

    # --- the worker -----------------------------------------------------------------------
    def _work(self) -> None:
        if self.registry.specs:
            try:
                self.registry.preload()  # models stay loaded for every later job
            except Exception as exc:  # noqa: BLE001 - each job's load then reports it
                log.error("preloading the models failed: %s: %s", type(exc).__name__, exc)
        while True:
            with self._lock:
                while not self._queue and not self._stop:
                    self._wake.wait(timeout=5.0)
                    self._purge_expired()
                if self._stop:
                    return
                job = self._queue.popleft()
                job.state, job.stage, job.started = RUNNING, "starting", time.monotonic()
                self._running = job
            self._notify(job)
            try:
                self._run(job)
            except Exception as exc:  # noqa: BLE001 - a fault must neither stop the worker nor leave the job running
                log.error("job %s: internal error while finishing: %s: %s", job.id[:8], type(exc).__name__, exc)
                self._fail_unfinished(job, f"internal error on the server ({type(exc).__name__})")
            finally:
                with self._lock:
                    self._running = None
                    job.volume = None  # the upload is not kept once the job ends
                    if job.finished is None:
                        job.finished = time.monotonic()

    def _run(self, job: Job) -> None:
        delay = self.config.step_delay_seconds

        def progress(event: ProgressEvent) -> None:
            job.stage, job.done, job.total = event.stage, event.done, event.total
            self._notify(job)
            if delay:
                job.cancel.wait(delay)

        try:
            interpolator = None
            if not get_method(job.request.method).classical:
                interpolator = self.registry.get(job.request.method, job.request.model)
            result = interpolate(job.volume, job.request, progress=progress, cancel=job.cancel, interpolator=interpolator)
        except Cancelled:
            self._finish(job, CANCELLED, None, None)
            return
        except CTSliceInterpError as exc:
            self._finish(job, FAILED, None, str(exc))
            return
        except MemoryError:
            self._finish(job, FAILED, None, "the server ran out of memory for this volume")
            return
        except Exception as exc:  # noqa: BLE001 - the worker must survive any job
            log.error("job %s failed: %s", job.id[:8], type(exc).__name__)
            self._finish(job, FAILED, None, f"internal error ({type(exc).__name__})")
            return
        self._finish(job, DONE, result, None)

    def _finish(self, job: Job, state: str, result: Optional[InterpolationResult], error: Optional[str]) -> None:
        try:
            self._finish_locked(job, state, result, error)
        finally:
            self._notify(job)  # the long-poll answers the instant the job is over

    def _finish_locked(self, job: Job, state: str, result: Optional[InterpolationResult], error: Optional[str]) -> None:
        with self._lock:
            job.finished = time.monotonic()
            if job.cancel.is_set():  # cancelled while running: drop whatever came out
                job.state, job.stage, job.result = CANCELLED, "cancelled", None
                log.info("job %s stopped after cancel", job.id[:8])
                return
            job.state, job.error, job.result = state, error, result
            job.stage = state
            if state == DONE:
                self.completed += 1
                try:  # the result is safe: a fault in the ETA bookkeeping is only logged
                    self._record_speed(job)
                except Exception as exc:  # noqa: BLE001
                    log.error("job %s: speed bookkeeping failed (%s: %s); its result is kept",
                              job.id[:8], type(exc).__name__, exc)
        log.info("job %s %s%s", job.id[:8], state, f": {error}" if error else "")

    def _record_speed(self, job: Job) -> None:
        """The moving average of seconds per output voxel that ETAs are made of (lock held)."""
        seconds = job.finished - (job.started or job.finished)
        rate = seconds / max(1, job.output_voxels)
        old = self._seconds_per_voxel.get(job.cost_key)
        self._seconds_per_voxel[job.cost_key] = rate if old is None else 0.7 * old + 0.3 * rate

    def _fail_unfinished(self, job: Job, error: str) -> None:
        """A job the worker could not finish normally ends failed (cancelled when asked); one that
        already ended, its result stored, stays as it is."""
        with self._lock:
            if job.state not in FINISHED:
                job.finished = time.monotonic()
                cancelled = job.cancel.is_set()
                job.state = job.stage = CANCELLED if cancelled else FAILED
                job.error, job.result = (None if cancelled else error), None
        self._notify(job)
