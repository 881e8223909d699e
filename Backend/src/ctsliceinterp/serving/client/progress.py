"""``JobProgress``: what ``Client.run`` reports at each step, rich enough for a progress bar and
a status line (the Slicer widget shows it as is)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from ...core.progress import ProgressEvent

STATES = ("uploading", "queued", "running", "downloading", "done")


@dataclass(frozen=True)
class JobProgress(ProgressEvent):
    """One step of ``Client.run``.

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
        """The event for a server status (queued or running)."""
        eta = status.get("eta_seconds")
        eta = float(eta) if isinstance(eta, (int, float)) and not isinstance(eta, bool) else None
        if status.get("state") == "queued":
            position = _count(status.get("queue_position"))
            where = f" (position {position})" if position else ""
            return cls("queued", 0, 0, state="queued", queue_position=position, eta_seconds=eta,
                       message=f"waiting in the server queue{where}" + _eta_text(eta), job_id=job_id)
        stage, done, total = str(status.get("stage") or "running"), _count(status.get("done")), _count(status.get("total"))
        message = f"{stage} {100 * min(1.0, done / total) if total > 0 else 0:.0f}%" + _eta_text(eta)
        return cls(stage, done, total, state="running", eta_seconds=eta, message=message, job_id=job_id)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "fraction": self.fraction}


def _eta_text(eta: Optional[float]) -> str:
    return f", about {eta:.0f} s left" if eta else ""


def _count(value) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


class Reporter:
    """Calls ``progress`` only when the event changed (a long-poll may answer the same status twice)."""

    def __init__(self, progress: Optional[Callable[[JobProgress], None]]):
        self.progress, self.last = progress, None

    def __call__(self, event: JobProgress) -> None:
        if self.progress is not None and event != self.last:
            self.progress(event)
        self.last = event
