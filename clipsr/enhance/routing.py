"""Which model enhances an input: a small interface the planner calls once per key.

A router maps a relative key to a :class:`Route` (domain, model, similarity). Without routing
options every input goes to ``--model`` under the domain ``default``. Prefix maps (``--route-map``)
and backfills of one domain (``--domain``) look the domain's current version up in the model
registry (``--models``, written by ``clipsr adapt``) once, at planning time, and pin it: the whole
run uses that version even if another is promoted meanwhile.

``--route auto`` needs each image's embedding, so the choice happens in the inference stage
(:class:`AutoChooser`): nearest current domain centroid by cosine, ``--model`` below the
threshold. The planner only sees the routing *signature* (a hash of the source model, the
threshold and every current domain version) as the rows' ``model_id``: while the registry does
not change, unchanged inputs are skipped; once a domain gets a new version, auto-routed inputs are
routed (and enhanced) again. The model actually used is the row's domain and ``model_version``.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from clipsr import storage
from clipsr.config import ConfigError, parse_document, validate

DEFAULT_DOMAIN = "default"


class RegistryUnavailableError(ValueError):
    """A routing option that needs a model registry (--models), or one this version cannot do."""


@dataclass(frozen=True)
class ModelRef:
    """A model as the planner records it: enough to decide "unchanged" without loading weights."""

    spec: str  # what load_upscaler takes: bicubic, default, a checkpoint path/URI
    id: str  # content-derived id from the checkpoint ("bicubic" for bicubic)
    scale: int
    version: str | None = None  # registry version of a domain model; None without a registry
    clip_encoder: str | None = None  # "arch weights sha256:<12>", None when the model has none


@dataclass(frozen=True)
class Route:
    domain: str
    model: ModelRef
    similarity: float | None = None  # auto routing only: cosine to the chosen domain's centroid


class Router(Protocol):
    def route(self, key: str) -> Route: ...


class SingleModelRouter:
    """Every input to one model: no registry, or a backfill of one domain."""

    def __init__(self, model: ModelRef, domain: str = DEFAULT_DOMAIN) -> None:
        self._route = Route(domain, model)

    def route(self, key: str) -> Route:
        return self._route


class PrefixRouter:
    """The longest matching prefix of a route map names the domain; other keys keep the source
    model (domain ``default``), so adding a map never leaves an input without a model."""

    def __init__(self, prefixes: Mapping[str, str], resolve: Callable[[str], ModelRef], source: ModelRef) -> None:
        self._routes = sorted(((p, Route(d, resolve(d))) for p, d in prefixes.items()),
                              key=lambda item: len(item[0]), reverse=True)
        self._source = Route(DEFAULT_DOMAIN, source)

    def route(self, key: str) -> Route:
        for prefix, route in self._routes:
            if key.startswith(prefix):
                return route
        return self._source


def describe_encoder(identity: Mapping[str, Any] | None) -> str | None:
    """How the manifest names a CLIP encoder: architecture, weights and a short weights hash."""
    if not identity:
        return None
    return f"{identity['arch']} {identity['weights']} sha256:{str(identity['sha256'])[:12]}"


def resolve_model(spec: str, scale: int | None) -> ModelRef:
    """Identify a model spec from its checkpoint header, without building the network."""
    if spec == "bicubic":
        if scale is None:
            raise ValueError("--model bicubic needs --scale")
        return ModelRef(spec="bicubic", id="bicubic", scale=scale)
    from clipsr.factory import checkpoint_uri  # imports torch: kept out of the light task workers
    from clipsr.models.checkpoint import CheckpointError, read_metadata

    uri = checkpoint_uri(spec)
    try:
        meta = read_metadata(storage.read_bytes(uri))
    except FileNotFoundError:
        raise FileNotFoundError(f"model {spec!r} not found: expected 'bicubic', 'default', a registry "
                                "reference, or a checkpoint path/URI") from None
    if scale is not None and scale != meta["scale"]:
        raise CheckpointError(f"model {meta['id']} is a x{meta['scale']} model, but --scale {scale} was asked for")
    return ModelRef(spec=spec, id=meta["id"], scale=int(meta["scale"]),
                    clip_encoder=describe_encoder(meta.get("clip_encoder")))


def resolve_domain(registry: str | None, domain: str) -> ModelRef:
    """The current version of ``domain`` in the registry, pinned by version for the whole run."""
    if registry is None:
        raise RegistryUnavailableError(f"domain {domain!r}: routing to domains needs --models REGISTRY")
    from clipsr.registry import Registry

    entry = Registry(registry).current(domain)
    if entry is None:
        raise RegistryUnavailableError(f"domain {domain!r} has no current version in {registry}")
    ref = resolve_model(entry.ref, None)
    return ModelRef(spec=entry.ref, id=ref.id, scale=ref.scale, version=f"v{entry.version}",
                    clip_encoder=ref.clip_encoder)


AUTO_PREFIX = "auto:"


def auto_spec(registry: str, threshold: float, source_spec: str, versions: dict[str, int]) -> str:
    """The model spec that tells the inference stage to choose per image (JSON after a prefix);
    the domain versions are pinned, so a promotion during the run does not change its routing."""
    return AUTO_PREFIX + json.dumps({"registry": registry, "threshold": threshold, "source": source_spec,
                                     "versions": versions}, sort_keys=True)


def auto_router(registry: str, source: ModelRef, threshold: float) -> SingleModelRouter:
    """Every input to the per-image chooser, under a signature of the registry's current state."""
    from clipsr.registry import Registry

    current = Registry(registry).centroids()
    if not current:
        raise RegistryUnavailableError(f"--route auto: no domain in {registry} has a current version with a centroid")
    encoders = {json.dumps(e.doc.get("centroid_encoder"), sort_keys=True) for e, _ in current.values()}
    if len(encoders) != 1:
        raise RegistryUnavailableError("--route auto: the domains' centroids come from different encoders")
    state = [source.id, threshold] + sorted([d, e.version, e.doc["model"]["id"]] for d, (e, _) in current.items())
    signature = "auto-" + hashlib.sha256(json.dumps(state).encode()).hexdigest()[:12]
    versions = {d: e.version for d, (e, _) in current.items()}
    model = ModelRef(spec=auto_spec(registry, threshold, source.spec, versions), id=signature, scale=source.scale)
    return SingleModelRouter(model, domain="auto")


class AutoChooser:
    """Per-image routing in the inference stage: embed, compare with centroids, pick a model spec."""

    def __init__(self, spec: str) -> None:
        from clipsr.clip import EncoderIdentity, load_image_encoder
        from clipsr.registry import Registry

        conf = json.loads(spec[len(AUTO_PREFIX):])
        self.threshold, self.source = float(conf["threshold"]), conf["source"]
        registry = Registry(conf["registry"])
        self.domains = sorted(conf["versions"])
        self.entries = [registry.get(d, conf["versions"][d]) for d in self.domains]
        self.centroids = [e.centroid for e in self.entries]
        want = EncoderIdentity.from_dict(self.entries[0].doc["centroid_encoder"])
        seed = int(want.weights.split(":", 1)[1]) if want.weights.startswith("random:") else 0
        weights = None if want.weights.startswith("random:") else want.weights
        self.encoder = load_image_encoder(want.arch, weights, seed=seed)
        if not self.encoder.identity.matches(want):
            raise ValueError(f"--route auto: cannot rebuild the centroid encoder {want.arch} {want.weights}")

    def choose(self, image_rgb) -> tuple[str, str, str | None, float]:
        """(model spec, domain, version, similarity) for one HxWx3 image."""
        import numpy as np

        emb = self.encoder.embed_images([image_rgb])[0]
        sims = [float(np.dot(emb, c)) for c in self.centroids]
        best = int(np.argmax(sims))
        if sims[best] < self.threshold:
            return self.source, DEFAULT_DOMAIN, None, sims[best]
        entry = self.entries[best]
        return entry.ref, self.domains[best], f"v{entry.version}", sims[best]


def load_route_map(uri: str) -> dict[str, str]:
    """A YAML/JSON mapping of key prefix -> domain name (``scans/1890/: newspapers``)."""
    doc = parse_document(storage.read_bytes(uri))
    if not isinstance(doc, dict) or not doc:
        raise ValueError(f"route map {uri}: expected a non-empty mapping of key prefix -> domain")
    for prefix in doc:
        if isinstance(prefix, str) and prefix.startswith("/"):
            raise ValueError(f"route map {uri}: prefix {prefix!r} must be relative to --input")
    try:
        validate(doc, "route-map")
    except ConfigError as e:
        raise ValueError(f"route map {uri}: {e} (schemas/route-map.schema.json)") from None
    return dict(doc)


def build_router(
    model: ModelRef,
    registry: str | None = None,
    route: str | None = None,
    route_map: str | None = None,
    domain: str | None = None,
    resolve: Callable[[str | None, str], ModelRef] = resolve_domain,
    threshold: float = 0.8,
) -> Router:
    """The router for the command line's routing options (at most one of route, route_map, domain)."""
    if sum(x is not None for x in (route, route_map, domain)) > 1:
        raise ValueError("choose one of --route auto, --route-map FILE and --domain NAME")
    if route is not None:
        if route != "auto":
            raise ValueError(f"--route takes 'auto', got {route!r}")
        if registry is None:
            raise RegistryUnavailableError("--route auto needs --models REGISTRY")
        return auto_router(registry, model, threshold)
    if domain is not None:
        return SingleModelRouter(resolve(registry, domain), domain)
    if route_map is not None:
        return PrefixRouter(load_route_map(route_map), lambda d: resolve(registry, d), model)
    return SingleModelRouter(model)
