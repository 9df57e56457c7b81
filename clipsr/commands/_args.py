"""Argument types and option shapes shared by several subcommands."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def name_eq_uri(text: str) -> tuple[str, str]:
    name, sep, uri = text.partition("=")
    if not sep or not name or not uri:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR_OR_URI, got {text!r}")
    return name, uri


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def usage_errors_exit_1(p: argparse.ArgumentParser) -> None:
    """For jobs whose exit status 2 means "finished, some items failed": argparse's usage errors
    (also 2 by default) then exit 1, "could not run", so an operator never confuses the two."""

    def usage_error(message: str) -> None:
        p.print_usage(sys.stderr)
        p.exit(1, f"{p.prog}: error: {message}\n")

    p.error = usage_error


def add_verbose(p: argparse.ArgumentParser) -> None:
    """``--verbose`` after the subcommand too (``clipsr enhance ... --verbose``, and the jobs/ entry
    points, which only pass the subcommand's arguments). SUPPRESS: absent here, ``clipsr -v``
    before the subcommand still counts."""
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug logging, and Ray's own output (its progress bars and logs) on the console "
                        "instead of in the log file the summary names")


def scope_at_lr(text: str) -> tuple[str, float]:
    scope, sep, lr = text.partition("@")
    scopes = ("adaptive", "adaptive+bias", "all")
    try:
        if not sep or scope not in scopes or float(lr) <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SCOPE@LR with SCOPE in {scopes}, got {text!r}") from None
    return scope, float(lr)


def add_out(q: argparse.ArgumentParser, default: str) -> None:
    """Every benchmark writes its figures to a JSON file; --out says where."""
    q.add_argument("--out", default=default, help="where to write the JSON (path or URI)")


def write_json(uri: str, result: Any) -> None:
    from clipsr import storage

    storage.write_bytes_atomic(uri, (json.dumps(result, indent=2) + "\n").encode())


def cap_seconds(text: str) -> float | None:
    """A safety cap in seconds; 0 means none."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0 (0: no cap), got {value:g}")
    return value or None


def degradation_spec(text: str) -> str:
    """``clean``, ``jpeg:Q`` or ``jpeg:Q1-Q2``, checked and in its canonical form."""
    from clipsr.degradations import Degradation

    try:
        return Degradation.parse(text).label
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
