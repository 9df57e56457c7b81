"""The ``clipsr`` command: one subcommand per job."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from clipsr.commands import adapt, bench, enhance, evaluate, pretrain, registry, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipsr", description="Super-resolution of image archives on Ray: "
                                     "enhance, adapt, pretrain, evaluate, report.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's own output (progress bars, logs) on the console")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (evaluate, enhance, bench, pretrain, adapt, report, registry):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, LookupError, FileNotFoundError, PermissionError) as e:
        print(f"clipsr {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
