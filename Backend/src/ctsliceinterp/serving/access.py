"""Who may talk to a server: the bearer token (where it comes from) and which addresses only this
machine can reach. Written once for the client, the server and the Slicer module; standard
library only."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Optional

from ..core.errors import InputError

TOKEN_ENV = "CTSLICEINTERP_TOKEN"


def read_token(token_file: Optional[str] = None, environ=os.environ) -> Optional[str]:
    """The token from a file (its first line) or from ``$CTSLICEINTERP_TOKEN``; None if neither."""
    if token_file:
        path = Path(token_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").strip().splitlines()
        except OSError as exc:
            raise InputError(f"cannot read the token file {path}: {exc.strerror}") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise InputError(f"the token file {path} is empty")
        return token
    return environ.get(TOKEN_ENV, "").strip() or None


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
