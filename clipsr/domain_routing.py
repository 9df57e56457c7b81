"""What ``--route auto`` keeps per domain and how it decides, in numpy only (the planner reroutes
from stored embeddings without torch).

An image's embedding is one or more unit vectors, its views (the weight-free descriptor describes
the whole image and its parts, clipsr.routing_descriptor; a CLIP encoder gives one). Each domain
keeps the embeddings of its exemplars, degraded as inputs are (its registry entry's ``routing``
block, written by clipsr.adapt.routing_fit). The similarity of an input to a domain is, averaged
over the input's views, the mean cosine of a view to its ``K_NEAREST`` nearest exemplar views of
the domain: a domain that is spread out (covers and inner pages, day and night) is matched by its
nearest exemplars, not by a mean that may lie between them.

The "none of these" threshold of a domain is calibrated from its exemplars alone, by leave-one-out:
each exemplar's similarity to the others (all its views left out). Read as angles, the threshold is
the one-sided prediction bound at 1% for one more image like the exemplars (Student's t, so that
ten exemplars, which say little about the spread, give a wider bound than a hundred would), and
never stricter than the least typical exemplar. Because it depends on no other domain, adding a
domain changes no other domain's threshold.

The decision: the nearest domain if the input's similarity reaches that domain's threshold, else
the source model (domain ``default``). The runner-up is the second-nearest domain and the margin the
difference of the two similarities; an input sent to ``default`` has the nearest domain as its
runner-up and a negative margin, how far it fell below that domain's threshold.

Entries written before routing blocks existed have one centroid (from the HR exemplars) and no
calibration: they are read as one exemplar with ``LEGACY_THRESHOLD``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from clipsr import routing_descriptor

K_NEAREST = 3
REJECT_Z = 2.326  # one-sided 1% of a normal
LEGACY_THRESHOLD = 0.8  # what --route auto used before thresholds were calibrated
DEFAULT_DOMAIN = "default"


def describe_encoder(identity: Mapping[str, Any] | None) -> str | None:
    """How manifests, indexes and reports name an encoder: architecture, weights, short hash."""
    if not identity:
        return None
    return f"{identity['arch']} {identity['weights']} sha256:{str(identity['sha256'])[:12]}"


def similarity(views: np.ndarray, pool: np.ndarray, k: int = K_NEAREST) -> float:
    """Mean over the rows of ``views`` of their mean cosine to their ``k`` nearest rows of ``pool``
    (all unit vectors)."""
    sims = np.atleast_2d(np.asarray(views, dtype=np.float32)) @ pool.T  # [views, pool]
    k = min(k, pool.shape[0])
    return float(np.sort(sims, axis=1)[:, ::-1][:, :k].mean())


def leave_one_out(exemplars: Sequence[np.ndarray], k: int = K_NEAREST) -> np.ndarray:
    """Each exemplar's similarity to the views of the others (empty for fewer than two)."""
    if len(exemplars) < 2:
        return np.empty(0, dtype=np.float64)
    return np.array([similarity(e, np.concatenate([o for j, o in enumerate(exemplars) if j != i]), k)
                     for i, e in enumerate(exemplars)])


def student_t_quantile(z: float, dof: int) -> float:
    """Student's t quantile from the normal one ``z`` (Cornish-Fisher, three terms: within 0.5%
    of the exact value from 5 degrees of freedom on; numpy has no t distribution)."""
    return (z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * dof ** 3))


def calibrate_threshold(loo: np.ndarray) -> float | None:
    """The "none of these" cosine from leave-one-out similarities: read as angles, the one-sided
    prediction bound for one more image of the domain (mean + t * sd * sqrt(1 + 1/n), t at 1 - 1%
    for n - 1 degrees of freedom: a few exemplars say little about the spread, so the bound widens),
    and never stricter than the least typical exemplar. None for fewer than three exemplars."""
    n = len(loo)
    if n < 3:
        return None
    angles = np.arccos(np.clip(loo, -1.0, 1.0))
    bound = angles.mean() + student_t_quantile(REJECT_Z, n - 1) * angles.std(ddof=1) * math.sqrt(1 + 1 / n)
    return math.cos(min(max(float(angles.max()), float(bound)), math.pi))


@dataclass(frozen=True)
class DomainRouting:
    """One domain as routing sees it."""

    exemplars: tuple[np.ndarray, ...]  # per exemplar, its views: [views, D] float32 unit vectors
    threshold: float | None  # calibrated; None: none recorded (LEGACY_THRESHOLD unless overridden)
    encoder: Mapping[str, Any]  # identity of the encoder that made the exemplars' embeddings

    @cached_property
    def pool(self) -> np.ndarray:
        """Every view of every exemplar, [N, D] (computed once: the planner routes millions)."""
        return np.concatenate(self.exemplars)

    @property
    def descriptor(self) -> str:
        return describe_encoder(self.encoder) or ""

    def without(self, i: int) -> "DomainRouting":
        """The domain with exemplar ``i`` left out (leave-one-out)."""
        return DomainRouting(self.exemplars[:i] + self.exemplars[i + 1:], self.threshold, self.encoder)

    @classmethod
    def from_entry(cls, doc: Mapping[str, Any]) -> "DomainRouting | None":
        """From a registry entry document: its routing block, or a legacy centroid; None without either."""
        block = doc.get("routing")
        if block:
            return cls(tuple(np.atleast_2d(np.asarray(e, dtype=np.float32)) for e in block["exemplars"]),
                       block.get("threshold"), block["encoder"])
        if doc.get("centroid") is not None and doc.get("centroid_encoder"):
            return cls((np.asarray([doc["centroid"]], dtype=np.float32),), None, doc["centroid_encoder"])
        return None


@dataclass(frozen=True)
class Decision:
    chosen: int | None  # index of the domain, None: the source model
    nearest: int
    similarity: float  # to the nearest domain
    runner_up: int | None  # the second-nearest domain; the nearest when chosen is None
    margin: float | None  # similarity - runner-up's; when chosen is None: similarity - nearest's threshold


def decide(views: np.ndarray, domains: Sequence[DomainRouting], threshold: float | None = None) -> Decision:
    """Route one embedding (its views, [views, D]); ``threshold`` overrides every domain's own."""
    sims = np.array([similarity(views, d.pool) for d in domains])
    order = np.argsort(-sims, kind="stable")
    nearest = int(order[0])
    limit = threshold_of(domains[nearest], threshold)
    if sims[nearest] < limit:
        return Decision(None, nearest, float(sims[nearest]), nearest, float(sims[nearest] - limit))
    if len(order) < 2:
        return Decision(nearest, nearest, float(sims[nearest]), None, None)
    second = int(order[1])
    return Decision(nearest, nearest, float(sims[nearest]), second, float(sims[nearest] - sims[second]))


def threshold_of(domain: DomainRouting, override: float | None = None) -> float:
    if override is not None:
        return override
    return LEGACY_THRESHOLD if domain.threshold is None else float(domain.threshold)


def check_one_encoder(domains: Mapping[str, DomainRouting]) -> str:
    """The descriptor all domains share; ValueError naming the groups when they differ (vectors of
    two encoders must never be compared)."""
    groups: dict[str, list[str]] = {}
    for name, d in sorted(domains.items()):
        groups.setdefault(d.descriptor, []).append(name)
    if len(groups) != 1:
        listing = "; ".join(f"{', '.join(names)}: {desc}" for desc, names in groups.items())
        raise ValueError(f"the domains' routing embeddings come from different encoders ({listing}); adapt the "
                         "older domains again with one --routing-encoder, or route with --route-map")
    return next(iter(groups))


def current_domains(registry_uri: str) -> dict[str, tuple[Any, DomainRouting]]:
    """Each domain's current registry entry and its routing, for the domains that can be routed to."""
    from clipsr.registry import Registry

    registry, out = Registry(registry_uri), {}
    for name in registry.domains():
        entry = registry.current(name)
        routing = None if entry is None else DomainRouting.from_entry(entry.doc)
        if routing is not None:
            out[name] = (entry, routing)
    return out


def confusion(domains: Mapping[str, DomainRouting], threshold: float | None = None) -> dict[str, Any]:
    """Leave-one-out routing of every exemplar over all ``domains``: where each domain's exemplars
    go when they are not among its exemplars themselves. The report's view of confusable domains."""
    names = sorted(domains)
    descriptor = check_one_encoder(domains)
    counts = {n: {m: 0 for m in names + [DEFAULT_DOMAIN]} for n in names}
    closest: dict[str, dict[str, Any]] = {}
    for name in names:
        own = domains[name]
        if len(own.exemplars) < 2:
            continue
        for j, views in enumerate(own.exemplars):
            rest = own.without(j)
            d = decide(views, [rest if m == name else domains[m] for m in names], threshold)
            counts[name][DEFAULT_DOMAIN if d.chosen is None else names[d.chosen]] += 1
            others = [(similarity(views, domains[m].pool), m) for m in names if m != name]
            if others:
                best, other = max(others)
                gap = similarity(views, rest.pool) - best
                if name not in closest or gap < closest[name]["margin"]:
                    closest[name] = {"domain": other, "margin": round(gap, 4)}
    own_share = {n: (counts[n][n] / total if (total := sum(counts[n].values())) else None) for n in names}
    return {"descriptor": descriptor, "domains": names, "counts": counts, "own_share": own_share,
            "thresholds": {n: round(threshold_of(domains[n], threshold), 4) for n in names},
            "closest_other": closest,
            "method": f"each exemplar routed with itself left out of its domain, {K_NEAREST} nearest exemplar views"}


def format_confusion(conf: Mapping[str, Any]) -> str:
    """The confusion as a table: one row per domain's exemplars, one column per destination."""
    names = list(conf["domains"])
    cols = names + [DEFAULT_DOMAIN]
    width = max([len(c) for c in cols] + [6]) + 2
    lines = [f"routing, leave-one-out over {len(names)} domain(s) ({conf['descriptor']}):",
             f"{'exemplars of':<18}" + "".join(f"{c:>{width}}" for c in cols) + f"{'own':>7}{'threshold':>11}"
             + "  closest other (worst margin)"]
    for n in names:
        share = conf["own_share"][n]
        close = conf["closest_other"].get(n)
        lines.append(f"{n:<18}" + "".join(f"{conf['counts'][n][c]:>{width}}" for c in cols)
                     + f"{'' if share is None else f'{share:.0%}':>7}{conf['thresholds'][n]:>11.3f}"
                     + (f"  {close['domain']} ({close['margin']:+.3f})" if close else ""))
    if conf.get("not_current"):
        lines.append(f"not current yet (shown as routing would see them once made current): "
                     f"{', '.join(conf['not_current'])}")
    return "\n".join(lines)


class _ClipAdapter:
    """A CLIP image encoder behind the routing encoder interface: one view per image."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self.identity_dict = encoder.identity.to_dict()

    def embed(self, image: np.ndarray) -> np.ndarray:
        return self._encoder.embed_images([image])


def load_encoder(arch: str, weights: str | None = None, seed: int = 0) -> Any:
    """A routing encoder (``identity_dict``, ``embed(image) -> [views, D]``): the weight-free descriptor
    (``route-stats``) or any encoder clipsr.clip builds (a CLIP tower, ``color-stats``)."""
    if arch == routing_descriptor.ARCH:
        if weights is not None:
            raise ValueError(f"the {arch} descriptor has no weights to load")
        return routing_descriptor.RouteStatsDescriptor()
    from clipsr.clip import load_image_encoder  # imports torch: only where images are embedded

    return _ClipAdapter(load_image_encoder(arch, weights, seed=seed))


def encoder_for(identity: Mapping[str, Any]) -> Any:
    """Rebuild the encoder an identity names; ValueError if this version builds another one."""
    weights = str(identity["weights"])
    if identity["arch"] == routing_descriptor.ARCH or weights.startswith("random:"):
        encoder = load_encoder(identity["arch"], None,
                               seed=int(weights.split(":", 1)[1]) if weights.startswith("random:") else 0)
    else:
        encoder = load_encoder(identity["arch"], weights)
    if (encoder.identity_dict["arch"], encoder.identity_dict["sha256"]) != (identity["arch"], identity["sha256"]):
        raise ValueError(f"--route auto: this version cannot rebuild the routing encoder {describe_encoder(identity)} "
                         f"(it builds {describe_encoder(encoder.identity_dict)}); adapt the domains again")
    return encoder
