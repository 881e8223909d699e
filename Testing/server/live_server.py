"""A real uvicorn server on 127.0.0.1 (a free port), run in a thread of the test process.

Test modules import the fixtures from here (a conftest.py in this folder would shadow
Testing/conftest.py, whose helpers they also import)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

TOKEN = "test-token-0123456789abcdef"


class RunningServer:
    def __init__(self, config, port: int = 0, ssl_certfile=None, ssl_keyfile=None):
        import uvicorn

        from ctsliceinterp.serving.server import create_app
        from ctsliceinterp.serving.server.runner import listening_socket, uvicorn_config

        self.config = config
        self.app = create_app(config)
        self.sock = listening_socket("127.0.0.1", port)  # as `serve` binds it (TCP_NODELAY)
        self.port = self.sock.getsockname()[1]
        scheme = "https" if ssl_certfile else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(self.app, config, ssl_certfile, ssl_keyfile, log_level="warning", keep_alive=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    @property
    def manager(self):
        return self.app.state.manager

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture
def start_server():
    """``start_server(**ServerConfig fields)`` -> RunningServer; all are stopped after the test."""
    from ctsliceinterp.serving.server import ServerConfig

    servers = []

    def _start(port: int = 0, ssl_certfile=None, ssl_keyfile=None, **fields):
        server = RunningServer(ServerConfig(**fields), port, ssl_certfile, ssl_keyfile)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def shared_server():
    """One plain server (no token) for the tests that do not need special settings."""
    from ctsliceinterp.serving.server import ServerConfig

    server = RunningServer(ServerConfig(max_upload_bytes=2 * 1024 * 1024))
    yield server
    server.stop()


def self_signed_certificate(folder: Path, name: str = "server"):
    """(cert.pem, key.pem) for 127.0.0.1, valid for a day: with cryptography, else the openssl command."""
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    try:
        from cryptography import x509  # noqa: F401
    except ImportError:
        import shutil
        import subprocess

        if not shutil.which("openssl"):
            pytest.skip("neither the cryptography package nor the openssl command is available")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )
        return cert, key

    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert, key
