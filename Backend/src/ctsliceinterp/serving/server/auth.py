"""Bearer-token authentication and the "no token on a public address" rule."""

from __future__ import annotations

import hmac
from typing import Optional

from fastapi import Request

from ...core.errors import InputError
from ..access import TOKEN_ENV, check_token, is_loopback
from .errors import ApiError

MIN_TOKEN_LENGTH = 16


def check_bind_allowed(host: str, token: Optional[str]) -> None:
    """Refuse to serve a reachable address without a token (and with a guessable one, or one no
    client can send)."""
    if token is not None:
        check_token(token)
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise InputError(f"the token is too short ({len(token)} characters); use at least {MIN_TOKEN_LENGTH}, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    if token is None and not is_loopback(host, resolve=True):
        raise InputError(
            f"refusing to listen on {host} without a token: anyone on the network could send and read scans. "
            f"Pass --token-file F (or set {TOKEN_ENV}), or bind to 127.0.0.1"
        )


def token_matches(expected: Optional[str], authorization: Optional[str]) -> bool:
    """Constant-time comparison of an ``Authorization: Bearer <token>`` header."""
    if expected is None:
        return True
    if not authorization:
        return False
    scheme, _, supplied = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(supplied.strip().encode("utf-8"), expected.encode("utf-8"))


def require_token(request: Request) -> None:
    """FastAPI dependency: a 401 unless the request carries the server's token. It reads only
    the headers, so it runs before a byte of an upload is read."""
    if not token_matches(request.app.state.server.config.token, request.headers.get("authorization")):
        raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
