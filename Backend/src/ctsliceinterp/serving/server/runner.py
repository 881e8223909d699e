"""Running the app under uvicorn: the listening socket, an HTTP protocol with a deadline for each
request head, and the serve loop (ready file, parent watch). ``ctsliceinterp serve``, the tests'
live server and the benchmark all start servers through here, so they measure what ships."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Optional

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ...core.errors import InputError
from .config import ServerConfig


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (``port`` 0: the system picks one; ``getsockname`` says which).

    TCP_NODELAY is set on it, and accepted connections inherit it: without it every small answer
    waits for the client's delayed ACK under Nagle's algorithm (about 40 ms a request). asyncio
    sets it only on sockets made with ``IPPROTO_TCP``, which a plain ``socket.socket()`` is not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request head.

    uvicorn alone waits for ever for a request line and headers that come a byte at a time (or
    not at all), so slow clients can hold connections without limit. Here the head must arrive
    within ``header_timeout`` s of the connection, or of the previous answer on a kept-alive
    connection; otherwise the connection is closed. A request whose head has arrived is left
    alone (its body has its own pace, in ``upload.read_body``)."""

    header_timeout = 10.0
    _head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        armed_for = self.cycle
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired, armed_for)

    def _cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self, armed_for) -> None:
        waiting_for_head = self.cycle is armed_for and (self.cycle is None or self.cycle.response_complete)
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


def protocol_class(header_timeout: float) -> type:
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"header_timeout": float(header_timeout)})


def uvicorn_config(app, config: ServerConfig, ssl_certfile: Optional[str] = None, ssl_keyfile: Optional[str] = None,
                   log_level: str = "info", keep_alive: float = 10.0) -> uvicorn.Config:
    return uvicorn.Config(
        app, http=protocol_class(config.header_timeout_seconds), ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
        log_level=log_level, timeout_keep_alive=keep_alive, server_header=False, proxy_headers=False,
        access_log=False,  # it would log full job ids (capabilities to a result); jobs.py logs prefixes
    )


def serve(app, config: ServerConfig, ssl_certfile: Optional[str] = None, ssl_keyfile: Optional[str] = None,
          ready_file: Optional[str] = None, parent_pid: Optional[int] = None, log_level: str = "info") -> int:
    """Serve until SIGINT/SIGTERM (or until ``parent_pid`` ends); 0 if the server started."""
    from ...io.atomic import atomic_file

    sock = listening_socket(config.host, config.port)  # bound here: port 0 then tells us which port the system picked
    family_v6 = sock.family == socket.AF_INET6
    display_host = f"[{config.host.strip('[]')}]" if family_v6 else config.host
    url = f"{'https' if ssl_certfile else 'http'}://{display_host}:{sock.getsockname()[1]}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                state = "required" if config.token else "off: loopback only"
                print(f"ctsliceinterp: serving on {url} (token {state})", file=sys.stderr, flush=True)
                if ready_file:
                    with atomic_file(ready_file) as tmp:
                        tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}), encoding="utf-8")

        async def shutdown(self, sockets=None):
            # Here, not after run(): uvicorn re-raises SIGTERM/SIGINT once run() ends.
            _remove(ready_file)
            await super().shutdown(sockets=sockets)

    server = Server(uvicorn_config(app, config, ssl_certfile, ssl_keyfile, log_level))
    if parent_pid:
        threading.Thread(target=_exit_with_parent, args=(server, parent_pid), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        _remove(ready_file)
    return 0 if server.started else 1


def _exit_with_parent(server: uvicorn.Server, pid: int) -> None:
    while not server.should_exit:
        if not _alive(pid):
            server.should_exit = True
        time.sleep(1.0)


def _remove(path) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT: still running
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
