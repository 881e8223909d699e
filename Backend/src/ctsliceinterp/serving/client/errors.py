"""The client's exceptions: one per thing that can go wrong, all ``ClientError`` (and so
``CTSliceInterpError``)."""

from __future__ import annotations

from ...core.errors import Cancelled, CTSliceInterpError


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
