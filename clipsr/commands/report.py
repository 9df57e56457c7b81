"""``clipsr report``: one self-contained HTML page on an enhance run."""
from __future__ import annotations

import argparse

from clipsr.commands._args import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page on an enhance run: counts, failures, quality plots, crops",
        description="Reads one run's manifest (no Ray, no model) and writes --out, with the JSON record "
                    "beside it (same name, .json).",
    )
    p.add_argument("--manifest", required=True,
                   help="a run's manifest folder (.../run=<id>) or the manifest root (then the latest run, or --run)")
    p.add_argument("--run", help="run id under the manifest root")
    p.add_argument("--out", required=True, help="HTML file to write (path or URI)")
    p.add_argument("--samples", type=int, default=3, help="bicubic | enhanced crops per domain (default 3)")
    p.add_argument("--crop", type=positive_int, default=128, help="side of a crop in output pixels (default 128)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from clipsr.report import build_report, write_report

    report = build_report(args.manifest, args.run, samples=args.samples, crop=args.crop)
    html_uri, json_uri = write_report(report, args.out)
    st = report["statuses"]
    print(f"report: run {report['run_id']}: {report['rows']} rows, {st['ok']} ok, {st['failed']} failed, "
          f"{st['skipped']} skipped; {html_uri} (record {json_uri})")
    return 0
