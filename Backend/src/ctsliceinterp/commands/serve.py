"""`ctsliceinterp serve`: the inference server (FastAPI on uvicorn), local or on a remote GPU host.

Loopback binds may run without a token (the Slicer module's local mode); any other address
needs one. ``--port 0`` picks a free port and ``--ready-file F`` writes ``{"url", "pid"}`` to F
once the server accepts connections, so a parent process knows where to connect."""

from __future__ import annotations

import sys

DEFAULT_PORT = 8000


def configure_parser(parser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs a token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME|PATH", help="diffusion model to serve and keep loaded (repeatable; default: the shipped model 'default')")
    parser.add_argument("--no-default-model", action="store_true", help="without --model, serve the classical methods only")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device for diffusion models (default auto)")
    parser.add_argument("--token-file", metavar="F", help="file whose first line is the bearer token (or set CTSLICEINTERP_TOKEN)")
    parser.add_argument("--ssl-certfile", metavar="F", help="TLS certificate (PEM); serve HTTPS")
    parser.add_argument("--ssl-keyfile", metavar="F", help="TLS private key (PEM)")
    parser.add_argument("--max-upload-mb", type=float, default=512, help="largest accepted upload in MiB (default 512)")
    parser.add_argument("--queue-size", type=int, default=16, help="jobs that may wait; more get 503 + Retry-After (default 16)")
    parser.add_argument("--result-ttl", type=float, default=900, metavar="S", help="seconds a finished result is kept when not downloaded (default 900)")
    parser.add_argument("--max-held-gb", type=float, default=8, help="memory for results that are queued, running or not yet downloaded; a job above gets 503 + Retry-After (default 8 GiB)")
    parser.add_argument("--ready-file", metavar="F", help="write {\"url\", \"pid\"} to F once the server accepts connections")
    parser.add_argument("--parent-pid", type=int, metavar="PID", help="exit when this process ends (for servers started by Slicer)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level (default info)")


def main(args) -> int:
    import json
    import logging
    import os
    import socket
    import threading
    import time

    import uvicorn

    from ..core.errors import InputError
    from ..api import DEFAULT_MODEL, shipped_model_available
    from ..io.atomic import atomic_file
    from ..serving.server import ServerConfig, create_app
    from ..serving.access import read_token
    from ..serving.server.auth import check_bind_allowed
    from ..serving.server.config import MiB

    token = read_token(args.token_file)
    check_bind_allowed(args.host, token)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise InputError("--ssl-certfile and --ssl-keyfile go together")
    for path in (args.ssl_certfile, args.ssl_keyfile):
        if path and not os.path.isfile(path):
            raise InputError(f"TLS file {path} does not exist")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be 0..65535, got {args.port}")
    if args.max_upload_mb <= 0 or args.queue_size < 1 or args.max_held_gb <= 0:
        raise InputError("--max-upload-mb and --max-held-gb must be > 0, and --queue-size >= 1")

    logging.getLogger("ctsliceinterp.serving.server").setLevel(args.log_level.upper())
    models = list(args.model)
    if not models and not args.no_default_model and shipped_model_available():
        models = [DEFAULT_MODEL]
    config = ServerConfig(
        host=args.host, port=args.port, token=token, models=models, device=args.device,
        max_upload_bytes=int(args.max_upload_mb * MiB), queue_size=args.queue_size, result_ttl_seconds=args.result_ttl,
        max_held_result_bytes=int(args.max_held_gb * 1024 * MiB),
    )
    app = create_app(config)

    # Bind the socket here: port 0 then tells us which port the system picked.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host.strip("[]"), args.port))
    except OSError as exc:
        raise InputError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    port = sock.getsockname()[1]
    scheme = "https" if args.ssl_certfile else "http"
    display_host = f"[{args.host.strip('[]')}]" if family == socket.AF_INET6 else args.host
    url = f"{scheme}://{display_host}:{port}"

    uv_config = uvicorn.Config(
        app, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, log_level=args.log_level,
        timeout_keep_alive=10, server_header=False, proxy_headers=False,
        access_log=False,  # it would log full job ids (capabilities to a result); jobs.py logs prefixes
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                print(f"ctsliceinterp: serving on {url} (token {'required' if token else 'off: loopback only'})", file=sys.stderr, flush=True)
                if args.ready_file:
                    with atomic_file(args.ready_file) as tmp:
                        tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}), encoding="utf-8")

        async def shutdown(self, sockets=None):
            # Here, not after run(): uvicorn re-raises SIGTERM/SIGINT once run() ends.
            _remove(args.ready_file)
            await super().shutdown(sockets=sockets)

    server = Server(uv_config)
    if args.parent_pid:
        def watch_parent() -> None:
            while not server.should_exit:
                if not _alive(args.parent_pid):
                    server.should_exit = True
                time.sleep(1.0)

        threading.Thread(target=watch_parent, daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        _remove(args.ready_file)
    return 0 if server.started else 1


def _remove(path) -> None:
    import os

    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    import os

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
