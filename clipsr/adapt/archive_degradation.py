"""A domain's archive degradation, measured from a sample of the archive itself.

``clipsr adapt --degradation-from URI`` reads a spread sample of the images under URI: a JPEG
file's quality comes from its quantisation tables (exact), another file's from the blind grid
estimate of :mod:`clipsr.jpeg` (coarse: 50 or 75, or none). When at least half the sample shows a
quality, the domain is adapted as ``jpeg:Q`` with Q their median; otherwise as ``clean``. A domain
spec can name its own archive (or its degradation), so one run adapts domains of different archives.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Callable

from clipsr import imaging, storage
from clipsr.adapt.spec import DomainSpec
from clipsr.jpeg import blind_quality, read_quality

#: Files read from the archive prefix, spread over its sorted listing.
DEFAULT_SAMPLE = 20


def measure(uri: str, sample: int = DEFAULT_SAMPLE) -> tuple[str, dict[str, Any]]:
    """The degradation spec for adaptation (``clean`` or ``jpeg:Q``) and what it was read from."""
    images = storage.list_images(uri)  # a missing or empty prefix is an error there
    step = max(1, len(images) // sample)
    picked = images[::step][:sample]
    qualities: list[int] = []
    unreadable = 0
    for image_uri in picked:
        try:
            data = storage.read_bytes(image_uri)
            quality = read_quality(data)
            if quality is None:
                quality = blind_quality(imaging.to_rgb(imaging.load_rgb_or_grey_uint8(data)))
        except (OSError, ValueError):  # an unreadable file tells nothing about the others
            unreadable += 1
            continue
        if quality is not None:
            qualities.append(quality)
    read = len(picked) - unreadable
    if read == 0:
        raise ValueError(f"--degradation-from {uri}: none of the {len(picked)} sampled files could be read")
    spec = f"jpeg:{round(statistics.median(qualities))}" if len(qualities) * 2 >= read else "clean"
    return spec, {"uri": uri, "sampled": len(picked), "unreadable": unreadable,
                  "with_quality": len(qualities), "qualities": sorted(qualities), "degradation": spec}


def with_archive_degradations(specs: list[DomainSpec], degradation: str, degradation_from: str | None,
                              say: Callable[[str], None]) -> list[DomainSpec]:
    """``specs`` with each domain's degradation resolved: its spec's own, or else the run's
    (``degradation``, or measured from ``degradation_from``). Each archive is measured once, and
    ``say`` is told what was found there."""
    found_at: dict[str, str] = {}

    def measured_at(uri: str) -> str:
        if uri not in found_at:
            found_at[uri], found = measure(uri)
            say(f"degradation measured from {uri}: {found_at[uri]} ({found['with_quality']} of "
                f"{found['sampled'] - found['unreadable']} sampled files show a JPEG quality"
                + (f", {found['qualities'][0]} to {found['qualities'][-1]})" if found["qualities"] else ")"))
        return found_at[uri]

    run_source = degradation_from and storage.absolute(degradation_from)
    resolved = []
    for spec in specs:
        if spec.degradation is None and spec.degradation_from is None:
            spec = dataclasses.replace(spec, degradation=degradation, degradation_from=run_source)
        if spec.degradation_from is not None:
            spec = dataclasses.replace(spec, degradation=measured_at(spec.degradation_from))
        resolved.append(spec)
    return resolved
