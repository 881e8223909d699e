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
    DEBUG level. Python's warnings state is per process: meant for one read or write at a time (the CLI,
    preprocessing workers), and it covers the block's worker threads too."""
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
        # pydicom both logs and warns most messages: each distinct text once.
        for message in dict.fromkeys(collect.messages + [str(w.message) for w in caught]):
            logger.debug("pydicom: %s", message)


def short(exc: BaseException) -> str:
    """An exception as ``Type: last line of its message``, for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")
