"""Which model enhances an input: a small interface the planner calls once per key.

A router maps a relative key to a :class:`Route` (domain, model, similarity). Without routing
options every input goes to ``--model`` under the domain ``default``. Prefix maps (``--route-map``)
and backfills of one domain (``--domain``) look the domain's current version up in the model
registry (``--models``, written by ``clipsr adapt``) once, at planning time, and pin it: the whole
run uses that version even if another is promoted meanwhile.

``--route auto`` needs each image's embedding, so the first choice happens in the inference stage
(:class:`AutoChooser`): the nearest current domain by its exemplars, ``--model`` below that
domain's calibrated threshold (clipsr.domain_routing). The row records the embedding (float16),
the descriptor that made it, the runner-up domain and the margin, and the model actually used;
the index keeps the embedding and its descriptor. Later runs route those inputs again on the
driver (:meth:`AutoRouter.reroute`) from the stored embedding and the registry's current domains,
without reading the image: after a promotion, a rollback or a new domain only the inputs whose
domain or domain version changed are enhanced again. Inputs with no stored embedding (new,
changed, or indexed before embeddings were kept), or one made by another descriptor than the
registry's, go to the inference stage under the routing *signature* (a hash of the source model,
the threshold and every current domain version), which embeds them again.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from clipsr import domain_routing as dr
from clipsr import storage
from clipsr.config import ConfigError, parse_document, validate
from clipsr.domain_routing import DEFAULT_DOMAIN, describe_encoder


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
    similarity: float | None = None  # auto routing only: to the nearest domain (clipsr.domain_routing)
    runner_up: str | None = None  # auto routing only: second-nearest domain (the nearest when sent to default)
    margin: float | None = None  # auto routing only: similarity - runner-up's (- nearest's threshold on default)
    descriptor: str | None = None  # auto routing only: the encoder of the embedding routed on


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
    from clipsr.factory import is_adapted, read_model_metadata, scale_mismatch  # imports torch: not in light tasks
    from clipsr.models.checkpoint import CheckpointError

    meta = read_model_metadata(spec)
    if scale is not None and scale != meta["scale"]:
        raise CheckpointError(scale_mismatch(meta, scale))
    return ModelRef(spec=spec, id=meta["id"], scale=int(meta["scale"]),
                    clip_encoder=describe_encoder(meta.get("clip_encoder")), adapted=is_adapted(meta))


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


def auto_spec(registry: str, threshold: float | None, source_spec: str, versions: dict[str, int]) -> str:
    """The model spec that tells the inference stage to choose per image (JSON after a prefix);
    the domain versions are pinned, so a promotion during the run does not change its routing."""
    return AUTO_PREFIX + json.dumps({"registry": registry, "threshold": threshold, "source": source_spec,
                                     "versions": versions}, sort_keys=True)


def pack_embedding(embedding: np.ndarray) -> bytes:
    """How rows and the index keep a routing embedding (its views one after the other): float16,
    1 KB for one 512-dimensional CLIP vector, 396 bytes for six views of the descriptor."""
    return np.asarray(embedding, dtype="<f2").tobytes()


def unpack_embedding(data: bytes, dim: int) -> np.ndarray | None:
    """The views of a stored embedding, [views, dim]; None if its size does not fit ``dim``."""
    flat = np.frombuffer(data, dtype="<f2").astype(np.float32)
    if flat.size == 0 or flat.size % dim:
        return None
    return flat.reshape(-1, dim)


def _domain_ref(entry: Any, resolve: Callable[[str], ModelRef]) -> ModelRef:
    return replace(resolve(entry.ref), spec=entry.ref, version=f"v{entry.version}")


class AutoRouter:
    """``--route auto`` on the planner: new inputs go to the per-image chooser under the routing
    signature; inputs with a stored embedding of the registry's descriptor are routed here, to a
    concrete domain model. ``threshold`` None: each domain's calibrated one."""

    def __init__(self, registry: str, source: ModelRef, threshold: float | None,
                 resolve: Callable[[str], ModelRef] = lambda ref: resolve_model(ref, None),
                 strength: float | None = None) -> None:
        current = dr.current_domains(registry)
        if not current:
            raise RegistryUnavailableError(f"--route auto: no domain in {registry} has a current version with "
                                           "routing data")
        self.source, self.threshold = source, threshold
        self.domains = sorted(current)
        try:
            self.descriptor = dr.check_one_encoder({d: current[d][1] for d in self.domains})
        except ValueError as e:
            raise RegistryUnavailableError(f"--route auto: {e}") from None
        self.routing = [current[d][1] for d in self.domains]
        self.models = [_domain_ref(current[d][0], resolve) for d in self.domains]
        if strength is not None:
            self.models = [at_strength(ref, strength) for ref in self.models]
        state = [source.id, "calibrated" if threshold is None else threshold] + sorted(
            [d, e.version, e.doc["model"]["id"]] for d, (e, _) in current.items())
        if strength not in (None, 1.0):  # a routing signature of today's runs stays what it was
            state.append(["strength", strength])
        signature = "auto-" + hashlib.sha256(json.dumps(state).encode()).hexdigest()[:12]
        versions = {d: e.version for d, (e, _) in current.items()}
        self._chooser = Route("auto", ModelRef(spec=auto_spec(registry, threshold, source.spec, versions),
                                               id=signature, scale=source.scale, strength=strength))

    def route(self, key: str) -> Route:
        return self._chooser

    def reroute(self, embedding: bytes, descriptor: str | None) -> Route | None:
        """The route of an input whose embedding an earlier run stored; None when another
        descriptor made it (or an unrecorded one, before descriptors were recorded): the input
        must be embedded again, never compared across descriptors."""
        if descriptor != self.descriptor:
            return None
        views = unpack_embedding(embedding, self.routing[0].pool.shape[1])
        if views is None:
            return None
        d = dr.decide(views, self.routing, self.threshold)
        runner_up = None if d.runner_up is None else self.domains[d.runner_up]
        if d.chosen is None:
            return Route(DEFAULT_DOMAIN, self.source, d.similarity, runner_up, d.margin, self.descriptor)
        return Route(self.domains[d.chosen], self.models[d.chosen], d.similarity, runner_up, d.margin,
                     self.descriptor)


@dataclass(frozen=True)
class Choice:
    """What the inference stage decided for one image."""

    spec: str  # the model spec to run
    domain: str
    version: str | None
    similarity: float
    runner_up: str | None
    margin: float | None
    descriptor: str
    embedding: np.ndarray  # [views, D]


class AutoChooser:
    """Per-image routing in the inference stage: embed the LR input, decide, pick a model spec."""

    def __init__(self, spec: str) -> None:
        from clipsr.registry import Registry

        conf = json.loads(spec[len(AUTO_PREFIX):])
        self.threshold, self.source = conf["threshold"], conf["source"]
        registry = Registry(conf["registry"])
        self.domains = sorted(conf["versions"])
        self.entries = [registry.get(d, conf["versions"][d]) for d in self.domains]
        routing = {d: dr.DomainRouting.from_entry(e.doc) for d, e in zip(self.domains, self.entries)}
        missing = sorted(d for d, r in routing.items() if r is None)
        if missing:
            raise ValueError(f"--route auto: {', '.join(missing)} have no routing data")
        self.descriptor = dr.check_one_encoder(routing)
        self.routing = [routing[d] for d in self.domains]
        self.encoder = dr.encoder_for(self.routing[0].encoder)

    def choose(self, image_rgb: np.ndarray) -> Choice:
        """The choice for one HxWx3 image (as decoded: the LR input)."""
        emb = self.encoder.embed(image_rgb)
        d = dr.decide(emb, self.routing, self.threshold)
        runner_up = None if d.runner_up is None else self.domains[d.runner_up]
        if d.chosen is None:
            return Choice(self.source, DEFAULT_DOMAIN, None, d.similarity, runner_up, d.margin, self.descriptor, emb)
        entry = self.entries[d.chosen]
        return Choice(entry.ref, self.domains[d.chosen], f"v{entry.version}", d.similarity, runner_up, d.margin,
                      self.descriptor, emb)


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
    threshold: float | None = None,
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
