"""CLI subcommands: each module has ``configure_parser(parser)`` and ``main(args) -> int``."""
