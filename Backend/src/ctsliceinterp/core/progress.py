"""Progress reporting and cancellation shared by the CLI, the server and Slicer.

A method receives a ``Reporter``. It calls ``reporter.update(stage, done, total)`` at each unit
of work (a chunk, a sampling step); that forwards to the caller's callback and raises
``Cancelled`` as soon as the caller's cancel event is set, so a cancel takes effect within one
unit of work.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # e.g. "interpolate", "encode", "sample", "decode", "consistency"
    done: int
    total: int

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.done / self.total)


ProgressCallback = Callable[[ProgressEvent], None]


class Reporter:
    def __init__(self, callback: Optional[ProgressCallback] = None, cancel: Optional[threading.Event] = None):
        self.callback = callback
        self.cancel = cancel

    def check_cancelled(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled by the user")

    def update(self, stage: str, done: int, total: int) -> None:
        self.check_cancelled()
        if self.callback is not None:
            self.callback(ProgressEvent(stage, int(done), int(total)))


def as_reporter(progress=None, cancel: Optional[threading.Event] = None) -> Reporter:
    if isinstance(progress, Reporter):
        return progress
    return Reporter(progress, cancel)
