"""Bearer-token authentication and the "no token on a public address" rule."""

from __future__ import annotations

import hmac
import ipaddress
import socket
from typing import Optional

from ..client import TOKEN_ENV, read_token  # noqa: F401 - one token reader for both sides
from ...core.errors import InputError

MIN_TOKEN_LENGTH = 16


def is_loopback(host: str) -> bool:
    """True only for addresses that other machines cannot reach (127.0.0.0/8, ::1, localhost)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:  # a host name: every address it resolves to must be loopback
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_bind_allowed(host: str, token: Optional[str]) -> None:
    """Refuse to serve a reachable address without a token (and with a guessable one)."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise InputError(f"the token is too short ({len(token)} characters); use at least {MIN_TOKEN_LENGTH}, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    if token is None and not is_loopback(host):
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
