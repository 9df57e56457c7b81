"""``clipsr evaluate``: score a model or bicubic under the evaluation protocol."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from clipsr.commands._args import name_eq_uri


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a model (or bicubic) on benchmark folders",
        description="Y-PSNR/Y-SSIM/RGB-PSNR under the project's evaluation protocol.",
    )
    p.add_argument("--model", required=True, help="bicubic, default, default-x2, or a checkpoint path/URI")
    p.add_argument("--scale", type=int, required=True, help="upscaling factor (2, 3, 4, 8 or 16)")
    p.add_argument("--data", type=name_eq_uri, action="append", required=True, metavar="NAME=DIR",
                   help="a named folder or prefix of HR images; repeat for several")
    p.add_argument("--skip-first", type=int, default=0, metavar="K",
                   help="leave out the first K images of each folder in sorted order (few-shot exemplars)")
    p.add_argument("--report", required=True, help="where to write the JSON report (path or URI)")
    p.add_argument("--clip-weights", default=None, help="CLIP weights file/URI, for models trained with one")
    p.add_argument("--strength", type=float, metavar="S",
                   help="an adapted model with its weights moved only S (0 to 1) of the way from its source "
                        "model's, as clipsr enhance --strength")
    p.add_argument("--device", default="cpu",
                   help="torch device the model runs on: cpu (default), cuda, or cuda:N for one GPU of several")
    p.add_argument("--jpeg", type=int, metavar="Q",
                   help="save each protocol LR as a JPEG at quality Q (1-100) before upscaling, as archives "
                        "store images; bicubic is scored on the same input")
    p.add_argument("--tile", type=int, default=256, help="LR tile size for inference (memory bound)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from clipsr import storage
    from clipsr.evaluate import evaluate, format_table
    from clipsr.factory import load_upscaler

    datasets = dict(args.data)
    if len(datasets) != len(args.data):
        raise ValueError("each --data NAME must be unique")
    upscaler = load_upscaler(args.model, args.scale, clip_weights=args.clip_weights,
                             device=args.device, tile=args.tile, strength=args.strength)

    def progress(row: dict[str, Any]) -> None:
        name = row["uri"].rsplit("/", 1)[-1]
        result = row.get("error") or ("exact reconstruction (infinite PSNR)" if row["exact"]
                                      else f"Y-PSNR {row['psnr_y']:.3f} dB")
        print(f"[{row['dataset']}] {row['index'] + 1:>4} {name}: {result} ({row['seconds']:.2f}s)",
              file=sys.stderr, flush=True)

    report = evaluate(upscaler, datasets, skip_first=args.skip_first, on_image=progress, jpeg=args.jpeg)
    storage.write_bytes_atomic(args.report, json.dumps(report, indent=2).encode())
    print(format_table(report))
    failed = sum(d["failed"] for d in report["datasets"].values())
    if failed:
        print(f"warning: {failed} image(s) could not be evaluated; see 'images' in {args.report}",
              file=sys.stderr)
    print(f"report: {args.report}")
    return 0
