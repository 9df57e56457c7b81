"""The enhancement job's options and their command line, shared by ``clipsr enhance`` and
``jobs/enhance.py``. Imports nothing heavy, so building the parser stays fast."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clipsr.enhance.output import OutputSettings

DEFAULT_MAX_OUTPUT_PIXELS = 64_000_000
#: JPEG inputs of this quality or lower go to --jpeg-model. Measured with the bundled pair
#: (docs/benchmarks.md): the JPEG model gains over today's clean one at q75 (+0.25 / +0.42 dB urban /
#: manga), ties at q85 (+0.02 / +0.01), loses at q90 (-0.15 / -0.30): above 85, JPEG leaves too
#: little to undo.
DEFAULT_JPEG_BELOW = 85
# 256 MiB: above any uncompressed input (16-bit RGBA, 8 bytes a pixel) within the default pixel
# limit at x2 (16 megapixels), far below what would strain a worker.
DEFAULT_MAX_INPUT_BYTES = 256 << 20
FORMATS = ("png", "jpeg", "webp", "tiff")


@dataclass
class EnhanceOptions:
    input: str
    output: str
    manifest: str | None = None
    models: str | None = None
    route: str | None = None
    route_map: str | None = None
    domain: str | None = None
    route_threshold: float | None = None
    model: str = "default"
    scale: int | None = None
    outscale: float | None = None
    max_long_edge: int | None = None
    strength: float = 1.0
    jpeg_model: str | None = "auto"
    jpeg_below: int = DEFAULT_JPEG_BELOW
    format: str | None = None
    quality: int = 95
    max_failed_fraction: float = 0.01
    limit: int | None = None
    dry_run: bool = False
    retry_failed: bool = False
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    image_timeout: float = 600.0
    clip_weights: str | None = None
    device: str = "auto"
    precision: str = "auto"
    tile: int = 256
    batch_size: int = 16
    actors: int | None = None
    max_actors: int | None = None
    actors_per_gpu: int = 1
    threads: int | None = None
    gpu_wait: float = 600.0
    commit_every: float = 30.0
    lock_ttl: float = 600.0
    allow_unconditional_writes: bool = False

    def check(self) -> None:
        if self.route_threshold is not None and not -1.0 <= self.route_threshold <= 1.0:
            raise ValueError(f"--route-threshold is a cosine in [-1, 1], got {self.route_threshold}")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise ValueError(f"--max-failed-fraction must be in [0, 1], got {self.max_failed_fraction}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.max_output_pixels < 1:
            raise ValueError(f"--max-output-pixels must be positive, got {self.max_output_pixels}")
        if self.max_input_bytes < 1:
            raise ValueError(f"--max-input-bytes must be positive, got {self.max_input_bytes}")
        if self.image_timeout <= 0:
            raise ValueError(f"--image-timeout must be positive, got {self.image_timeout}")
        if self.format is not None and self.format.lower() not in FORMATS + ("jpg", "tif"):
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.commit_every < 0:
            raise ValueError(f"--commit-every must be at least 0 seconds, got {self.commit_every}")
        if self.gpu_wait < 0:
            raise ValueError(f"--gpu-wait must be at least 0 seconds, got {self.gpu_wait}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"--strength must be in [0, 1], got {self.strength}")
        if not 1 <= self.jpeg_below <= 100:
            raise ValueError(f"--jpeg-below takes a JPEG quality in 1..100, got {self.jpeg_below}")
        self.output_settings()  # --outscale, --max-long-edge, --quality

    def output_settings(self) -> OutputSettings:
        from clipsr.enhance.output import OutputSettings

        return OutputSettings(self.outscale, self.max_long_edge, self.quality)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EnhanceOptions":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _count(what: str):
    """An argparse type for whole numbers of ``what``, also written as 64e6 or 64_000_000."""
    def parse(text: str) -> int:
        try:
            value = float(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of {what}, got {text!r}") from None
        if value < 1 or value != int(value):
            raise argparse.ArgumentTypeError(f"expected a positive whole number of {what}, got {text!r}")
        return int(value)

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="folder or s3:// prefix of the images to enhance")
    p.add_argument("--output", required=True,
                   help="folder or s3:// prefix for the outputs (same relative keys), the index and the lock")
    p.add_argument("--manifest", help="where Parquet manifests go, partitioned run=<run_id>/ "
                                      "(default: <output>/_manifests)")
    p.add_argument("--models", metavar="REGISTRY", help="model registry URI (the --out of `clipsr adapt`)")
    route = p.add_mutually_exclusive_group()
    route.add_argument("--route", choices=["auto"], help="route each image to the nearest domain (registry)")
    route.add_argument("--route-map", metavar="FILE", help="YAML/JSON mapping of key prefix -> domain (registry)")
    route.add_argument("--domain", metavar="NAME", help="send every image to one domain's model (backfill)")
    p.add_argument("--route-threshold", type=float, metavar="COS",
                   help="--route auto: below this similarity to the nearest domain, use --model (default: each "
                        "domain's threshold, calibrated from its exemplars when it was adapted)")
    p.add_argument("--model", default="default",
                   help="model without a registry: default (bundled; default-x4-v1, -v2... pin one release), bicubic, "
                        "or a checkpoint path/URI")
    p.add_argument("--scale", type=int,
                   help="the model's upscaling factor: checked against the model (bicubic: the factor it runs "
                        "at); default: the model's. With --outscale, a model of another factor is accepted")
    p.add_argument("--outscale", type=float, metavar="F",
                   help="output size F times the input (as Real-ESRGAN's -s/--outscale): the model runs at its "
                        "own factor, then the result is resized to int(F x width) by int(F x height), Lanczos "
                        "when enlarging, area averaging when shrinking (default: the model's factor)")
    p.add_argument("--max-long-edge", type=_count("pixels"), metavar="N",
                   help="cap the output's longer side at N pixels, keeping the aspect ratio (after --outscale)")
    p.add_argument("--strength", type=float, default=1.0, metavar="S",
                   help="run adapted models (registry domains, or a --model written by clipsr adapt) with their "
                        "weights moved only S of the way from their source model's: source + S x (adapted - "
                        "source); 1 (default): as adapted, 0: the source model. The source model of a routed "
                        "run (--model) runs as it is")
    p.add_argument("--jpeg-model", metavar="SPEC", default="auto",
                   help="a model of --model's scale for inputs that went through JPEG at --jpeg-below or lower "
                        "(quality read from the file's quantisation tables, or estimated from a JPEG grid), e.g. "
                        "one pretrained with data.degradation; 'none': every input to --model; default 'auto': "
                        "the bundled default-x4-jpeg when --model is the bundled x4 model, else none")
    p.add_argument("--jpeg-below", type=int, default=DEFAULT_JPEG_BELOW, metavar="Q",
                   help=f"JPEG inputs of this quality or lower go to --jpeg-model (default {DEFAULT_JPEG_BELOW})")
    p.add_argument("--format", choices=FORMATS, type=str.lower,
                   help="convert outputs to this format (extension replaced); default: keep each input's")
    p.add_argument("--quality", type=int, default=95, metavar="Q",
                   help="JPEG and lossy WebP quality, 1-100 (default 95); a WebP output of a lossless input "
                        "(PNG, TIFF, BMP, GIF, lossless WebP) is lossless")
    p.add_argument("--max-failed-fraction", type=float, default=0.01, metavar="F",
                   help="exit 2 when (failed + unsupported) / (ok + failed + unsupported) is above F "
                        "(default 0.01)")
    p.add_argument("--limit", type=int, metavar="N", help="take only the first N listed keys")
    p.add_argument("--dry-run", action="store_true", help="list, route and count; write nothing")
    p.add_argument("--retry-failed", action="store_true",
                   help="read again the inputs that an earlier run failed for a permanent reason (corrupt, not an "
                        "image, over the pixel limit, unsafe key); by default they are carried forward unread "
                        "while their key, size, ETag (mtime) and scale are unchanged, and not counted as failed again")
    p.add_argument("--max-output-pixels", type=_count("pixels"), default=DEFAULT_MAX_OUTPUT_PIXELS, metavar="N",
                   help="refuse (a failed row) inputs whose output would have more pixels: the model's own "
                        "output, or the --outscale one where that is larger (default 64e6)")
    p.add_argument("--max-input-bytes", type=_count("bytes"), default=DEFAULT_MAX_INPUT_BYTES, metavar="N",
                   help="refuse (a failed row, never read) inputs larger than N bytes, from the listing "
                        "(default 268435456, 256 MiB)")
    p.add_argument("--image-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="per-image inference time limit (default 600)")
    p.add_argument("--clip-weights", help="CLIP weights file/URI, for models trained with one")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when the Ray cluster has GPUs")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="network arithmetic (default auto: bf16 on CPUs with AVX-512 BF16, else fp32; fp16 on "
                        "GPUs only; reduced precision is checked for NaN with an fp32 fallback; each manifest "
                        "row records what ran)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="rows per inference call; images within one tile that share a model and size go "
                        "through the network together (default 16; lower it for very large images)")
    p.add_argument("--tile", type=int, default=256, help="LR tile size for inference (memory bound)")
    p.add_argument("--actors", type=int, metavar="N",
                   help="a fixed pool of N inference actors (default: from 1 to what the cluster's nodes hold, "
                        "leaving each node room for decode and write tasks)")
    p.add_argument("--max-actors", type=int, metavar="N",
                   help="let the pool grow to N actors (default: what the cluster holds at the start; "
                        "more asks an autoscaling cluster for nodes)")
    p.add_argument("--actors-per-gpu", type=int, default=1, metavar="K",
                   help="K inference actors share each GPU (default 1)")
    p.add_argument("--threads", type=int,
                   help="torch threads per inference actor (default: 1 on nodes that hold several actors, "
                        "else the node's usable CPUs)")
    p.add_argument("--gpu-wait", type=float, default=600.0, metavar="SECONDS",
                   help="on a cluster with GPU node types but no GPU node up (or --device cuda on a joined "
                        "cluster), ask the autoscaler for GPUs and wait this long for the first to join "
                        "(default 600); then --device cuda stops (exit 1) and auto runs on the CPUs")
    p.add_argument("--commit-every", type=float, default=30.0, metavar="SECONDS",
                   help="write the manifest rows of finished images at least this often, so a killed run "
                        "keeps them and its rerun skips those images (default 30; 0: after every block)")
    p.add_argument("--lock-ttl", type=float, default=600.0, metavar="SECONDS",
                   help="a lock whose heartbeat is older than this is taken over (default 600); a run "
                        "that cannot renew its own lock for 3/4 of this stops with exit 1")
    p.add_argument("--allow-unconditional-writes", action="store_true",
                   help="run even if the output store ignores conditional writes (If-None-Match/If-Match), "
                        "which leaves the run lock and the index fence without effect: only when nothing "
                        "else can write the output prefix during a run")
