"""`ctsliceinterp serve`: the inference server (FastAPI on uvicorn), local or on a remote GPU host.

Loopback binds may run without a token (the Slicer module's local mode); any other address
needs one. ``--port 0`` picks a free port and ``--ready-file F`` writes ``{"url", "pid"}`` to F
once the server accepts connections, so a parent process knows where to connect."""

from __future__ import annotations

from ..api import SHIPPED_MODELS

DEFAULT_PORT = 8000


def configure_parser(parser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs a token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME|PATH", help="model of a learned method to serve and keep loaded: a shipped name or a checkpoint folder "
                        "(repeatable; default: the shipped models that are installed: "
                        f"{', '.join(map(repr, SHIPPED_MODELS))})")
    parser.add_argument("--no-default-model", action="store_true", help="without --model, serve the classical methods only")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device for the learned methods' models (default auto)")
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
    from ..serving.server import create_app
    from ..serving.server.runner import serve

    config = server_config(args)
    return serve(create_app(config), config, args.ssl_certfile, args.ssl_keyfile, args.ready_file, args.parent_pid, args.log_level)


def server_config(args):
    """The checked command line as a ``ServerConfig`` (``InputError`` naming a bad option)."""
    import logging
    import os

    from ..api import shipped_model_available
    from ..core.errors import InputError
    from ..serving.access import read_token
    from ..serving.server import ServerConfig
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
    if not models and not args.no_default_model:
        models = [name for name in SHIPPED_MODELS if shipped_model_available(name)]
    return ServerConfig(
        host=args.host, port=args.port, token=token, models=models, device=args.device,
        max_upload_bytes=int(args.max_upload_mb * MiB), queue_size=args.queue_size, result_ttl_seconds=args.result_ttl,
        max_held_result_bytes=int(args.max_held_gb * 1024 * MiB),
    )
