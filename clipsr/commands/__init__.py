"""One module per ``clipsr`` subcommand; each exposes ``add_parser(subparsers)``."""
