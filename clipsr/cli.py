"""The ``clipsr`` command: one subcommand per job."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any, Sequence

from clipsr import registry_cli
from clipsr.adapt.settings import AdaptSettings

log = logging.getLogger("clipsr")


def _name_eq_uri(text: str) -> tuple[str, str]:
    name, sep, uri = text.partition("=")
    if not sep or not name or not uri:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR_OR_URI, got {text!r}")
    return name, uri


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _usage_errors_exit_1(p: argparse.ArgumentParser) -> None:
    """For jobs whose exit status 2 means "finished, some items failed": argparse's usage errors
    (also 2 by default) then exit 1, "could not run", so an operator never confuses the two."""

    def usage_error(message: str) -> None:
        p.print_usage(sys.stderr)
        p.exit(1, f"{p.prog}: error: {message}\n")

    p.error = usage_error


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a model (or bicubic) on benchmark folders",
        description="Y-PSNR/Y-SSIM/RGB-PSNR under the project's evaluation protocol.",
    )
    p.add_argument("--model", required=True, help="bicubic, default, default-x2, or a checkpoint path/URI")
    p.add_argument("--scale", type=int, required=True, help="upscaling factor (2, 3, 4 or 8)")
    p.add_argument("--data", type=_name_eq_uri, action="append", required=True, metavar="NAME=DIR",
                   help="a named folder or prefix of HR images; repeat for several")
    p.add_argument("--skip-first", type=int, default=0, metavar="K",
                   help="leave out the first K images of each folder in sorted order (few-shot exemplars)")
    p.add_argument("--report", required=True, help="where to write the JSON report (path or URI)")
    p.add_argument("--clip-weights", default=None, help="CLIP weights file/URI, for models trained with one")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tile", type=int, default=256, help="LR tile size for inference (memory bound)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from clipsr import storage
    from clipsr.evaluate import evaluate, format_table
    from clipsr.factory import load_upscaler

    datasets = dict(args.data)
    if len(datasets) != len(args.data):
        raise ValueError("each --data NAME must be unique")
    upscaler = load_upscaler(args.model, args.scale, clip_weights=args.clip_weights,
                             device=args.device, tile=args.tile)

    def progress(row: dict[str, Any]) -> None:
        name = row["uri"].rsplit("/", 1)[-1]
        result = row.get("error") or ("exact reconstruction (infinite PSNR)" if row["exact"]
                                      else f"Y-PSNR {row['psnr_y']:.3f} dB")
        print(f"[{row['dataset']}] {row['index'] + 1:>4} {name}: {result} ({row['seconds']:.2f}s)",
              file=sys.stderr, flush=True)

    report = evaluate(upscaler, datasets, skip_first=args.skip_first, on_image=progress)
    storage.write_bytes_atomic(args.report, json.dumps(report, indent=2).encode())
    print(format_table(report))
    failed = sum(d["failed"] for d in report["datasets"].values())
    if failed:
        print(f"warning: {failed} image(s) could not be evaluated; see 'images' in {args.report}",
              file=sys.stderr)
    print(f"report: {args.report}")
    return 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from clipsr.ray_runtime import init_ray
    from clipsr.train.settings import load_settings
    from clipsr.train.trainer import pretrain

    overrides = list(args.set)
    if args.name:
        overrides.append(f"name={args.name}")
    if args.storage_path:
        overrides.append(f"storage_path={args.storage_path}")
    settings = load_settings(args.config, overrides)
    init_ray()
    meta = pretrain(settings)
    print(f"pretrain: run {settings['name']} finished: model {meta['id']} at {meta['uri']}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures and write them to a JSON file")
    benches = p.add_subparsers(dest="bench", required=True)
    q = benches.add_parser(
        "inference",
        help="parameter counts and CPU inference speed per architecture and scale",
        description="Parameters at inference (adaptive branch folded) and with the branch, and CPU "
                    "speed in output megapixels per second on a fixed LR input (median of timed runs).",
    )
    q.add_argument("--arch", action="append", metavar="NAME",
                   help="architecture to measure (repeat); default: all shipped but cdasr-tiny")
    q.add_argument("--scale", type=int, action="append", metavar="S",
                   help="scale to measure (repeat); default: 2, 3, 4 and 8")
    q.add_argument("--size", type=_positive_int, default=128, help="side of the square LR input in pixels")
    q.add_argument("--runs", type=_positive_int, default=5, help="timed runs per configuration (after one warm-up)")
    q.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    q.add_argument("--out", default="docs/bench/inference.json", help="where to write the JSON (path or URI)")
    q.set_defaults(func=_run_bench_inference)
    _add_bench_enhance(benches)
    _add_bench_threads(benches)
    _add_bench_plan(benches)
    _add_bench_train(benches)
    _add_bench_adapt(benches)
    q = benches.add_parser(
        "gpu",
        help="the CUDA path: fp32/bf16/fp16 inference agreement and speed, adaptation steps (needs a GPU)",
    )
    q.add_argument("--model", default="default", help="model spec (default: the bundled x4 model)")
    q.add_argument("--runs", type=_positive_int, default=10, help="timed runs per figure")
    q.add_argument("--out", default="docs/bench/gpu.json", help="where to write the JSON (path or URI)")
    q.set_defaults(func=_run_bench_gpu)
    q = benches.add_parser("curve", help="plot a pretraining run's loss and validation PSNR from its log")
    q.add_argument("--log", required=True, help="the log of a `clipsr pretrain` run")
    q.add_argument("--out", required=True, help="PNG to write")
    q.add_argument("--title", default="clipsr pretrain")
    q.set_defaults(func=_run_bench_curve)


def _run_bench_inference(args: argparse.Namespace) -> int:
    import torch

    from clipsr import storage
    from clipsr.bench import inference as bench

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    archs, scales = bench.resolve(args.arch, args.scale)
    print(bench.format_header(), flush=True)
    result = bench.run(archs, scales, lr_size=args.size, runs=args.runs,
                       on_result=lambda r: print(bench.format_row(r), flush=True))
    storage.write_bytes_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())
    env = result["environment"]
    print(f"{env['cpu']}, {env['torch_threads']} torch thread(s), torch {env['torch']}, {env['date']}")
    print(f"results: {args.out}")
    return 0


def _add_bench_plan(benches: argparse._SubParsersAction) -> None:
    q = benches.add_parser(
        "plan", help="the driver at archive scale: planning N keys against an index of them",
        description="Time and peak memory of the enhancement driver planning a synthetic listing of N keys "
                    "(no image is read), the index it commits, and manifest bytes per row.")
    q.add_argument("--keys", type=_positive_int, default=1_000_000, help="number of synthetic keys")
    q.add_argument("--out", default="docs/bench/plan.json", help="where to write the JSON (path or URI)")
    q.set_defaults(func=_run_bench_plan)


def _run_bench_plan(args: argparse.Namespace) -> int:
    from clipsr import storage
    from clipsr.bench import plan

    result = plan.run(args.keys)
    storage.write_bytes_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())
    s = result["seconds"]
    print(f"{result['keys']:,} keys planned in {result['total_s']:.1f} s (index load {s['load_index_s']:.1f}, "
          f"listings {s['load_listings_s']:.1f}, decide+write {s['decide_and_write_s']:.1f}, index commit "
          f"{s['commit_index_s']:.1f}); driver RSS {result['driver_rss_before_mb']:.0f} MB before, peak "
          f"{result['driver_peak_rss_mb']:.0f} MB; index {result['index_bytes'] / 2**20:.1f} MB; manifest "
          f"{result['manifest_bytes_per_ok_row']:.0f} bytes per enhanced row; results: {args.out}")
    return 0


def _add_bench_train(benches: argparse._SubParsersAction) -> None:
    q = benches.add_parser(
        "train",
        help="pretraining throughput (patches/s) with 1 and 2 Ray Train workers",
        description="Runs the real pretraining path for a few steps per worker count, same total CPUs.",
    )
    q.add_argument("--data", action="append", required=True, metavar="DIR", help="HR image folder (repeat)")
    q.add_argument("--workers", type=_positive_int, action="append", help="worker counts (default: 1 and 2)")
    q.add_argument("--cpus", type=float, default=2.0, help="total CPUs shared by the workers")
    q.add_argument("--steps", type=_positive_int, default=60)
    q.add_argument("--arch", default="cdasr-lite")
    q.add_argument("--scale", type=int, default=4)
    q.add_argument("--batch", type=_positive_int, default=16, help="patches per worker per step")
    q.add_argument("--lr-patch", type=_positive_int, default=48)
    q.add_argument("--out", default="docs/bench/train.json", help="where to write the JSON (path or URI)")
    q.set_defaults(func=_run_bench_train)


def _run_bench_train(args: argparse.Namespace) -> int:
    from clipsr import storage
    from clipsr.bench.train import bench_workers
    from clipsr.ray_runtime import init_ray

    init_ray(num_cpus=int(args.cpus))
    result = bench_workers([storage.absolute(d) for d in args.data], args.workers or [1, 2], args.cpus,
                           args.steps, args.arch, args.scale, args.batch, args.lr_patch)
    storage.write_bytes_atomic(args.out, json.dumps(result, indent=2).encode())
    print(f"written to {args.out}")
    return 0


def _run_bench_gpu(args: argparse.Namespace) -> int:
    from clipsr import storage
    from clipsr.bench.gpu import run

    result = run(args.model, args.runs)
    storage.write_bytes_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps({k: result[k] for k in ("agreement", "forward_speed", "whole_image_speed", "adaptation_steps")},
                     indent=1))
    print(f"{result['environment']['gpu']}, torch {result['environment']['torch']}; results: {args.out}")
    return 0


def _run_bench_curve(args: argparse.Namespace) -> int:
    from clipsr import storage
    from clipsr.bench.curve import parse_log, plot

    curve = parse_log(storage.read_bytes(args.log).decode(errors="replace"))
    if not curve["steps"]:
        raise ValueError(f"{args.log} has no training progress lines")
    plot(curve, args.out, args.title)
    last = {n: p[-1] for n, p in curve["val"].items()}
    print(f"{len(curve['steps'])} points up to step {curve['steps'][-1]}; last validation {last}; wrote {args.out}")
    return 0


def _add_bench_adapt(benches: argparse._SubParsersAction) -> None:
    q = benches.add_parser(
        "adapt",
        help="adaptation gain on unseen images: source vs adapted vs fine-tuned, same time budget",
    )
    q.add_argument("--source-model", default="default")
    q.add_argument("--data", type=_name_eq_uri, action="append", required=True, metavar="NAME=DIR")
    q.add_argument("--shots", type=_positive_int, default=10)
    q.add_argument("--budget-seconds", type=float, default=270.0, help="adaptation's time budget per domain")
    q.add_argument("--patch-tries", type=_positive_int, default=AdaptSettings.patch_tries,
                   help="adaptation: each patch the most textured of this many positions")
    q.add_argument("--candidate", action="append", type=_scope_at_lr, metavar="SCOPE@LR",
                   help="adaptation's candidates, as for clipsr adapt (default: its defaults)")
    q.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where adaptation and fine-tuning train")
    q.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=AdaptSettings.precision,
                   help="training arithmetic of both (auto: bf16 on CPUs with AVX-512 BF16, else fp32)")
    q.add_argument("--finetune-lr", type=float, default=3e-4,
                   help="learning rate of the plain fine-tuning baseline (0: leave the baseline out)")
    q.add_argument("--threads", type=_positive_int, default=2)
    q.add_argument("--seed", type=int, default=0, help="seed of both trainings (patches, initial state)")
    q.add_argument("--out", default="docs/bench/adapt.json")
    q.set_defaults(func=_run_bench_adapt)


def _run_bench_adapt(args: argparse.Namespace) -> int:
    from clipsr import storage
    from clipsr.bench.adapt import bench_adaptation

    result = bench_adaptation(args.source_model, {k: storage.absolute(v) for k, v in args.data}, args.shots,
                              args.budget_seconds, args.finetune_lr, args.threads, seed=args.seed,
                              patch_tries=args.patch_tries, device=args.device, precision=args.precision,
                              candidates=tuple(args.candidate or AdaptSettings.candidates))
    storage.write_bytes_atomic(args.out, json.dumps(result, indent=2).encode())
    print(f"written to {args.out}")
    return 0


def _add_bench_enhance(benches: argparse._SubParsersAction) -> None:
    q = benches.add_parser(
        "enhance",
        help="the enhancement job on Ray against a plain loop (same model, images, stages, threads)",
        description="Images/s, output megapixels/s and peak memory of `clipsr enhance` (Ray start-up "
                    "excluded) and of a one-process loop, on synthetic PNGs in a temporary folder.",
    )
    q.add_argument("--images", type=_positive_int, default=200, help="number of synthetic inputs")
    q.add_argument("--size", type=_positive_int, default=256, help="side of the square LR inputs in pixels")
    q.add_argument("--scale", type=int, default=4)
    q.add_argument("--model", help="model spec (default: random weights of --arch)")
    q.add_argument("--arch", default="cdasr-lite", help="architecture for random weights when --model is not given")
    q.add_argument("--threads", type=_positive_int, default=1, help="torch threads, for the loop and each actor")
    q.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="network arithmetic of both (auto: bf16 on CPUs with AVX-512 BF16, else fp32)")
    q.add_argument("--batch-size", type=_positive_int, default=16, help="rows per inference call of the Ray job")
    q.add_argument("--out", default="docs/bench/enhance.json", help="where to write the JSON (path or URI)")
    q.set_defaults(func=_run_bench_enhance)


def _run_bench_enhance(args: argparse.Namespace) -> int:
    from clipsr import storage
    from clipsr.bench import enhance_loop

    result = enhance_loop.run(args.images, args.size, args.scale, args.threads, model=args.model, arch=args.arch,
                              precision=args.precision, batch_size=args.batch_size)
    storage.write_bytes_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())
    for name in ("plain_loop", "ray"):
        r = result[name]
        print(f"{name:>10}: {r['images']} images in {r['seconds']:.1f} s: {r['images_per_s']:.2f} images/s, "
              f"{r['output_mp_per_s']:.2f} output MP/s, peak memory {r['peak_memory_mb']:.0f} MB")
    print(f"ray / plain loop: {result['ray_over_loop_images_per_s']:.2f}; results: {args.out}")
    return 0


def _add_bench_threads(benches: argparse._SubParsersAction) -> None:
    q = benches.add_parser(
        "threads",
        help="inference speed per CPU at several torch thread counts and precisions (the thread default)",
        description="The bundled model through the upscaler an inference actor runs: one photo-sized "
                    "input and a batch of thumbnails, at each thread count and precision.",
    )
    q.add_argument("--model", default="default", help="model spec (default: the bundled x4 model)")
    q.add_argument("--scale", type=int, default=4)
    q.add_argument("--threads", type=_positive_int, action="append", metavar="N",
                   help="torch threads to measure (repeat; default 1, 2 and 4)")
    q.add_argument("--precision", choices=["fp32", "bf16"], action="append",
                   help="precision to measure (repeat; default fp32 and bf16)")
    q.add_argument("--size", type=_positive_int, default=128, help="side of the photo-sized LR input in pixels")
    q.add_argument("--runs", type=_positive_int, default=5, help="timed runs per figure (after one warm-up)")
    q.add_argument("--out", default="docs/bench/threads.json", help="where to write the JSON (path or URI)")
    q.set_defaults(func=_run_bench_threads)


def _run_bench_threads(args: argparse.Namespace) -> int:
    from clipsr import storage
    from clipsr.bench import threads as bench

    print(bench.format_header(), flush=True)
    result = bench.run(args.model, args.scale, args.threads or [1, 2, 4], args.precision or ["fp32", "bf16"],
                       size=args.size, runs=args.runs, on_result=lambda r: print(bench.format_row(r), flush=True))
    storage.write_bytes_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())
    env = result["environment"]
    print(f"{env['cpu']}, {env['cpu_count']} CPUs, load average {env['load_average_1m']} to "
          f"{env['load_average_1m_after']}, {env['date']}; results: {args.out}")
    return 0


def _add_enhance(sub: argparse._SubParsersAction) -> None:
    from clipsr.enhance.options import add_arguments

    p = sub.add_parser(
        "enhance",
        help="enhance an archive prefix on Ray Data, with Parquet manifests (the main job)",
        description="Enhance every image below --input into --output (same relative keys), with one "
                    "manifest row per listed key. Exit 0: finished, failed fraction within "
                    "--max-failed-fraction; 2: finished above it; 1: could not complete.",
    )
    add_arguments(p)
    _usage_errors_exit_1(p)
    p.set_defaults(func=_run_enhance)


def _run_enhance(args: argparse.Namespace) -> int:
    from clipsr.enhance.options import EnhanceOptions
    from clipsr.enhance.run import run_enhance

    result = run_enhance(EnhanceOptions.from_args(args))
    print(result.summary, flush=True)
    return result.exit_code


def _scope_at_lr(text: str) -> tuple[str, float]:
    scope, sep, lr = text.partition("@")
    scopes = ("adaptive", "adaptive+bias", "all")
    try:
        if not sep or scope not in scopes or float(lr) <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SCOPE@LR with SCOPE in {scopes}, got {text!r}") from None
    return scope, float(lr)


def _add_adapt(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--candidate", action="append", type=_scope_at_lr, metavar="SCOPE@LR",
                   help="a (scope, learning rate) to probe, e.g. adaptive+bias@2e-3 or all@3e-4 (repeat); "
                        "the best on the held-out exemplars is trained on (default: all@2e-3)")
    p.add_argument("--budget-seconds", type=float, default=270.0,
                   help="time per domain, probing the candidates and training the best (default 270)")
    p.add_argument("--patch-tries", type=_positive_int, default=AdaptSettings.patch_tries,
                   help="each training patch is the most textured of this many random positions")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=AdaptSettings.precision,
                   help="training arithmetic (auto: bf16 on CPUs with AVX-512 BF16, else fp32)")
    p.add_argument("--cpus-per-domain", type=float, default=2.0)
    p.add_argument("--gpus-per-domain", type=float, default=0.0, help="> 0: each domain trains on a GPU")
    p.add_argument("--routing-encoder", default="color-stats",
                   help="encoder for domain centroids: color-stats (no semantic prior) or a CLIP arch")
    p.add_argument("--routing-encoder-weights", help="weights file/URI for a CLIP routing encoder")
    p.add_argument("--report", help="report path/URI without extension (default REGISTRY/_reports/<time>)")
    p.add_argument("--seed", type=int, default=0)
    _usage_errors_exit_1(p)
    p.set_defaults(func=_run_adapt)


def _run_adapt(args: argparse.Namespace) -> int:
    from clipsr import storage
    from clipsr.adapt.run import adapt_many, format_report, write_report
    from clipsr.adapt.settings import AdaptSettings
    from clipsr.adapt.spec import DomainSpec, load_specs
    from clipsr.provenance import utc_now
    from clipsr.ray_runtime import init_ray

    specs = [DomainSpec.shorthand(d, args.shots, args.scale) for d in args.domain]
    if args.spec:
        specs += load_specs(args.spec)
    if not specs:
        raise ValueError("give at least one --domain NAME=DIR or a --spec file")
    settings = AdaptSettings(budget_seconds=args.budget_seconds, seed=args.seed, patch_tries=args.patch_tries,
                             precision=args.precision)
    if args.candidate:
        settings = dataclasses.replace(settings, candidates=tuple(args.candidate))
    encoder = {"arch": args.routing_encoder, "weights": args.routing_encoder_weights, "seed": 0}
    out = storage.absolute(args.out)
    init_ray()
    print(f"adapting {len(specs)} domain(s) from {args.source_model} into {out}", file=sys.stderr, flush=True)

    def done(row: dict[str, Any]) -> None:
        what = f"v{row['version']} gain {row['gain_db']:+.3f} dB" if row["status"] == "ok" else row["error"]
        print(f"[{row['domain']}] {row['status']}: {what} ({row['seconds']:.0f}s)", file=sys.stderr, flush=True)

    rows = adapt_many(specs, args.source_model, settings, out, encoder,
                      cpus_per_domain=args.cpus_per_domain, gpus_per_domain=args.gpus_per_domain, on_done=done)
    base = args.report or storage.join(out, f"_reports/{utc_now().replace(':', '')}")
    json_uri, _ = write_report(rows, base)
    print(format_report(rows))
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"adapt: {len(rows) - failed} ok, {failed} failed; report {json_uri}")
    return 2 if failed else 0


def _add_report(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--crop", type=_positive_int, default=128, help="side of a crop in output pixels (default 128)")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from clipsr.report import build_report, write_report

    report = build_report(args.manifest, args.run, samples=args.samples, crop=args.crop)
    html_uri, json_uri = write_report(report, args.out)
    st = report["statuses"]
    print(f"report: run {report['run_id']}: {report['rows']} rows, {st['ok']} ok, {st['failed']} failed, "
          f"{st['skipped']} skipped; {html_uri} (record {json_uri})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipsr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_evaluate(sub)
    _add_enhance(sub)
    _add_bench(sub)
    _add_pretrain(sub)
    _add_adapt(sub)
    _add_report(sub)
    registry_cli.add_parser(sub)
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
