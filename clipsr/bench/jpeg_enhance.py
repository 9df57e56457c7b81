"""JPEG inputs through the production path: what ``clipsr enhance`` gains over bicubic on them.

``python -m clipsr.bench.jpeg_enhance`` with one of:

- ``inputs``: the unseen images of each domain folder (after the shots, in sorted order) as the
  protocol's bicubic LR saved as a JPEG file at ``--quality``, ``OUT/<domain>/<name>.jpg``: the
  archive inputs, for ``clipsr enhance --input OUT --format png``;
- ``score``: each enhanced output against its HR (the protocol's Y-PSNR, ``crop_border`` = scale),
  and bicubic upscaling of the same JPEG file as the baseline, per domain.

The evaluation protocol is unchanged (clipsr.evaluate); only the LR reaches the model as a JPEG
file, as an archive's does, so the job reads its quality from the file's quantisation tables.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from clipsr import imaging, storage
from clipsr.degrade import make_lr, modcrop, upscale_bicubic
from clipsr.metrics import psnr
from clipsr.provenance import code_revision, utc_now


def _read(uri: str) -> np.ndarray:
    return imaging.to_rgb(imaging.load_rgb_or_grey_uint8(storage.read_bytes(uri)))


def _stem(uri: str) -> str:
    return uri.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _unseen(folder: str, shots: int, take: int) -> list[str]:
    return storage.list_images(folder)[shots:shots + take]


def make_inputs(folders: dict[str, str], out: str, shots: int, take: int, scale: int, quality: int) -> int:
    """Write ``out/<domain>/<name>.jpg`` for the ``take`` images after the ``shots``; returns how many."""
    count = 0
    for name, folder in folders.items():
        for uri in _unseen(folder, shots, take):
            buf = io.BytesIO()
            Image.fromarray(make_lr(modcrop(_read(uri), scale), scale)).save(buf, "JPEG", quality=quality)
            storage.write_bytes_atomic(f"{out}/{name}/{_stem(uri)}.jpg", buf.getvalue())
            count += 1
    return count


def score(folders: dict[str, str], inputs: str, outputs: str, shots: int, take: int, scale: int) -> dict[str, Any]:
    """Per domain: mean Y-PSNR of the enhanced outputs and of bicubic on the same JPEG inputs."""
    result: dict[str, Any] = {"date": utc_now(), "code": code_revision(), "scale": scale, "inputs": inputs,
                              "outputs": outputs, "domains": {}}
    for name, folder in folders.items():
        model, bicubic = [], []
        for uri in _unseen(folder, shots, take):
            hr = modcrop(_read(uri), scale)
            lr = _read(f"{inputs}/{name}/{_stem(uri)}.jpg")
            sr = _read(f"{outputs}/{name}/{_stem(uri)}.png")
            if sr.shape != hr.shape:
                raise ValueError(f"{outputs}/{name}/{_stem(uri)}.png is {sr.shape}, its HR {hr.shape}")
            up = upscale_bicubic(lr, scale)
            model.append(psnr(sr, hr, crop_border=scale))
            bicubic.append(psnr(up, hr, crop_border=scale))
        result["domains"][name] = {"images": len(model), "bicubic": float(np.mean(bicubic)),
                                   "model": float(np.mean(model)),
                                   "gain_db": float(np.mean(model) - np.mean(bicubic))}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipsr.bench.jpeg_enhance", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["inputs", "score"])
    p.add_argument("--data", action="append", required=True, metavar="NAME=DIR", help="a domain folder (repeat)")
    p.add_argument("--inputs", required=True, help="the JPEG inputs' folder (written by `inputs`)")
    p.add_argument("--outputs", help="the enhanced outputs' folder (`score`)")
    p.add_argument("--shots", type=int, default=10, help="images left out at the start of each folder")
    p.add_argument("--take", type=int, default=25, help="unseen images per domain")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--quality", type=int, default=75, help="JPEG quality of the inputs (`inputs`)")
    p.add_argument("--out", help="JSON to write the scores to (`score`)")
    args = p.parse_args(argv)
    folders = dict(d.split("=", 1) for d in args.data)
    if args.what == "inputs":
        n = make_inputs(folders, args.inputs, args.shots, args.take, args.scale, args.quality)
        print(f"{n} JPEG inputs (quality {args.quality}) under {args.inputs}")
        return 0
    if not args.outputs:
        p.error("score needs --outputs")
    result = score(folders, args.inputs, args.outputs, args.shots, args.take, args.scale)
    for name, d in result["domains"].items():
        print(f"{name}: {d['images']} images, bicubic {d['bicubic']:.3f} dB, enhanced {d['model']:.3f} dB, "
              f"gain {d['gain_db']:+.3f} dB")
    if args.out:
        storage.write_bytes_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
