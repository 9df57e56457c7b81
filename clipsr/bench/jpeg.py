"""JPEG quality: how often the header reading is exact, and the blockiness the blind estimate uses.

Source images go through the protocol's bicubic at ``scale``, then JPEG at each quality; the
figures are the fraction of files whose quality :func:`clipsr.jpeg.read_quality` reads exactly
and the spread of :func:`clipsr.jpeg.blockiness` per quality (clean = 100), from which the blind
estimate's thresholds were chosen.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from clipsr import imaging, storage
from clipsr.degrade import make_lr, modcrop
from clipsr.jpeg import blind_quality, blockiness, read_quality
from clipsr.provenance import utc_now

QUALITIES = (30, 50, 60, 75, 85, 90, 95)


def run(roots: list[str], scale: int = 4, every: int = 3) -> dict[str, Any]:
    uris = [u for root in roots for u in storage.list_images(root)][::every]
    blocky: dict[int, list[float]] = {q: [] for q in (*QUALITIES, 100)}
    blind: dict[int, list[int | None]] = {q: [] for q in (*QUALITIES, 100)}
    exact = 0
    for uri in uris:
        lr = make_lr(modcrop(imaging.to_rgb(imaging.load_rgb_or_grey_uint8(storage.read_bytes(uri))), scale), scale)
        blocky[100].append(blockiness(lr))
        blind[100].append(blind_quality(lr))
        for q in QUALITIES:
            buf = io.BytesIO()
            Image.fromarray(lr).save(buf, "JPEG", quality=q)
            exact += read_quality(buf.getvalue()) == q
            decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
            blocky[q].append(blockiness(decoded))
            blind[q].append(blind_quality(decoded))
    return {
        "date": utc_now(), "images": len(uris), "scale": scale,
        "header_exact_fraction": exact / (len(uris) * len(QUALITIES)),
        "blockiness": {str(q): {"p10": float(np.percentile(v, 10)), "median": float(np.median(v)),
                                "p90": float(np.percentile(v, 90))} for q, v in blocky.items()},
        "blind_detected_fraction": {str(q): float(np.mean([b is not None for b in v])) for q, v in blind.items()},
    }
