"""Hostile peers on 127.0.0.1 for the fault tests: a raw HTTP server that answers what a test
tells it to (wrong shapes, huge lengths, slow drips, resets), and a TCP proxy that breaks chosen
connections in front of a real server. Both are bounded: every connection has a time limit and
everything stops when the test ends."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from typing import Callable, Optional

CONNECTION_LIMIT_S = 20.0  # no fake connection lives longer than this


class Request:
    def __init__(self, method: str, path: str, headers: dict, sock: socket.socket, rest: bytes):
        self.method, self.path, self.headers, self.sock, self.rest = method, path, headers, sock, rest
        self.body_bytes = len(rest)

    def read_body(self, limit: float = 5.0) -> bytes:
        """The body (by Content-Length), or what arrived within ``limit`` seconds."""
        length = int(self.headers.get("content-length", "0"))
        data = bytearray(self.rest)
        deadline = time.monotonic() + limit
        while len(data) < length and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        self.body_bytes = len(data)
        return bytes(data)

    def send(self, status: int, body: bytes = b"", headers: Optional[dict] = None) -> None:
        send_response(self.sock, status, body, headers)

    def send_json(self, status: int, value) -> None:
        self.send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})


def send_response(sock: socket.socket, status: int, body: bytes = b"", headers: Optional[dict] = None) -> None:
    head = {"Content-Length": str(len(body)), **(headers or {})}
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in head.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def read_head(sock: socket.socket) -> tuple[Optional[tuple[str, str, dict]], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return (method, path, headers), rest


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed peer or a middlebox does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FakeServer:
    """``FakeServer(handler)``: ``handler(request)`` answers each request (keep-alive until the
    handler returns False or the peer closes)."""

    def __init__(self, handler: Callable[[Request], Optional[bool]]):
        self.handler = handler
        self.requests: list[Request] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            thread = threading.Thread(target=self._connection, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _connection(self, conn: socket.socket) -> None:
        end = time.monotonic() + CONNECTION_LIMIT_S
        try:
            while not self._stop.is_set() and time.monotonic() < end:
                conn.settimeout(max(0.01, end - time.monotonic()))
                head, rest = read_head(conn)
                if head is None:
                    return
                request = Request(*head, conn, rest)
                self.requests.append(request)
                if self.handler(request) is False:
                    return
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def count(self, method: str, prefix: str = "") -> int:
        return sum(1 for r in self.requests if r.method == method and r.path.startswith(prefix))

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()
        self._accept.join(2)
        for thread in self._threads:
            thread.join(CONNECTION_LIMIT_S)


class BreakingProxy:
    """A TCP proxy to ``port`` on 127.0.0.1 that resets the connections ``should_break(index)``
    names after ``after_bytes`` bytes from the client; the others pass through untouched."""

    def __init__(self, port: int, should_break: Callable[[int], bool], after_bytes: int = 256 * 1024):
        self.target, self.should_break, self.after_bytes = port, should_break, after_bytes
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.broken = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            index = self.connections
            self.connections += 1
            threading.Thread(target=self._pipe, args=(client, index), daemon=True).start()

    def _pipe(self, client: socket.socket, index: int) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target), timeout=CONNECTION_LIMIT_S)
        client.settimeout(CONNECTION_LIMIT_S)
        breaking = self.should_break(index)

        def downstream() -> None:
            try:
                while chunk := upstream.recv(1 << 20):
                    client.sendall(chunk)
            except OSError:
                pass
            finally:
                try:
                    client.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        back = threading.Thread(target=downstream, daemon=True)
        back.start()
        forwarded = 0
        try:
            while chunk := client.recv(1 << 16):
                if breaking and forwarded + len(chunk) > self.after_bytes:
                    self.broken += 1
                    reset(client)
                    reset(upstream)
                    return
                upstream.sendall(chunk)
                forwarded += len(chunk)
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        back.join(CONNECTION_LIMIT_S)
        for sock in (client, upstream):
            try:
                sock.close()
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(2)
