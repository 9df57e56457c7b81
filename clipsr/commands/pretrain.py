"""``clipsr pretrain``: source pretraining on Ray Train."""
from __future__ import annotations

import argparse

from clipsr.commands._args import add_verbose


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train a source model on Ray Train (resumes a run of the same name)",
        description="Source pretraining: config file (schemas/pretrain.schema.json) plus --set overrides.",
    )
    p.add_argument("--config", help="YAML/JSON config (path or URI); defaults: clipsr/train/defaults.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set optim.steps=2000 --set scaling.num_workers=2")
    p.add_argument("--name", help="run name (same as --set name=...)")
    p.add_argument("--storage-path", help="local folder or s3:// prefix for checkpoints and the model")
    add_verbose(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from clipsr.ray_runtime import init_ray, ray_log
    from clipsr.train.settings import load_settings
    from clipsr.train.trainer import pretrain

    overrides = list(args.set)
    if args.name:
        overrides.append(f"name={args.name}")
    if args.storage_path:
        overrides.append(f"storage_path={args.storage_path}")
    settings = load_settings(args.config, overrides)
    init_ray(quiet=not args.verbose, worker_output=True)  # the training loop's step lines come from worker 0
    meta = pretrain(settings, verbose=args.verbose)
    ray_note = f"; Ray's log: {ray_log()}" if ray_log() else ""
    print(f"pretrain: run {settings['name']} finished: model {meta['id']} at {meta['uri']}{ray_note}")
    return 0
