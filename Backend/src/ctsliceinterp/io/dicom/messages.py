"""pydicom's warnings and log records, kept off the terminal: the errors we raise already name the file
and the problem in one line. They go to this package's debug log, which ``--debug`` shows."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

logger = logging.getLogger("ctsliceinterp.io.dicom")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def pydicom_messages_to_debug() -> Iterator[None]:
    """Collect what pydicom warns or logs inside the block; afterwards log each distinct message once at
    DEBUG level (with how often it came). Warnings are global in Python: this holds for every thread."""
    pydicom_logger = logging.getLogger("pydicom")
    collect = _Collect()
    propagate = pydicom_logger.propagate
    pydicom_logger.addHandler(collect)
    pydicom_logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        pydicom_logger.removeHandler(collect)
        pydicom_logger.propagate = propagate
        counts: dict[str, int] = {}
        for message in collect.messages + [str(w.message) for w in caught]:
            counts[message] = counts.get(message, 0) + 1
        for message, count in counts.items():
            # pydicom both logs and warns most messages: count each event once.
            times = f" ({(count + 1) // 2}x)" if count > 2 else ""
            logger.debug("pydicom: %s%s", message, times)


def short(exc: BaseException) -> str:
    """An exception as ``Type: last line of its message``, for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")
