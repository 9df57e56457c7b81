"""``clipsr adapt``: few-shot adaptation of many domains in parallel into a registry."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from clipsr.adapt.settings import AdaptSettings
from clipsr.commands._args import (add_verbose, cap_seconds, degradation_spec, positive_int, scope_at_lr,
                                   usage_errors_exit_1)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="adapt a source model to new domains from a few HR exemplars each, in parallel",
        description="Few-shot adaptation; each domain becomes a new version in the registry at --out. "
                    "Exit 0: every domain published; 2: some domain failed (see the report); 1: could not run.",
    )
    p.add_argument("--source-model", default="default", help="model spec to adapt (default: the bundled model)")
    p.add_argument("--domain", action="append", default=[], metavar="NAME=DIR_OR_URI",
                   help="a domain and its exemplar folder (the first --shots images in sorted order)")
    p.add_argument("--spec", help="YAML/JSON domain specs (schemas/domain-spec.schema.json)")
    p.add_argument("--shots", type=int, default=10, help="exemplars per domain for --domain (default 10)")
    p.add_argument("--scale", type=int, help="must match the source model's scale")
    p.add_argument("--out", required=True, help="model registry (folder or s3:// prefix)")
    p.add_argument("--candidate", action="append", type=scope_at_lr, metavar="SCOPE@LR",
                   help="a (scope, learning rate) to probe, e.g. adaptive+bias@2e-3 or all@3e-4 (repeat); "
                        "the best on the held-out exemplars is trained on (default: all@2e-3)")
    p.add_argument("--steps", type=positive_int, default=AdaptSettings.steps,
                   help="training steps per domain: the budget, so the same exemplars, seed and settings give "
                        f"the same model on any machine (default {AdaptSettings.steps})")
    p.add_argument("--budget-seconds", type=cap_seconds, default=AdaptSettings.budget_seconds,
                   help="a safety cap, not a budget: a domain still training after this many seconds stops "
                        f"there and records 'time cap' (0: no cap; default {AdaptSettings.budget_seconds:g})")
    p.add_argument("--patch-tries", type=positive_int, default=AdaptSettings.patch_tries,
                   help="each training patch is the most textured of this many random positions")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=AdaptSettings.precision,
                   help="training arithmetic (auto: bf16 on CPUs with AVX-512 BF16, else fp32)")
    p.add_argument("--cpus-per-domain", type=float, default=1.0,
                   help="CPUs (and torch threads) per domain: a node of N CPUs adapts N / this many domains "
                        "at once (default 1)")
    p.add_argument("--clip-weights", help="CLIP weights file/URI, for a source model trained with one: adaptation "
                                          "runs it as inference will, and refuses other weights")
    p.add_argument("--gpus-per-domain", type=float, default=0.0, help="> 0: each domain trains on a GPU")
    p.add_argument("--routing-encoder", default="route-stats",
                   help="encoder of the exemplars for --route auto: route-stats (weight-free image statistics, "
                        "the default) or a CLIP arch with --routing-encoder-weights")
    p.add_argument("--routing-encoder-weights", help="weights file/URI for a CLIP routing encoder")
    p.add_argument("--report", help="report path/URI without extension (default REGISTRY/_reports/<time>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patch sampling and training (default 0)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--degradation", type=degradation_spec, default="clean", metavar="SPEC",
                     help="what the domains' archive did to its images after downscaling: clean (default), "
                          "jpeg:Q or jpeg:Q1-Q2; the exemplars' LR is degraded the same way (every domain "
                          "whose --spec entry names no degradation of its own)")
    how.add_argument("--degradation-from", metavar="URI",
                     help="measure it from a sample of the archive under URI (JPEG quality from the files' "
                          "quantisation tables): jpeg:Q at their median quality, or clean")
    add_verbose(p)
    usage_errors_exit_1(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from clipsr import storage
    from clipsr.adapt.run import adapt_many, format_report, write_report
    from clipsr.adapt.settings import AdaptSettings
    from clipsr.adapt.archive_degradation import with_archive_degradations
    from clipsr.adapt.spec import DomainSpec, load_specs
    from clipsr.provenance import utc_now
    from clipsr.adapt.progress import ProgressBoard
    from clipsr.adapt.routing_fit import report_confusion
    from clipsr.ray_runtime import init_ray, ray_log

    specs = [DomainSpec.shorthand(d, args.shots, args.scale) for d in args.domain]
    if args.spec:
        specs += load_specs(args.spec)
    if not specs:
        raise ValueError("give at least one --domain NAME=DIR or a --spec file")
    specs = with_archive_degradations(specs, args.degradation, args.degradation_from,
                                      lambda line: print(line, file=sys.stderr, flush=True))
    settings = AdaptSettings(steps=args.steps, budget_seconds=args.budget_seconds, seed=args.seed,
                             patch_tries=args.patch_tries, precision=args.precision)
    if args.candidate:
        settings = dataclasses.replace(settings, candidates=tuple(args.candidate))
    encoder = {"arch": args.routing_encoder, "weights": args.routing_encoder_weights, "seed": 0}
    out = storage.absolute(args.out)
    init_ray(quiet=not args.verbose)
    print(f"adapting {len(specs)} domain(s) from {args.source_model} into {out}", file=sys.stderr, flush=True)
    board = ProgressBoard({s.name: settings.planned_steps() for s in specs})

    def done(row: dict[str, Any]) -> None:
        what = f"v{row['version']} gain {row['gain_db']:+.3f} dB" if row["status"] == "ok" else row["error"]
        board.finished(row, f"[{row['domain']}] {row['status']}: {what} ({row['seconds']:.0f}s)")

    try:
        rows = adapt_many(specs, args.source_model, settings, out, encoder,
                          cpus_per_domain=args.cpus_per_domain, gpus_per_domain=args.gpus_per_domain, on_done=done,
                          clip_weights=args.clip_weights, on_progress=board.update)
    finally:
        board.close()
    base = args.report or storage.join(out, f"_reports/{utc_now().replace(':', '')}")
    json_uri, _ = write_report(rows, base)
    print(format_report(rows))
    print(report_confusion(out, base, {r['domain']: r['version'] for r in rows if r['status'] == 'ok'}))
    failed = sum(r["status"] != "ok" for r in rows)
    ray_note = f"; Ray's log: {ray_log()}" if ray_log() else ""
    print(f"adapt: {len(rows) - failed} ok, {failed} failed; report {json_uri}{ray_note}")
    return 2 if failed else 0
