"""Who may talk to a server: the bearer token (where it comes from) and which addresses only this
machine can reach. Written once for the client, the server and the Slicer module; standard
library only."""

from __future__ import annotations

import ipaddress
import os
import socket
import warnings
from pathlib import Path
from typing import Optional

from ..core.errors import InputError

TOKEN_ENV = "CTSLICEINTERP_TOKEN"


class InsecureTokenFile(UserWarning):
    """A token file that other users can read (ssh refuses such key files; we warn)."""


def read_token(token_file: Optional[str] = None, environ=os.environ) -> Optional[str]:
    """The token from a file (its first line) or from ``$CTSLICEINTERP_TOKEN``; None if neither.

    Warns (``InsecureTokenFile``) when the file is readable by other users, and refuses a token
    that no HTTP client could send (``check_token``)."""
    if token_file:
        path = Path(token_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").strip().splitlines()
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the token file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise InputError(f"the token file {path} is empty")
        if os.name == "posix" and mode & 0o077:
            warnings.warn(f"the token file {path} is readable by other users (mode {mode & 0o777:04o}): "
                          f"anyone who reads it can send and fetch scans; run chmod 600 {path}", InsecureTokenFile, stacklevel=2)
        return check_token(token)
    token = environ.get(TOKEN_ENV, "").strip() or None
    return None if token is None else check_token(token)


def check_token(token: str) -> str:
    """``token``, or an ``InputError`` when an ``Authorization`` header cannot carry it (HTTP
    headers are Latin-1 without control characters): a server started with it would refuse
    every client."""
    try:
        token.encode("latin-1")
    except UnicodeEncodeError:
        raise InputError("the token holds characters an HTTP header cannot carry (only Latin-1 is possible; "
                         "use e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in token):
        raise InputError("the token holds control characters, which an HTTP header cannot carry")
    return token


def is_loopback(host: str, resolve: bool = False) -> bool:
    """True only for addresses other machines cannot reach (127.0.0.0/8, ::1, localhost).

    ``resolve``: also look a host name up, and require every address it has to be loopback (the
    server's bind check); without it, a name other than localhost counts as remote (the
    client's choice of compression, which must not wait for DNS)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if not resolve:
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
