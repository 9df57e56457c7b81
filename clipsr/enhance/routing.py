"""Which model enhances an input: a small interface the planner calls once per key.

A router maps a relative key to a :class:`Route` (domain, model, similarity). Without routing
options every input goes to ``--model`` under the domain ``default``. Prefix maps (``--route-map``)
and backfills of one domain (``--domain``) look the domain's current version up in the model
registry (``--models``, written by ``clipsr adapt``) once, at planning time, and pin it: the whole
run uses that version even if another is promoted meanwhile.

``--route auto`` needs each image's embedding, so the first choice happens in the inference stage
(:class:`AutoChooser`): nearest current domain centroid by cosine, ``--model`` below the
threshold. The row records the embedding (float16) and the model actually used, and the index
keeps both. Later runs route those inputs again on the driver (:meth:`AutoRouter.reroute`) from
the stored embedding and the registry's current centroids, without reading the image: after a
promotion, a rollback or a new domain only the inputs whose domain or domain version changed are
enhanced again. Inputs with no stored embedding (new, changed, or indexed before embeddings were
kept) go to the inference stage under the routing *signature* (a hash of the source model, the
threshold and every current domain version).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

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
    adapted: bool = False  # has a source model, so --strength can tone it down
    strength: float | None = None  # --strength it runs at (adapted models); None: as stored


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


def at_strength(ref: ModelRef, strength: float) -> ModelRef:
    """``ref`` at an adapted model's ``strength`` (its id changes below 1); a model without a
    source is refused below 1 and left as it is at 1."""
    from clipsr.models.strength import check_strength, strength_id

    if not ref.adapted:
        if check_strength(strength) != 1.0:
            raise ValueError(f"model {ref.id} has no source model to interpolate from: --strength below 1 "
                             "applies to adapted models (a registry domain, or a checkpoint written by clipsr adapt)")
        return ref
    return replace(ref, id=strength_id(ref.id, strength), strength=float(strength))


def resolve_model(spec: str, scale: int | None) -> ModelRef:
    """Identify a model spec from its checkpoint header, without building the network (a weights
    file of another architecture has no header: spandrel builds it here, once, on the driver)."""
    if spec == "bicubic":
        if scale is None:
            raise ValueError("--model bicubic needs --scale")
        return ModelRef(spec="bicubic", id="bicubic", scale=scale)
    from clipsr.factory import read_model_metadata, scale_mismatch  # imports torch: kept out of the light task workers
    from clipsr.models.checkpoint import CheckpointError

    meta = read_model_metadata(spec)
    if scale is not None and scale != meta["scale"]:
        raise CheckpointError(scale_mismatch(meta, scale))
    return ModelRef(spec=spec, id=meta["id"], scale=int(meta["scale"]),
                    clip_encoder=describe_encoder(meta.get("clip_encoder")), adapted=meta.get("parent") is not None)


def resolve_domain(registry: str | None, domain: str) -> ModelRef:
    """The current version of ``domain`` in the registry, pinned by version for the whole run."""
    if registry is None:
        raise RegistryUnavailableError(f"domain {domain!r}: routing to domains needs --models REGISTRY")
    from clipsr.registry import Registry

    entry = Registry(registry).current(domain)
    if entry is None:
        raise RegistryUnavailableError(f"domain {domain!r} has no current version in {registry}")
    ref = resolve_model(entry.ref, None)
    return replace(ref, spec=entry.ref, version=f"v{entry.version}")


AUTO_PREFIX = "auto:"


def auto_spec(registry: str, threshold: float, source_spec: str, versions: dict[str, int]) -> str:
    """The model spec that tells the inference stage to choose per image (JSON after a prefix);
    the domain versions are pinned, so a promotion during the run does not change its routing."""
    return AUTO_PREFIX + json.dumps({"registry": registry, "threshold": threshold, "source": source_spec,
                                     "versions": versions}, sort_keys=True)


def nearest(embedding: np.ndarray, centroids: np.ndarray, threshold: float) -> tuple[int | None, float]:
    """Index of the nearest centroid by cosine (rows of ``centroids``), or None below ``threshold``."""
    sims = centroids @ embedding.astype(np.float32)
    best = int(np.argmax(sims))
    return (best if sims[best] >= threshold else None), float(sims[best])


def pack_embedding(embedding: np.ndarray) -> bytes:
    """How rows and the index keep a routing embedding: float16, 1 KB for 512 dimensions."""
    return np.asarray(embedding, dtype="<f2").tobytes()


def unpack_embedding(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f2").astype(np.float32)


class AutoRouter:
    """``--route auto`` on the planner: new inputs go to the per-image chooser under the routing
    signature; inputs with a stored embedding are routed here, to a concrete domain model."""

    def __init__(self, registry: str, source: ModelRef, threshold: float,
                 resolve: Callable[[str | None], ModelRef] = lambda ref: resolve_model(ref, None),
                 strength: float | None = None) -> None:
        from clipsr.registry import Registry

        current = Registry(registry).centroids()
        if not current:
            raise RegistryUnavailableError(f"--route auto: no domain in {registry} has a current version with a centroid")
        encoders = {json.dumps(e.doc.get("centroid_encoder"), sort_keys=True) for e, _ in current.values()}
        if len(encoders) != 1:
            raise RegistryUnavailableError("--route auto: the domains' centroids come from different encoders")
        self.source, self.threshold = source, threshold
        self.domains = sorted(current)
        self.centroids = np.stack([current[d][1] for d in self.domains]).astype(np.float32)
        self.models = []
        for d in self.domains:
            entry = current[d][0]
            ref = resolve(entry.ref)
            ref = replace(ref, spec=entry.ref, version=f"v{entry.version}")
            self.models.append(ref if strength is None else at_strength(ref, strength))
        state = [source.id, threshold] + sorted([d, e.version, e.doc["model"]["id"]] for d, (e, _) in current.items())
        if strength not in (None, 1.0):  # a routing signature of today's runs stays what it was
            state.append(["strength", strength])
        signature = "auto-" + hashlib.sha256(json.dumps(state).encode()).hexdigest()[:12]
        versions = {d: e.version for d, (e, _) in current.items()}
        self._chooser = Route("auto", ModelRef(spec=auto_spec(registry, threshold, source.spec, versions),
                                               id=signature, scale=source.scale, strength=strength))

    def route(self, key: str) -> Route:
        return self._chooser

    def reroute(self, embedding: bytes) -> Route:
        """The route of an input whose embedding an earlier run stored."""
        best, similarity = nearest(unpack_embedding(embedding), self.centroids, self.threshold)
        if best is None:
            return Route(DEFAULT_DOMAIN, self.source, similarity)
        return Route(self.domains[best], self.models[best], similarity)


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
        self.centroids = np.stack([e.centroid for e in self.entries]).astype(np.float32)
        want = EncoderIdentity.from_dict(self.entries[0].doc["centroid_encoder"])
        seed = int(want.weights.split(":", 1)[1]) if want.weights.startswith("random:") else 0
        weights = None if want.weights.startswith("random:") else want.weights
        self.encoder = load_image_encoder(want.arch, weights, seed=seed)
        if not self.encoder.identity.matches(want):
            raise ValueError(f"--route auto: cannot rebuild the centroid encoder {want.arch} {want.weights}")

    def choose(self, image_rgb) -> tuple[str, str, str | None, float, np.ndarray]:
        """(model spec, domain, version, similarity, embedding) for one HxWx3 image."""
        emb = self.encoder.embed_images([image_rgb])[0]
        best, similarity = nearest(emb, self.centroids, self.threshold)
        if best is None:
            return self.source, DEFAULT_DOMAIN, None, similarity, emb
        entry = self.entries[best]
        return entry.ref, self.domains[best], f"v{entry.version}", similarity, emb


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
    strength: float | None = None,
) -> Router:
    """The router for the command line's routing options (at most one of route, route_map, domain).
    ``strength`` tones down the domain models (adapted, :func:`at_strength`); the source model
    ``model`` runs as given."""
    if sum(x is not None for x in (route, route_map, domain)) > 1:
        raise ValueError("choose one of --route auto, --route-map FILE and --domain NAME")
    if route is not None:
        if route != "auto":
            raise ValueError(f"--route takes 'auto', got {route!r}")
        if registry is None:
            raise RegistryUnavailableError("--route auto needs --models REGISTRY")
        return AutoRouter(registry, model, threshold, strength=strength)
    if strength is not None:
        plain = resolve
        resolve = lambda reg, d: at_strength(plain(reg, d), strength)  # noqa: E731
    if domain is not None:
        return SingleModelRouter(resolve(registry, domain), domain)
    if route_map is not None:
        return PrefixRouter(load_route_map(route_map), lambda d: resolve(registry, d), model)
    return SingleModelRouter(model)
