"""``clipsr bench``: benchmarks that print figures and write them to a JSON file."""
from __future__ import annotations

import argparse
import json

from clipsr.adapt.settings import AdaptSettings
from clipsr.commands._args import (add_out, cap_seconds, degradation_spec, name_eq_uri, positive_int, scope_at_lr,
                                   write_json)


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    q.add_argument("--size", type=positive_int, default=128, help="side of the square LR input in pixels")
    q.add_argument("--runs", type=positive_int, default=5, help="timed runs per configuration (after one warm-up)")
    q.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    add_out(q, "docs/bench/inference.json")
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
    q.add_argument("--runs", type=positive_int, default=10, help="timed runs per figure")
    add_out(q, "docs/bench/gpu.json")
    q.set_defaults(func=_run_bench_gpu)
    q = benches.add_parser("jpeg", help="JPEG quality read from headers, and the blind estimate's blockiness per quality")
    q.add_argument("--data", action="append", required=True, metavar="DIR", help="HR image folder (repeat)")
    q.add_argument("--scale", type=int, default=4, help="downscale factor of the protocol LR (default 4)")
    add_out(q, "docs/bench/jpeg.json")
    q.set_defaults(func=_run_bench_jpeg)
    q = benches.add_parser("curve", help="plot a pretraining run's loss and validation PSNR from its log")
    q.add_argument("--log", required=True, help="the log of a `clipsr pretrain` run")
    q.add_argument("--out", required=True, help="PNG to write")
    q.add_argument("--title", default="clipsr pretrain", help="the plot's title (default: clipsr pretrain)")
    q.set_defaults(func=_run_bench_curve)


def _run_bench_inference(args: argparse.Namespace) -> int:
    import torch

    from clipsr.bench import inference as bench

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    archs, scales = bench.resolve(args.arch, args.scale)
    print(bench.format_header(), flush=True)
    result = bench.run(archs, scales, lr_size=args.size, runs=args.runs,
                       on_result=lambda r: print(bench.format_row(r), flush=True))
    write_json(args.out, result)
    env = result["environment"]
    print(f"{env['cpu']}, {env['torch_threads']} torch thread(s), torch {env['torch']}, {env['date']}")
    print(f"results: {args.out}")
    return 0


def _add_bench_threads(benches: argparse._SubParsersAction) -> None:
    q = benches.add_parser(
        "threads",
        help="inference speed per CPU at several torch thread counts and precisions (the thread default)",
        description="The bundled model through the upscaler an inference actor runs: one photo-sized "
                    "input and a batch of thumbnails, at each thread count and precision.")
    q.add_argument("--model", default="default", help="model spec (default: the bundled x4 model)")
    q.add_argument("--scale", type=int, default=4, help="the model's scale (default 4)")
    q.add_argument("--threads", type=positive_int, action="append", metavar="N",
                   help="torch threads to measure (repeat; default 1, 2 and 4)")
    q.add_argument("--precision", choices=["fp32", "bf16"], action="append",
                   help="precision to measure (repeat; default fp32 and bf16)")
    q.add_argument("--size", type=positive_int, default=128, help="side of the photo-sized LR input in pixels")
    q.add_argument("--runs", type=positive_int, default=5, help="timed runs per figure (after one warm-up)")
    add_out(q, "docs/bench/threads.json")
    q.set_defaults(func=_run_bench_threads)


def _run_bench_threads(args: argparse.Namespace) -> int:
    from clipsr.bench import threads as bench

    print(bench.format_header(), flush=True)
    result = bench.run(args.model, args.scale, args.threads or [1, 2, 4], args.precision or ["fp32", "bf16"],
                       size=args.size, runs=args.runs, on_result=lambda r: print(bench.format_row(r), flush=True))
    write_json(args.out, result)
    env = result["environment"]
    print(f"{env['cpu']}, {env['cpu_count']} CPUs, load average {env['load_average_1m']} to "
          f"{env['load_average_1m_after']}, {env['date']}; results: {args.out}")
    return 0


def _add_bench_plan(benches: argparse._SubParsersAction) -> None:
    q = benches.add_parser(
        "plan", help="the driver at archive scale: planning N keys against an index of them",
        description="Time and peak memory of the enhancement driver planning a synthetic listing of N keys "
                    "(no image is read), the index it commits, and manifest bytes per row.")
    q.add_argument("--keys", type=positive_int, default=1_000_000, help="number of synthetic keys")
    add_out(q, "docs/bench/plan.json")
    q.set_defaults(func=_run_bench_plan)


def _run_bench_plan(args: argparse.Namespace) -> int:
    from clipsr.bench import plan

    result = plan.run(args.keys)
    write_json(args.out, result)
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
    q.add_argument("--workers", type=positive_int, action="append", help="worker counts (default: 1 and 2)")
    q.add_argument("--cpus", type=float, default=2.0, help="total CPUs shared by the workers")
    q.add_argument("--steps", type=positive_int, default=60, help="training steps timed per worker count")
    q.add_argument("--arch", default="cdasr-lite", help="architecture trained (default cdasr-lite)")
    q.add_argument("--scale", type=int, default=4, help="upscaling factor (default 4)")
    q.add_argument("--batch", type=positive_int, default=16, help="patches per worker per step")
    q.add_argument("--lr-patch", type=positive_int, default=48, help="side of the LR training patches in pixels")
    add_out(q, "docs/bench/train.json")
    q.set_defaults(func=_run_bench_train)


def _run_bench_train(args: argparse.Namespace) -> int:
    from clipsr import storage
    from clipsr.bench.train import bench_workers
    from clipsr.ray_runtime import init_ray

    init_ray(num_cpus=int(args.cpus))
    result = bench_workers([storage.absolute(d) for d in args.data], args.workers or [1, 2], args.cpus,
                           args.steps, args.arch, args.scale, args.batch, args.lr_patch)
    write_json(args.out, result)
    print(f"written to {args.out}")
    return 0


def _run_bench_gpu(args: argparse.Namespace) -> int:
    from clipsr.bench.gpu import run

    result = run(args.model, args.runs)
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("agreement", "forward_speed", "whole_image_speed", "adaptation_steps")},
                     indent=1))
    print(f"{result['environment']['gpu']}, torch {result['environment']['torch']}; results: {args.out}")
    return 0


def _run_bench_jpeg(args: argparse.Namespace) -> int:
    from clipsr import storage
    from clipsr.bench import jpeg

    result = jpeg.run([storage.absolute(d) for d in args.data], args.scale)
    write_json(args.out, result)
    print(f"{result['images']} images: quality read exactly from {result['header_exact_fraction']:.1%} of headers")
    for q, b in result["blockiness"].items():
        print(f"  q={q:>3}: blockiness p10 {b['p10']:.3f} median {b['median']:.3f} p90 {b['p90']:.3f}; "
              f"blind estimate finds a grid in {result['blind_detected_fraction'][q]:.0%}")
    print(f"results: {args.out}")
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
    q.add_argument("--source-model", default="default", help="model spec to adapt (default: the bundled model)")
    q.add_argument("--data", type=name_eq_uri, action="append", required=True, metavar="NAME=DIR",
                   help="a domain's HR images: the first --shots adapt, the rest score (repeat)")
    q.add_argument("--shots", type=positive_int, default=10, help="exemplars per domain (default 10)")
    q.add_argument("--steps", type=positive_int, default=AdaptSettings.steps,
                   help=f"adaptation's training steps per domain; the baseline trains as many "
                        f"(default {AdaptSettings.steps})")
    q.add_argument("--budget-seconds", type=cap_seconds, default=AdaptSettings.budget_seconds,
                   help="adaptation's safety cap on seconds per domain (0: none)")
    q.add_argument("--clip-weights", help="CLIP weights file/URI, for a source model trained with one")
    q.add_argument("--patch-tries", type=positive_int, default=AdaptSettings.patch_tries,
                   help="adaptation: each patch the most textured of this many positions")
    q.add_argument("--candidate", action="append", type=scope_at_lr, metavar="SCOPE@LR",
                   help="adaptation's candidates, as for clipsr adapt (default: its defaults)")
    q.add_argument("--lr-patch", type=positive_int, default=None,
                   help="side of both trainings' LR patches (default: adaptation's, 32 px up to x8)")
    q.add_argument("--batch", type=positive_int, default=AdaptSettings.batch,
                   help=f"patches per step of both trainings (default {AdaptSettings.batch})")
    q.add_argument("--degradation", type=degradation_spec, default="clean", metavar="SPEC",
                   help="clean (default) or jpeg:Q: the exemplars degraded so for both trainings, and the unseen "
                        "images scored with their LR saved at that JPEG quality (as evaluate --jpeg Q)")
    q.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where adaptation and fine-tuning train")
    q.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=AdaptSettings.precision,
                   help="training arithmetic of both (auto: bf16 on CPUs with AVX-512 BF16, else fp32)")
    q.add_argument("--finetune-lr", type=float, default=3e-4,
                   help="learning rate of the plain fine-tuning baseline (0: leave the baseline out)")
    q.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads of both trainings (default 1, as clipsr adapt's one CPU per domain)")
    q.add_argument("--seed", type=int, default=0, help="seed of both trainings (patches, initial state)")
    add_out(q, "docs/bench/adapt.json")
    q.set_defaults(func=_run_bench_adapt)


def _run_bench_adapt(args: argparse.Namespace) -> int:
    from clipsr import storage
    from clipsr.bench.adapt import bench_adaptation

    result = bench_adaptation(args.source_model, {k: storage.absolute(v) for k, v in args.data}, args.shots,
                              args.steps, args.budget_seconds, args.finetune_lr, args.threads, seed=args.seed,
                              patch_tries=args.patch_tries, device=args.device, precision=args.precision,
                              candidates=tuple(args.candidate or AdaptSettings.candidates),
                              clip_weights=args.clip_weights, lr_patch=args.lr_patch,
                              degradation=args.degradation, batch=args.batch)
    write_json(args.out, result)
    print(f"written to {args.out}")
    return 0


def _add_bench_enhance(benches: argparse._SubParsersAction) -> None:
    q = benches.add_parser(
        "enhance",
        help="the enhancement job on Ray against a plain loop (same model, images, stages, threads)",
        description="Images/s, output megapixels/s and peak memory of `clipsr enhance` (Ray start-up "
                    "excluded) and of a one-process loop, on synthetic PNGs in a temporary folder.",
    )
    q.add_argument("--images", type=positive_int, default=200, help="number of synthetic inputs")
    q.add_argument("--size", type=positive_int, default=256, help="side of the square LR inputs in pixels")
    q.add_argument("--scale", type=int, default=4, help="upscaling factor (default 4)")
    q.add_argument("--model", help="model spec (default: random weights of --arch)")
    q.add_argument("--arch", default="cdasr-lite", help="architecture for random weights when --model is not given")
    q.add_argument("--threads", type=positive_int, default=1, help="torch threads, for the loop and each actor")
    q.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="network arithmetic of both (auto: bf16 on CPUs with AVX-512 BF16, else fp32)")
    q.add_argument("--batch-size", type=positive_int, default=16, help="rows per inference call of the Ray job")
    add_out(q, "docs/bench/enhance.json")
    q.set_defaults(func=_run_bench_enhance)


def _run_bench_enhance(args: argparse.Namespace) -> int:
    from clipsr.bench import enhance_loop

    result = enhance_loop.run(args.images, args.size, args.scale, args.threads, model=args.model, arch=args.arch,
                              precision=args.precision, batch_size=args.batch_size)
    write_json(args.out, result)
    for name in ("plain_loop", "ray"):
        r = result[name]
        print(f"{name:>10}: {r['images']} images in {r['seconds']:.1f} s: {r['images_per_s']:.2f} images/s, "
              f"{r['output_mp_per_s']:.2f} output MP/s, peak memory {r['peak_memory_mb']:.0f} MB")
    print(f"ray / plain loop: {result['ray_over_loop_images_per_s']:.2f}; results: {args.out}")
    return 0
