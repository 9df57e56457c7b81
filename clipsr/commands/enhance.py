"""``clipsr enhance``: the archive enhancement job (options live in :mod:`clipsr.enhance.options`)."""
from __future__ import annotations

import argparse

from clipsr.commands._args import add_verbose, usage_errors_exit_1


def add_parser(sub: argparse._SubParsersAction) -> None:
    from clipsr.enhance.options import add_arguments

    p = sub.add_parser(
        "enhance",
        help="enhance an archive prefix on Ray Data, with Parquet manifests (the main job)",
        description="Enhance every image below --input into --output (same relative keys), with one "
                    "manifest row per listed key. Exit 0: finished, failed fraction within "
                    "--max-failed-fraction; 2: finished above it; 1: could not complete. The failed inputs "
                    "are named above the summary line; Ray's own output goes to a log file the summary "
                    "names (--verbose: to the console).",
    )
    add_arguments(p)
    add_verbose(p)
    usage_errors_exit_1(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from clipsr.enhance.options import EnhanceOptions
    from clipsr.enhance.run import run_enhance

    result = run_enhance(EnhanceOptions.from_args(args), verbose=args.verbose)
    for line in result.named:
        print(line)
    print(result.summary, flush=True)
    return result.exit_code
