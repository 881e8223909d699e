"""`ctsliceinterp` command line. Each subcommand lives in ``commands/<name>.py`` with
``configure_parser(parser)`` (cheap: no heavy imports) and ``main(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .core.errors import Cancelled, CTSliceInterpError

# (name, module under ctsliceinterp.commands, one-line help)
SUBCOMMANDS = [
    ("info", "info", "print geometry and an intensity summary of a volume"),
    ("interpolate", "interpolate", "interpolate a thick CT onto a thin grid"),
    ("simulate-thick", "simulate_thick", "simulate thick slices from a thin CT (slab means)"),
    ("evaluate", "evaluate", "compare methods against a thin reference (PSNR, SSIM, figures)"),
    ("serve", "serve", "run the inference server (local or remote GPU)"),
    ("preprocess", "preprocess", "turn a DICOM case dataset into a training cache"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctsliceinterp", description="Thick-slice to thin-slice CT interpolation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name, help_text in SUBCOMMANDS:
        try:
            module = importlib.import_module(f".commands.{module_name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(f"{__package__}.commands"):
                continue  # subcommand not implemented in this build
            raise
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.configure_parser(command)
        command.set_defaults(handler=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except Cancelled as exc:
        print(f"ctsliceinterp: cancelled: {exc}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`: not an error of ours.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("ctsliceinterp: interrupted", file=sys.stderr)
        return 130
    except CTSliceInterpError as exc:
        if args.debug:
            raise
        print(f"ctsliceinterp: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("ctsliceinterp: error: out of memory; try a smaller chunk or the CPU/GPU with more memory", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - last resort: one line, no traceback unless --debug
        if args.debug:
            raise
        print(f"ctsliceinterp: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
