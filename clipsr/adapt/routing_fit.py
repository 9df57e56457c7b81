"""Routing data of a domain, fitted at adaptation time, and the routing confusion of a registry.

A domain's routing block (its registry entry's ``routing``) holds the embeddings of its exemplars
degraded exactly as inputs arrive: the protocol's bicubic (clipsr.degrade.make_lr) at the
domain's scale, since routing embeds LR inputs, and an HR exemplar's statistics (edges, noise,
spectrum) are not those of its downscale; then what the domain's archive did to its LR (a JPEG
archive's inputs carry its blocking, and a descriptor of edges and spectrum sees it). With them:
the "none of these" threshold calibrated by leave-one-out (clipsr.domain_routing), the
leave-one-out similarities it came from, and the encoder's identity, so routing never compares
vectors of two encoders.

The confusion is measured over the registry's current domains, old and new, after a run of
``clipsr adapt``: a new domain can take an old domain's images as well as lose its own.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from clipsr import domain_routing as dr
from clipsr import storage
from clipsr.degrade import make_lr, modcrop

CALIBRATION = (f"leave-one-out similarities of the exemplars as angles: mean + {dr.REJECT_Z} standard deviations, "
               "never stricter than the least typical exemplar")


def degrade(shot: np.ndarray, scale: int) -> np.ndarray:
    """An HR exemplar (uint8 HxWx3) as an input of this scale would arrive."""
    return make_lr(modcrop(shot, scale), scale)


def fit_domain(lrs: list[np.ndarray], scale: int, encoder_spec: dict[str, Any],
               archive: str = "clean") -> tuple[dict[str, Any], np.ndarray]:
    """The routing block of a domain from its exemplars as inputs arrive (``degrade``, then
    ``archive``: the degradation the adaptation gave them, recorded), and the (unit) mean of their
    embeddings, kept as the entry's centroid for readers of older versions."""
    encoder = dr.load_encoder(encoder_spec["arch"], encoder_spec.get("weights"), seed=encoder_spec.get("seed", 0))
    embeddings = [np.asarray(encoder.embed(lr), dtype=np.float32) for lr in lrs]
    loo = dr.leave_one_out(embeddings)
    threshold = dr.calibrate_threshold(loo)
    block = {
        "encoder": encoder.identity_dict,
        "descriptor": dr.describe_encoder(encoder.identity_dict),
        "degradation": {"kind": "bicubic", "scale": scale, "function": "clipsr.degrade.make_lr", "archive": archive},
        "k": dr.K_NEAREST,
        "threshold": None if threshold is None else round(threshold, 6),
        "calibration": CALIBRATION if threshold is not None else "too few exemplars to calibrate (3 needed)",
        "leave_one_out": [round(float(x), 6) for x in loo],
        # last: the bulk of the block; per exemplar, its views
        "exemplars": [[[float(x) for x in view] for view in e] for e in embeddings],
    }
    centroid = np.stack([e[0] for e in embeddings]).mean(axis=0)  # of the whole-image views
    return block, centroid / max(float(np.linalg.norm(centroid)), 1e-12)


def registry_confusion(registry_uri: str, published: Mapping[str, int] | None = None) -> dict[str, Any] | None:
    """The leave-one-out confusion of the registry's current domains, with the versions of
    ``published`` (domain -> version, this run's) in place of the current ones: a version that
    was not promoted is shown as routing would see it once made current. None when no domain can
    be routed to."""
    from clipsr.registry import Registry

    registry = Registry(registry_uri)
    current = dr.current_domains(registry_uri)
    not_current = []
    for name, version in (published or {}).items():
        entry = registry.get(name, version)
        routing = dr.DomainRouting.from_entry(entry.doc)
        if routing is not None:
            if name not in current or current[name][0].version != version:
                not_current.append(name)
            current[name] = (entry, routing)
    if not current:
        return None
    conf = dr.confusion({name: routing for name, (_, routing) in current.items()})
    return {**conf, "versions": {name: entry.version for name, (entry, _) in current.items()},
            "not_current": sorted(not_current)}


def report_confusion(registry_uri: str, report_base: str, published: Mapping[str, int] | None = None) -> str:
    """Measure the confusion, write it beside the adaptation report (``<base>.routing.json``) and
    return it as text for the terminal."""
    conf = registry_confusion(registry_uri, published)
    if conf is None:
        return "routing: no domain has routing data"
    uri = report_base + ".routing.json"
    storage.write_bytes_atomic(uri, json.dumps(conf, indent=2).encode())
    return f"{dr.format_confusion(conf)}\nrouting confusion: {uri}"
