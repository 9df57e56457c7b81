"""The weight-free routing descriptor: colour, tone, edge, structure, periodicity, frequency and
line-art statistics of a low-resolution image, for ``--route auto`` without CLIP weights.

Routing compares what it will see: the LR inputs, and the domains' exemplars degraded as the
inputs are (clipsr.adapt.routing_fit). The statistics describe how an image is made more than what
it shows:

- palette: saturation level, vivid and near-grey fractions, how many hues and how evenly spread,
  colour-histogram entropy. Lighting, white balance and processing (HDR, film looks) move these
  within any domain, so they count half (``PALETTE_WEIGHT``);
- colour formation: how much colour varies off the blue-yellow axis that daylight and shadows vary
  along (photos stay near it, drawn colours do not), and the share of edges that change colour
  rather than only brightness (drawn regions meet in colour edges, shading does not), globally and
  as the median over 16 px patches;
- tone: luma mean, spread, entropy and bimodality (Sarle's coefficient), paper-white and ink-black
  fractions;
- edges: mean gradient, edge and flat fractions, gradient kurtosis, and how well a textured patch
  is explained by two tones (ink on paper) rather than a continuum;
- structure: orientation entropy, the share of axis-aligned edges, structure-tensor coherence at
  two scales and per patch (straight, parallel edges of buildings and ruled lines against curved
  strokes), and periodicity: peaks of the whitened power spectrum, which repeated windows, bricks
  and tiles make and drawings rarely do;
- frequency: high-frequency share and the radial power-spectrum slope;
- line art and texture: thin dark line pixels, and the noise level of the Laplacian (MAD).

Each statistic is made near-Gaussian (logit of fractions, log of magnitudes) and standardised by
constants measured once on the source-domain training photos (bsd68 and sunhays80, bicubic x4),
frozen below: a unit is "the typical variation of this statistic among ordinary photos". The
weighted standardised vector ``z`` is mapped to a unit vector ``[z / |w|, 1] / norm`` (the inverse
gnomonic projection), so routing uses cosines, as with CLIP embeddings, and near the source photos
a cosine is ``1 - (RMS standardised difference)^2 / 2``.

An image is described in ``views``: the whole image and, when it is large enough, its four
quadrants and its centre (each half the size). Routing averages over the views, so a picture that
is a drawing in one corner and a photograph elsewhere is judged on all its parts, and a domain's
exemplars cover more of what the domain looks like.

Any change to the statistics, weights, views or constants is a new ``VERSION``: the descriptor's
identity (and so every stored embedding's ``route_descriptor``) changes with it, and routing never
compares vectors of two versions. Images above ``MAX_SIDE`` on a side are described by their centre
crop, so the cost stays bounded and per-pixel statistics keep their scale.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

ARCH = "route-stats"
VERSION = 1
MAX_SIDE = 1024  # statistics of the centre crop above this
SPECTRUM_SIDE = 256  # the power spectrum is taken on the centre crop of this side

MIN_VIEW = 48  # the quadrant and centre views need both sides of the image at least twice this
PATCH = 16  # side of the patches of the patch statistics
PALETTE_WEIGHT = 0.5

FEATURES = (
    "sat_mean", "vivid", "grey", "hue_entropy", "hues", "colour_entropy",
    "off_daylight", "colour_edge_share", "patch_colour_edges",
    "luma_mean", "luma_std", "luma_entropy", "bimodality", "white", "black",
    "grad_mean", "edges", "flat", "grad_kurtosis", "patch_two_tone",
    "orient_entropy", "axis_share", "coherence_fine", "coherence_coarse", "patch_coherence", "patch_straight",
    "periodicity_peak", "periodicity_mean",
    "hf_share", "spectrum_slope", "dark_lines", "noise_mad",
)
PALETTE = {"sat_mean", "vivid", "grey", "hue_entropy", "hues", "colour_entropy"}
_FRACTIONS = {"vivid", "grey", "hues", "off_daylight", "luma_mean", "white", "black", "edges", "flat",
              "colour_edge_share", "patch_colour_edges", "patch_two_tone", "axis_share", "coherence_fine",
              "coherence_coarse", "patch_coherence", "patch_straight", "hf_share", "dark_lines"}
_MAGNITUDES = {"sat_mean", "luma_std", "grad_mean", "noise_mad"}
_EPS_FRACTION, _EPS_LOG = 0.01, 0.01
WEIGHTS = tuple(PALETTE_WEIGHT if name in PALETTE else 1.0 for name in FEATURES)

# Median and IQR/1.349 of each transformed statistic over the source-domain training photos.
CENTRE = (-1.855, -1.775, -1.675, 0.457, -1.073, 0.5006, -0.4845, -0.8322, -0.9154, -0.2392, -1.563, 0.8848,
          0.5332, -3.568, -3.557, -2.838, -1.437, -2.083, 1.914, -0.7887, 0.9832, -0.7075, 0.4107, -0.2274,
          -0.3576, -1.149, 2.817, 0.59, -2.168, -2.47, -3.101, -2.46)
SCALE = (0.4916, 1.594, 1.455, 0.1734, 0.6558, 0.06065, 0.4131, 0.6281, 0.9486, 0.432, 0.2511, 0.06826,
         0.1272, 1.194, 1.442, 0.3349, 0.6824, 1.201, 0.4304, 0.1511, 0.0226, 0.3422, 0.4407, 0.4766,
         0.5782, 1.011, 0.7435, 0.2678, 0.5954, 0.3649, 0.6303, 0.6815)


def _entropy(counts: np.ndarray) -> float:
    """Entropy of a histogram, normalised to [0, 1] by its number of bins."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / np.log(counts.size))


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with mirrored borders (numpy only: no scipy in the workers)."""
    radius = max(1, min(int(3 * sigma + 0.5), min(a.shape) - 1))
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma * sigma))
    taps /= taps.sum()
    h, w = a.shape
    rows = np.pad(a, [(radius, radius), (0, 0)], mode="symmetric")
    a = sum(t * rows[i:i + h] for i, t in enumerate(taps))
    cols = np.pad(a, [(0, 0), (radius, radius)], mode="symmetric")
    return sum(t * cols[:, i:i + w] for i, t in enumerate(taps))


def _centre_crop(a: np.ndarray, side: int) -> np.ndarray:
    h, w = a.shape[:2]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return a[top:top + side, left:left + side]


def _as_float_rgb(image: np.ndarray) -> np.ndarray:
    """HxWxC uint8, uint16 or float [0, 1] (C in 1, 3) -> float32 RGB in [0, 1]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (1, 3) or min(image.shape[:2]) < 4:
        raise ValueError(f"the routing descriptor needs an HxWxC image (C 1 or 3, sides >= 4), got {image.shape}")
    if image.dtype == np.uint8:
        x = image.astype(np.float32) / 255.0
    elif image.dtype == np.uint16:
        x = image.astype(np.float32) / 65535.0
    elif np.issubdtype(image.dtype, np.floating):
        x = np.clip(image.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"unsupported image dtype {image.dtype}: use uint8, uint16 or float in [0, 1]")
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return _centre_crop(x, MAX_SIDE)


def _colour(x: np.ndarray, sat: np.ndarray) -> dict[str, float]:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hue = np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)
    hue_bin = ((hue + np.pi) / (2 * np.pi) * 12).astype(np.int64) % 12
    saturated = sat > 0.15
    if saturated.mean() > 0.005:
        share = np.bincount(hue_bin[saturated], minlength=12) / saturated.sum()
        hues = float((share > 0.03).mean())
    else:
        hues = 0.0
    red_green, blue_yellow = np.abs(r - g).mean(), np.abs(0.5 * (r + g) - b).mean()
    levels = np.minimum((x * 16).astype(np.int64), 15)
    codes = (levels[..., 0] * 256 + levels[..., 1] * 16 + levels[..., 2]).ravel()
    return {
        "sat_mean": float(sat.mean()), "vivid": float((sat > 0.25).mean()), "grey": float((sat < 0.05).mean()),
        "hue_entropy": _entropy(np.bincount(hue_bin.ravel(), weights=sat.ravel(), minlength=12)),
        "hues": hues, "off_daylight": float(red_green / (red_green + blue_yellow + 1e-4)),
        "colour_entropy": _entropy(np.bincount(codes, minlength=4096).astype(np.float64)),
    }


def _tone(y: np.ndarray) -> dict[str, float]:
    centred = y - y.mean()
    var = float((centred ** 2).mean())
    if var > 1e-8:
        skew, kurt = (centred ** 3).mean() / var ** 1.5, (centred ** 4).mean() / var ** 2
        bimodality = float((skew ** 2 + 1) / kurt)
    else:
        bimodality = 0.0
    hist = np.bincount(np.minimum((y * 32).astype(np.int64), 31).ravel(), minlength=32).astype(np.float64)
    return {"luma_mean": float(y.mean()), "luma_std": float(np.sqrt(var)), "luma_entropy": _entropy(hist),
            "bimodality": bimodality, "white": float((y > 0.9).mean()), "black": float((y < 0.1).mean())}


def _gradients(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central differences on the interior (both (H-2)x(W-2))."""
    return (a[1:-1, 2:] - a[1:-1, :-2]) / 2, (a[2:, 1:-1] - a[:-2, 1:-1]) / 2


def _patches(a: np.ndarray) -> np.ndarray:
    """Non-overlapping PATCH x PATCH blocks as rows (the ragged border left out)."""
    h, w = a.shape[0] // PATCH * PATCH, a.shape[1] // PATCH * PATCH
    return a[:h, :w].reshape(h // PATCH, PATCH, w // PATCH, PATCH).transpose(0, 2, 1, 3).reshape(-1, PATCH * PATCH)


def _median_or(values: np.ndarray, default: float) -> float:
    return float(np.median(values)) if values.size else default


def _edges(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    gx, gy = _gradients(y)
    mag = np.hypot(gx, gy)
    colour = np.zeros_like(mag)
    for channel in (x[..., 0] - x[..., 1], 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]):
        cx, cy = _gradients(channel)
        colour += cx * cx + cy * cy
    colour = np.sqrt(colour)
    m2 = float((mag ** 2).mean())
    kurtosis = float(np.log((mag ** 4).mean() / m2 ** 2)) if m2 > 1e-12 else 0.0
    luma_edges, colour_edges = float((mag > 0.05).mean()), float((colour > 0.05).mean())
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    weight = np.bincount((angle / np.pi * 16).astype(np.int64).ravel() % 16, weights=mag.ravel(), minlength=16)
    total = weight.sum()
    return {
        "grad_mean": float(mag.mean()), "edges": float((mag > 0.08).mean()), "flat": float((mag < 0.005).mean()),
        "grad_kurtosis": kurtosis,
        "colour_edge_share": colour_edges / (luma_edges + colour_edges + 1e-3),
        "orient_entropy": _entropy(weight),
        # bins 0, 15 (near horizontal gradients) and 7, 8 (near vertical): within 11.25 degrees of an axis
        "axis_share": float(weight[[0, 7, 8, 15]].sum() / total) if total > 0 else 0.25,
        **_patch_statistics(y[1:-1, 1:-1], gx, gy, mag, colour),
    }


def _patch_statistics(y: np.ndarray, gx: np.ndarray, gy: np.ndarray, mag: np.ndarray,
                      colour: np.ndarray) -> dict[str, float]:
    """Medians over PATCH-sized patches: local evidence that global means wash out."""
    luma, px, py = _patches(y), _patches(gx), _patches(gy)
    textured = luma.std(axis=1) > 0.05 if luma.size else np.zeros(0, dtype=bool)
    jxx, jyy, jxy = (px * px).sum(1), (py * py).sum(1), (px * py).sum(1)
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (jxx + jyy + 1e-9)
    # two tones: the luma variance left within the halves above and below the patch mean
    upper = luma > luma.mean(axis=1, keepdims=True)
    within = sum(((luma - (luma * m).sum(1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1)) ** 2 * m).sum(1)
                 for m in (upper, ~upper))
    residual = within / (luma.var(axis=1) * PATCH * PATCH + 1e-9)
    luma_edges, colour_edges = (_patches(mag) > 0.05).mean(axis=1), (_patches(colour) > 0.05).mean(axis=1)
    with_edges = luma_edges + colour_edges > 0.05
    share = colour_edges / (luma_edges + colour_edges + 1e-3)
    return {"patch_colour_edges": _median_or(share[with_edges], 0.0),
            "patch_two_tone": _median_or(residual[textured], 0.5),
            "patch_coherence": _median_or(coherence[textured], 0.0),
            "patch_straight": float((coherence[textured] > 0.6).mean()) if textured.any() else 0.0}


def _coherence(y: np.ndarray, sigma: float) -> float:
    """Energy-weighted structure-tensor coherence: 1 for straight parallel edges, 0 for isotropic texture."""
    gx, gy = _gradients(y)
    jxx, jyy, jxy = (_gaussian_blur(a, sigma) for a in (gx * gx, gy * gy, gx * gy))
    trace = jxx + jyy
    spread = np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2)
    total = trace.sum()
    return float(spread.sum() / total) if total > 1e-12 else 0.0


def _spectrum(y: np.ndarray) -> dict[str, float]:
    """High-frequency share, radial slope, and periodicity: the power whitened by the median of its
    annulus, whose peaks are repeated structure (windows, bricks, tiles)."""
    crop = _centre_crop(y, SPECTRUM_SIDE)
    h, w = crop.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2((crop - crop.mean()) * window)) ** 2
    radius = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    total = power[radius > 0.02].sum()
    hf = float(power[radius > 0.25].sum() / total) if total > 0 else 0.0
    edges = np.geomspace(0.02, 0.5, 10)
    which = np.digitize(radius, edges)
    centres, levels = [], []
    for i in range(1, len(edges)):
        band = power[which == i]
        if band.size and band.mean() > 0:
            centres.append(np.sqrt(edges[i - 1] * edges[i]))
            levels.append(band.mean())
    slope = float(np.polyfit(np.log(centres), np.log(levels), 1)[0]) if len(centres) >= 3 else -2.0
    annulus = np.digitize(radius, np.linspace(0.04, 0.3, 21))
    whitened = []
    for i in range(1, 21):
        ring = power[annulus == i]
        if ring.size and np.median(ring) > 0:
            whitened.append(ring / np.median(ring))
    if whitened:
        flat = np.concatenate(whitened)
        peak, mean = float(np.log(np.percentile(flat, 99.5))), float(np.log(flat.mean()))
    else:
        peak, mean = 0.0, 0.0
    return {"hf_share": hf, "spectrum_slope": slope, "periodicity_peak": peak, "periodicity_mean": mean}


def _line_art(y: np.ndarray) -> dict[str, float]:
    inner = y[1:-1, 1:-1]
    across_rows = np.minimum(y[1:-1, :-2], y[1:-1, 2:]) - inner
    across_cols = np.minimum(y[:-2, 1:-1], y[2:, 1:-1]) - inner
    laplacian = y[1:-1, :-2] + y[1:-1, 2:] + y[:-2, 1:-1] + y[2:, 1:-1] - 4 * inner
    return {"dark_lines": float(((across_rows > 0.06) | (across_cols > 0.06)).mean()),
            "noise_mad": float(np.median(np.abs(laplacian)) / 0.6745)}


def statistics(image: np.ndarray) -> dict[str, float]:
    """The raw statistics of one image (or view), by name, in FEATURES order."""
    x = _as_float_rgb(image)
    sat = x.max(axis=2) - x.min(axis=2)
    y = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    stats = {**_colour(x, sat), **_tone(y), **_edges(x, y),
             "coherence_fine": _coherence(y, 1.5), "coherence_coarse": _coherence(y, 4.0),
             **_spectrum(y), **_line_art(y)}
    return {name: stats[name] for name in FEATURES}


def transform(stats: dict[str, float]) -> np.ndarray:
    """Statistics made near-Gaussian: logit of fractions, log of magnitudes, others as they are."""
    out = np.empty(len(FEATURES), dtype=np.float64)
    for i, name in enumerate(FEATURES):
        v = float(stats[name])
        if name in _FRACTIONS:
            p = (v + _EPS_FRACTION) / (1 + 2 * _EPS_FRACTION)
            out[i] = np.log(p / (1 - p))
        elif name in _MAGNITUDES:
            out[i] = np.log(v + _EPS_LOG)
        else:
            out[i] = v
    return out


def to_unit(transformed: np.ndarray) -> np.ndarray:
    """Weighted standardised statistics as a unit vector (inverse gnomonic projection)."""
    weights = np.asarray(WEIGHTS)
    z = (np.asarray(transformed, dtype=np.float64) - np.asarray(CENTRE)) / np.asarray(SCALE) * weights
    v = np.append(z / np.linalg.norm(weights), 1.0)
    return (v / np.linalg.norm(v)).astype(np.float32)


def views(image: np.ndarray) -> list[np.ndarray]:
    """The whole image, then (both sides at least 2 * MIN_VIEW) its quadrants and its centre."""
    x = _as_float_rgb(image)
    h, w = x.shape[:2]
    if min(h, w) < 2 * MIN_VIEW:
        return [x]
    hh, hw = h // 2, w // 2
    return [x, x[:hh, :hw], x[:hh, hw:], x[hh:, :hw], x[hh:, hw:], x[h // 4:h // 4 + hh, w // 4:w // 4 + hw]]


def embed(image: np.ndarray) -> np.ndarray:
    """One image -> [views, D] float32 unit vectors."""
    return np.stack([to_unit(transform(statistics(view))) for view in views(image)])


def identity() -> dict[str, Any]:
    """What produced an embedding, in the shape of clipsr.clip.EncoderIdentity: the hash covers the
    version, the statistics, their weights and constants, and the views, so any change is a
    different descriptor."""
    definition = json.dumps({"arch": ARCH, "version": VERSION, "features": FEATURES, "weights": WEIGHTS,
                             "centre": CENTRE, "scale": SCALE, "max_side": MAX_SIDE, "min_view": MIN_VIEW,
                             "patch": PATCH, "spectrum_side": SPECTRUM_SIDE}).encode()
    return {"arch": ARCH, "weights": f"v{VERSION}", "sha256": hashlib.sha256(definition).hexdigest(),
            "semantic_prior": False, "embed_dim": len(FEATURES) + 1}


class RouteStatsDescriptor:
    """The descriptor behind the routing encoder interface (``identity_dict``, ``embed``)."""

    def __init__(self) -> None:
        self.identity_dict = identity()

    def embed(self, image: np.ndarray) -> np.ndarray:
        return embed(image)
