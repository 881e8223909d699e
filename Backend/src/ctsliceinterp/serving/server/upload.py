"""Reading an upload: the body streams in chunk by chunk and stops at the size limit, so an
oversized or never-ending body costs at most the limit in memory. Multipart bodies (as ``curl
-F`` sends them) are split with a small parser, without any extra package."""

from __future__ import annotations

import asyncio
import re
from typing import Callable, Optional

from starlette.requests import Request

from ...core.errors import InputError


PACE_RECHECK_SECONDS = 0.5


class UploadTooLarge(Exception):
    pass


class UploadStalled(Exception):
    """The body stopped arriving, or arrives below the minimum rate; the message says which."""


class UploadPace:
    """When an upload must have made progress: no gap longer than ``idle_timeout`` s, and after
    ``grace`` s at least ``min_rate`` bytes/s on average since it began. One deadline covers
    both, so a slow-loris sending a byte now and then cannot keep a slot. While ``contended()``
    (another upload waits for a slot), the grace is ``busy_grace``."""

    def __init__(self, idle_timeout: float, min_rate: float, grace: float, now: float,
                 busy_grace: Optional[float] = None, contended: Callable[[], bool] = lambda: False):
        self.idle_timeout, self.min_rate, self.grace, self.start = idle_timeout, min_rate, grace, now
        self.busy_grace = grace if busy_grace is None else min(grace, busy_grace)
        self.contended = contended
        self.received = 0

    def _grace(self) -> float:
        return self.busy_grace if self.contended() else self.grace

    def deadline(self, now: float) -> float:
        paced = self.start + max(self._grace(), self.received / self.min_rate) if self.min_rate > 0 else float("inf")
        return min(now + self.idle_timeout, paced)

    def problem(self, now: float) -> str:
        elapsed = now - self.start
        if self.min_rate > 0 and elapsed >= self.busy_grace and self.received < self.min_rate * elapsed * 0.999:
            return (f"the upload is too slow: {self.received} bytes in {elapsed:.0f} s, below this server's minimum "
                    f"of {self.min_rate / 1024:g} KiB/s")
        return f"the upload stalled for {self.idle_timeout:g} s"


async def read_body(request: Request, limit: int, pace: UploadPace) -> bytearray:
    """The whole body, or ``UploadTooLarge`` as soon as it passes ``limit`` bytes,
    ``UploadStalled`` when it falls behind ``pace``, ``ClientDisconnect``."""
    body = bytearray()
    chunks = request.stream().__aiter__()
    loop = asyncio.get_running_loop()
    if hasattr(asyncio, "timeout"):  # Python >= 3.11: one timer, moved on at every chunk
        tick = None
        try:
            async with asyncio.timeout(pace.deadline(loop.time()) - loop.time()) as watchdog:
                def recheck() -> None:  # the pace changes when another upload starts waiting
                    nonlocal tick
                    watchdog.reschedule(pace.deadline(loop.time()))
                    tick = loop.call_later(PACE_RECHECK_SECONDS, recheck)

                tick = loop.call_later(PACE_RECHECK_SECONDS, recheck)
                async for chunk in chunks:
                    if len(body) + len(chunk) > limit:
                        raise UploadTooLarge()
                    body += chunk
                    pace.received = len(body)
                    watchdog.reschedule(pace.deadline(loop.time()))
        except TimeoutError:
            raise UploadStalled(pace.problem(loop.time())) from None
        finally:
            if tick is not None:
                tick.cancel()
        return body
    while True:  # Python 3.10: a timeout per chunk (wait_for runs each in a task: slower)
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), max(0.0, pace.deadline(loop.time()) - loop.time()))
        except StopAsyncIteration:
            return body
        except asyncio.TimeoutError:
            raise UploadStalled(pace.problem(loop.time())) from None
        if len(body) + len(chunk) > limit:
            raise UploadTooLarge()
        body += chunk
        pace.received = len(body)


_BOUNDARY = re.compile(r'boundary="?([^";]{1,200})"?', re.IGNORECASE)
_NAME = re.compile(rb'name="([^"]{1,100})"', re.IGNORECASE)


def split_multipart(body: bytes | bytearray, content_type: str) -> dict[str, bytes]:
    """``{field name: bytes}`` of a multipart/form-data body."""
    match = _BOUNDARY.search(content_type)
    if not match:
        raise InputError("multipart upload without a boundary in its Content-Type")
    delimiter = b"--" + match.group(1).encode("latin-1")
    view = memoryview(body)
    parts: dict[str, bytes] = {}
    position = body.find(delimiter)
    if position < 0:
        raise InputError("multipart upload: the boundary never appears in the body")
    while True:
        position += len(delimiter)
        if body[position:position + 2] == b"--":
            return parts
        header_end = body.find(b"\r\n\r\n", position)
        next_delimiter = body.find(b"\r\n" + delimiter, header_end + 4) if header_end >= 0 else -1
        if header_end < 0 or next_delimiter < 0:
            raise InputError("multipart upload is truncated or malformed")
        headers = bytes(view[position:header_end])
        name = _NAME.search(headers)
        if name is None:
            raise InputError("multipart part without a name")
        parts[name.group(1).decode("latin-1")] = bytes(view[header_end + 4:next_delimiter])
        position = next_delimiter + 2


def content_length(request: Request) -> Optional[int]:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise InputError(f"invalid Content-Length header {value[:30]!r}")
    return int(value)
