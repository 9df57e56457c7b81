"""One enhance run summed up for people: the data behind ``clipsr report``.

`build_report` reads one run's manifest parts and returns a JSON-able dict, the record: rows per
status and per (domain, model), failed rows grouped by reason, the spread of the quality figures
per domain, and side-by-side crops (a bicubic upscale of the input | the enhanced output) of a few
ok rows per domain. `clipsr.report_html.render` turns that dict into one self-contained HTML page.

Crops are the only part that reads images. Inputs and outputs are read again from where the
manifest says they are, so a crop shows what is there now: an input whose bytes no longer match
the row's hash is reported as changed instead of shown. The sample is the ok rows whose input keys
hash lowest, so the same run always gives the same crops, whatever the order of its parts.
"""
from __future__ import annotations

import base64
import hashlib
import heapq
import json
import math
from collections import Counter
from typing import Any

import numpy as np

from clipsr import imaging, storage
from clipsr.degrade import imresize
from clipsr.enhance import manifest
from clipsr.enhance.layout import RUN_ID_PATTERN
from clipsr.provenance import utc_now

REPORT_VERSION = 1
# (column, title, what it means): the quality figures plotted per domain, from ok rows.
FIGURES = (
    ("sharpness_gain", "Sharpness gain over bicubic",
     "output sharpness / a bicubic upscale's; near 1: the model added little, far above: maybe amplified noise"),
    ("clipping_ratio", "Clipping ratio", "fraction of output samples at the floor or ceiling of their bit depth"),
    ("clip_cosine", "CLIP cosine, input to output", "semantic consistency; only for models with a CLIP encoder"),
    ("route_similarity", "Routing similarity", "--route auto: similarity to the nearest domain's exemplars"),
    ("infer_s", "Inference seconds per image", "time in the network, tiling included"),
)
COLUMNS = ["status", "error", "input_key", "input_uri", "output_uri", "input_sha256", "scale", "output_width",
           "output_height", "domain", "model_id", "model_version", *(column for column, _, _ in FIGURES)]
EXAMPLES_PER_REASON = 3
_MARGIN = 3  # LR pixels around a crop: the bicubic kernel reaches 2, so the crop's upscale is exact


def resolve_run(manifest_uri: str, run_id: str | None = None) -> tuple[str, str]:
    """``(run folder URI, run id)`` from a run folder (``.../run=<id>``) or a manifest root; from a
    root without ``run_id``, the latest run (run ids sort by time)."""
    root = storage.absolute(manifest_uri).rstrip("/")
    folder = root.rsplit("/", 1)[-1]
    if folder.startswith("run="):
        if run_id and run_id != folder[len("run="):]:
            raise ValueError(f"--run {run_id} contradicts the run folder {manifest_uri}")
        return root, folder[len("run="):]
    if run_id is None:
        runs = {info.key.split("/", 1)[0][len("run="):] for info in storage.iter_objects(root)
                if info.key.startswith("run=") and info.key.endswith(".parquet")}
        runs = {r for r in runs if RUN_ID_PATTERN.match(r)}
        if not runs:
            raise FileNotFoundError(f"no manifest runs (run=<id>/part-*.parquet) under {manifest_uri}")
        run_id = max(runs)
    elif not RUN_ID_PATTERN.match(run_id):
        raise ValueError(f"not a run id: {run_id!r}")
    return f"{root}/run={run_id}", run_id


def build_report(manifest_uri: str, run_id: str | None = None, samples: int = 3, crop: int = 128) -> dict[str, Any]:
    """The report of one run: see the module docstring. ``samples`` crops per domain, each
    ``crop`` output pixels square (less for smaller images)."""
    if samples < 0 or crop < 1:
        raise ValueError(f"need samples >= 0 and crop >= 1, got {samples} and {crop}")
    run_uri, run_id = resolve_run(manifest_uri, run_id)
    parts = sorted(manifest.iter_parts(run_uri))
    if not parts:
        raise FileNotFoundError(f"no manifest parts in {run_uri}")
    statuses: Counter = Counter()
    groups: Counter = Counter()
    reasons: dict[str, dict[str, Any]] = {}
    values: dict[tuple[str, str | None], list[float]] = {}
    picked: dict[str | None, list[tuple[int, str, dict[str, Any]]]] = {}
    for part in parts:
        for row in manifest.read_part(part, COLUMNS).to_pylist():
            status = row["status"]
            statuses[status] += 1
            groups[(row["domain"], row["model_version"], row["model_id"], status)] += 1
            if status == "failed":
                _add_failure(reasons, row)
            elif status == "ok":
                for column, _, _ in FIGURES:
                    if row[column] is not None and math.isfinite(row[column]):
                        values.setdefault((column, row["domain"]), []).append(row[column])
                if samples:
                    _offer(picked.setdefault(row["domain"], []), row, samples)
    return {
        "report_version": REPORT_VERSION,
        "run_id": run_id,
        "manifest": run_uri,
        "created": utc_now(),
        "rows": sum(statuses.values()),
        "statuses": {s: statuses[s] for s in manifest.STATUSES},
        "groups": _groups(groups),
        "failures": sorted(reasons.values(), key=lambda r: (-r["count"], r["reason"])),
        "figures": _figures(values),
        "samples": [_sample(row, crop) for domain in sorted(picked, key=_domain_order)
                    for _, _, row in sorted(picked[domain], key=lambda item: item[1])],
        "settings": {"samples_per_domain": samples, "crop": crop},
    }


def write_report(report: dict[str, Any], html_uri: str) -> tuple[str, str]:
    """Write the JSON record, then the HTML page beside it (same name, ``.json``); returns both URIs."""
    from clipsr.report_html import render

    stem = html_uri[: -len(".html")] if html_uri.lower().endswith(".html") else html_uri
    json_uri = f"{stem}.json"
    storage.write_bytes_atomic(json_uri, (json.dumps(report, indent=1) + "\n").encode())
    storage.write_bytes_atomic(html_uri, render(report).encode())
    return html_uri, json_uri


def failure_reason(error: str) -> str:
    """The part of an error before its first ':', the reason without the particulars."""
    return error.split(":", 1)[0].strip() or error


def _add_failure(reasons: dict[str, dict[str, Any]], row: dict[str, Any]) -> None:
    reason = failure_reason(row["error"] or "")
    entry = reasons.setdefault(reason, {"reason": reason, "count": 0, "examples": []})
    entry["count"] += 1
    examples = entry["examples"]
    examples.append(row["input_key"])
    examples.sort(key=storage.sort_key)  # the first keys in sorted order, whatever the part order
    del examples[EXAMPLES_PER_REASON:]


def _domain_order(domain: str | None) -> tuple[bool, str]:
    return domain is not None, domain or ""


def _groups(counts: Counter) -> list[dict[str, Any]]:
    merged: dict[tuple, dict[str, Any]] = {}
    for (domain, version, model_id, status), n in counts.items():
        entry = merged.setdefault((domain, version, model_id), {
            "domain": domain, "model_version": version, "model_id": model_id,
            **{s: 0 for s in manifest.STATUSES}})
        entry[status] += n
    return [merged[k] for k in sorted(merged, key=lambda k: (_domain_order(k[0]), k[1] or "", k[2] or ""))]


def _figures(values: dict[tuple[str, str | None], list[float]]) -> list[dict[str, Any]]:
    figures = []
    for column, title, about in FIGURES:
        domains = sorted((d for c, d in values if c == column), key=_domain_order)
        if domains:
            figures.append({"column": column, "title": title, "about": about,
                            "domains": [{"domain": d, **spread(values[(column, d)])} for d in domains]})
    return figures


def spread(xs: list[float]) -> dict[str, float | int]:
    """Count, mean and the quantiles a box plot draws."""
    a = np.asarray(xs, dtype=np.float64)
    q = np.quantile(a, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    names = ("min", "p05", "p25", "median", "p75", "p95", "max")
    return {"n": int(a.size), "mean": float(a.mean()), **{n: float(v) for n, v in zip(names, q)}}


def _offer(heap: list[tuple[int, str, dict[str, Any]]], row: dict[str, Any], k: int) -> None:
    """Keep the k rows whose input keys hash lowest (a max-heap on the negated hash)."""
    h = int.from_bytes(hashlib.sha256(storage.sort_key(row["input_key"])).digest()[:8], "big")
    item = (-h, row["input_key"], row)
    if len(heap) < k:
        heapq.heappush(heap, item)
    elif item[:2] > heap[0][:2]:
        heapq.heapreplace(heap, item)


def _sample(row: dict[str, Any], crop: int) -> dict[str, Any]:
    sample = {k: row[k] for k in ("domain", "model_version", "model_id", "input_key", "input_uri", "output_uri",
                                  "scale", "sharpness_gain")}
    try:
        sample.update(crops(row, crop))
    except (OSError, ValueError) as e:  # gone or changed since the run: say so, show the others
        sample["error"] = str(e) or type(e).__name__
    return sample


def crops(row: dict[str, Any], crop: int) -> dict[str, Any]:
    """The same region of a bicubic upscale of the input and of the output, as base64 PNGs, where
    it lies in the input (``box``: x, y, width, height in input pixels) and the crops' ``size``
    (width, height). The output is ``scale`` times the input, or the size the row records
    (--outscale, --max-long-edge)."""
    data = storage.read_bytes(row["input_uri"])
    if storage.content_hash(data) != row["input_sha256"]:
        raise ValueError("the input changed since the run")
    lr = imaging.decode(data).pixels
    sr = imaging.decode(storage.read_bytes(row["output_uri"])).pixels
    h, w = lr.shape[:2]
    want = (row.get("output_height") or h * row["scale"], row.get("output_width") or w * row["scale"])
    if sr.shape[:2] != want:
        raise ValueError(f"the output is {sr.shape[1]}x{sr.shape[0]}, not {want[1]}x{want[0]}: replaced since the run?")
    fy, fx = want[0] / h, want[1] / w
    y, x, ch, cw = busiest_window(lr, math.ceil(crop / max(fy, fx)))
    enhanced = sr[round(y * fy):round((y + ch) * fy), round(x * fx):round((x + cw) * fx)]
    return {"box": [x, y, cw, ch], "size": [enhanced.shape[1], enhanced.shape[0]],
            "bicubic_png": _png(bicubic_crop(lr, y, x, ch, cw, fy, fx)), "enhanced_png": _png(enhanced)}


def busiest_window(image: np.ndarray, side: int) -> tuple[int, int, int, int]:
    """``(y, x, height, width)`` of the most detailed of nine evenly spread side x side windows (the
    whole image when smaller): a crop of flat sky would show nothing of the model."""
    h, w = image.shape[:2]
    ch, cw = min(side, h), min(side, w)
    luma = image.mean(axis=2)
    best, where = -1.0, (0, 0)
    for y in sorted({round(v) for v in np.linspace(0, h - ch, 3)}):
        for x in sorted({round(v) for v in np.linspace(0, w - cw, 3)}):
            win = luma[y:y + ch, x:x + cw]
            detail = float(np.abs(np.diff(win, axis=0)).sum() + np.abs(np.diff(win, axis=1)).sum())
            if detail > best:
                best, where = detail, (y, x)
    return where[0], where[1], ch, cw


def bicubic_crop(lr: np.ndarray, y: int, x: int, ch: int, cw: int, scale: float,
                 scale_x: float | None = None) -> np.ndarray:
    """The crop of a MATLAB-bicubic upscale of the whole image, computed from a margin around it
    (exact at a whole ``scale``; at another factor, ``scale_x`` across if it differs, the pixel grid
    is rounded as the output's crop is)."""
    fy, fx = scale, scale if scale_x is None else scale_x
    h, w = lr.shape[:2]
    y0, x0 = max(0, y - _MARGIN), max(0, x - _MARGIN)
    y1, x1 = min(h, y + ch + _MARGIN), min(w, x + cw + _MARGIN)
    up = imresize(lr[y0:y1, x0:x1], output_shape=(round(y1 * fy) - round(y0 * fy), round(x1 * fx) - round(x0 * fx)))
    top, left = round(y * fy) - round(y0 * fy), round(x * fx) - round(x0 * fx)
    return up[top:top + round((y + ch) * fy) - round(y * fy), left:left + round((x + cw) * fx) - round(x * fx)]


def _png(pixels: np.ndarray) -> str:
    return base64.b64encode(imaging.encode(pixels, None, "PNG")).decode("ascii")
