"""A versioned, immutable model registry per domain, on a local folder or s3:// (any fsspec URI
can be read; publishing needs the conditional writes of local disks or S3).

Layout below the registry URI ``REGISTRY``::

    REGISTRY/_registry.json                      {"schema": "clipsr/registry/v1"}: marks a registry
    REGISTRY/_sources/<sha256>.safetensors       source models adapted from, content-addressed
    REGISTRY/<domain>/objects/<sha256>.safetensors  model files, content-addressed
    REGISTRY/<domain>/versions/v<N>.json         entry documents (schemas/registry-entry.schema.json)
    REGISTRY/<domain>/CURRENT                    {"version": N, "updated": ..., "previous": M}

Why it cannot be corrupted by concurrent writers:

- A model file's name is the hash of its bytes, so two writers of one name write the same bytes.
- ``vN.json`` is created with ``storage.write_bytes_if_absent`` (S3 ``If-None-Match: *``; locally
  a complete temporary file hard-linked into place), so it is never overwritten and never seen
  half-written. Two publishers racing for vN: one wins, the other takes vN+1.
- ``CURRENT`` moves by compare-and-swap (S3 ``If-Match``; locally a flock around read, compare and
  replace): a lost race re-reads and decides again, so no update is lost. A publication only moves
  it forward (a newer current version is left alone, as if the two had published in order);
  ``set_current`` moves it anywhere, a deliberate rollback.

Deltas depend on their source model, so the registry keeps its own copy of it under ``_sources/``
(named by the hash of its file, which the entry's ``source_model.file_sha256`` and the delta's
``parent.file_sha256`` record): deleting or re-exporting the file adapted from breaks nothing.
Entries written before these copies existed have no ``file_sha256`` and resolve their source by
the path they recorded. The leading ``_`` cannot clash with a domain name.

All of this needs a store that enforces the conditions: an S3-compatible store that accepts the
headers and ignores them would let writers overwrite each other silently. The first write through
a ``Registry`` probes the store (:func:`clipsr.storage.probe_conditional_writes`) and refuses one
that fails.

A crash between the steps leaves at worst an unreferenced model or source file, or an entry marked
promoted that ``CURRENT`` does not name yet: ``CURRENT`` alone says what is current.

References: ``REGISTRY/DOMAIN`` is that domain's current version, ``REGISTRY/DOMAIN/vN`` a given
one. Domain names are 1 to 64 of ``A-Z a-z 0-9 . _ -`` starting with a letter or digit, and not
of the form ``v<digits>`` (that would make ``REGISTRY/v2`` ambiguous).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from clipsr import storage
from clipsr.config import validate
from clipsr.provenance import utc_now

log = logging.getLogger(__name__)

ENTRY_SCHEMA = "clipsr/registry-entry/v1"
MARKER = "_registry.json"
SOURCES = "_sources"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MARKER_BYTES = json.dumps({"schema": "clipsr/registry/v1"}).encode() + b"\n"
_DOMAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION_LIKE = re.compile(r"^v[0-9]+$")
_VERSION_REF = re.compile(r"^v([1-9][0-9]*)$")
_VERSION_KEY = re.compile(r"^v([1-9][0-9]*)\.json$")
# Lost races tolerated before giving up: each loss means another writer made progress.
MAX_ATTEMPTS = 100

# Keep credentials out of entries: they are read by everyone who can load a model.
_USERINFO = re.compile(r"://[^/\s@]*:[^/\s@]*@")
_SIGNED_QUERY = re.compile(r"(?i)[?&](x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|sig)=")
_SECRET_KEY = re.compile(r"(?i)(secret|password|passwd|credential|session_token|access_key|api_key)")


class RegistryError(Exception):
    """The registry cannot do what was asked."""


class InvalidDomainError(RegistryError, ValueError):
    """A domain name that cannot be used as a registry folder."""


class EntryNotFoundError(RegistryError, LookupError):
    """No such domain, version, or no current version."""


class RegistryConflictError(RegistryError):
    """Gave up after losing MAX_ATTEMPTS races to other writers."""


def validate_domain(name: Any) -> str:
    """``name`` if it is a usable domain name, else InvalidDomainError saying why."""
    if not isinstance(name, str) or not _DOMAIN.match(name):
        raise InvalidDomainError(
            f"invalid domain name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit")
    if _VERSION_LIKE.match(name):
        raise InvalidDomainError(f"invalid domain name {name!r}: it looks like a version (vN), "
                                 f"which would make REGISTRY/{name} ambiguous")
    return name


@dataclass(frozen=True, eq=False)
class Entry:
    """One published version of a domain's model."""

    registry: str  # the registry URI
    domain: str
    version: int
    model_uri: str  # full URI of the model file
    promoted: bool  # made current when published (the gate passed); see CURRENT for what is now
    doc: dict[str, Any]  # the whole entry document
    centroid: np.ndarray | None  # float32, the mean routing embedding of the shots (routing uses doc["routing"])

    @property
    def ref(self) -> str:
        """``REGISTRY/DOMAIN/vN``: a reference that always names this version."""
        return f"{self.registry}/{self.domain}/v{self.version}"


class Registry:
    """The registry at ``uri`` (created by the first publication)."""

    def __init__(self, uri: str) -> None:
        self.uri = storage.absolute(uri).rstrip("/")
        if not self.uri or self.uri.endswith(":/"):
            raise ValueError(f"a registry needs a folder or prefix, got {uri!r}")
        self._marked = False
        self._probed = False

    # --- locations ---

    def _domain_uri(self, domain: str) -> str:
        return storage.join(self.uri, validate_domain(domain))

    def _version_uri(self, domain: str, version: int) -> str:
        return storage.join(self._domain_uri(domain), f"versions/v{version}.json")

    def _current_uri(self, domain: str) -> str:
        return storage.join(self._domain_uri(domain), "CURRENT")

    def source_uri(self, file_sha256: str) -> str:
        """Where the registry keeps the source model file whose bytes hash to ``file_sha256``."""
        if not isinstance(file_sha256, str) or not _SHA256.match(file_sha256):
            raise ValueError(f"a source model is named by 64 lowercase hex digits of SHA-256, got {file_sha256!r}")
        return storage.join(self.uri, f"{SOURCES}/{file_sha256}.safetensors")

    # --- reading ---

    def _version_numbers(self, domain: str) -> list[int]:
        try:
            keys = [o.key for o in storage.iter_objects(storage.join(self._domain_uri(domain), "versions"),
                                                        recursive=False)]
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_VERSION_KEY.match, keys) if m)

    def get(self, domain: str, version: int) -> Entry:
        """Version ``version`` of ``domain`` (EntryNotFoundError if there is none)."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"a version is an integer from 1, got {version!r}")
        try:
            data = storage.read_bytes(self._version_uri(domain, version))
        except FileNotFoundError:
            known = self._version_numbers(domain)
            raise EntryNotFoundError(
                f"no version {version} of domain {domain!r} in {self.uri} "
                f"(versions: {', '.join(f'v{n}' for n in known) or 'none'})") from None
        doc = json.loads(data)
        validate(doc, "registry-entry")
        if doc["domain"] != domain or doc["version"] != version:
            raise RegistryError(f"{self._version_uri(domain, version)} holds {doc['domain']!r} "
                                f"v{doc['version']}: the registry was edited by hand")
        return self._entry(doc)

    def _entry(self, doc: dict[str, Any]) -> Entry:
        centroid = doc["centroid"]
        return Entry(registry=self.uri, domain=doc["domain"], version=doc["version"],
                     model_uri=storage.join(self._domain_uri(doc["domain"]), doc["model"]["uri"]),
                     promoted=doc["promoted"], doc=doc,
                     centroid=None if centroid is None else np.asarray(centroid, dtype=np.float32))

    def versions(self, domain: str) -> list[Entry]:
        """Every version of ``domain``, oldest first."""
        return [self.get(domain, n) for n in self._version_numbers(domain)]

    def _pointer(self, domain: str) -> tuple[dict[str, Any], str] | None:
        uri = self._current_uri(domain)
        try:
            data, etag = storage.read_bytes_with_etag(uri)
        except FileNotFoundError:
            return None
        pointer = json.loads(data)
        version = pointer.get("version") if isinstance(pointer, dict) else None
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RegistryError(f"{uri} is damaged: {data[:200]!r}")
        return pointer, etag

    def current(self, domain: str) -> Entry | None:
        """The current version of ``domain``, or None if none has been made current."""
        state = self._pointer(domain)
        return None if state is None else self.get(domain, state[0]["version"])

    def domains(self) -> list[str]:
        """Domains with at least one version, sorted."""
        try:
            keys = [o.key for o in storage.iter_objects(self.uri)]
        except FileNotFoundError:
            return []
        found = set()
        for key in keys:
            parts = key.split("/")
            if len(parts) == 3 and parts[1] == "versions" and _VERSION_KEY.match(parts[2]):
                try:
                    found.add(validate_domain(parts[0]))
                except InvalidDomainError:
                    continue
        return sorted(found)

    def centroids(self) -> dict[str, tuple[Entry, np.ndarray]]:
        """Each domain's current entry and its centroid, for domains whose current entry has one."""
        out = {}
        for domain in self.domains():
            entry = self.current(domain)
            if entry is not None and entry.centroid is not None:
                out[domain] = (entry, entry.centroid)
        return out

    def resolve(self, ref: str) -> Entry:
        """The entry ``REGISTRY/DOMAIN`` (current) or ``REGISTRY/DOMAIN/vN`` names."""
        full = storage.absolute(ref).rstrip("/")
        if not full.startswith(self.uri + "/"):
            raise ValueError(f"{ref!r} is not in the registry {self.uri}")
        parts = full[len(self.uri) + 1:].split("/")
        if len(parts) == 2 and _VERSION_REF.match(parts[1]):
            return self.get(parts[0], int(parts[1][1:]))
        if len(parts) != 1:
            raise ValueError(f"{ref!r}: expected {self.uri}/DOMAIN or {self.uri}/DOMAIN/vN")
        entry = self.current(parts[0])
        if entry is None:
            known = self._version_numbers(parts[0])
            if not known:
                raise EntryNotFoundError(f"no domain {parts[0]!r} in {self.uri} (domains: "
                                         f"{', '.join(self.domains()) or 'none'})")
            raise EntryNotFoundError(
                f"domain {parts[0]!r} has no current version (v{known[-1]} is the latest, none was "
                f"promoted); name one explicitly, e.g. {self.uri}/{parts[0]}/v{known[-1]}")
        return entry

    # --- writing ---

    def publish(self, domain: str, model_bytes: bytes, entry: dict[str, Any],
                centroid: np.ndarray | None = None, promote: bool = False,
                sources: Sequence[bytes] = ()) -> Entry:
        """Store a model and its entry as the next version of ``domain``; make it current if
        ``promote`` (and no newer version is current already).

        ``entry`` holds the lineage (model id and kind, source_model, clip_encoder, exemplars,
        settings, scores, seconds, code_revision, reason); the registry fills in schema, domain,
        version, created, promoted, model uri and file_sha256 (refusing a differing value for
        any of them) and the centroid from its argument. ``sources`` are the file of the source
        model and of each parent it is a delta on, nearest first: each is kept under ``_sources/``
        and the first one's hash becomes ``source_model.file_sha256``. Everything is checked
        (ConfigError if the result does not match the schema, ValueError for credentials or NaN)
        before anything is written. Returns the entry as written; it may not be current (see
        ``promoted``).
        """
        doc = self._document(domain, model_bytes, entry, centroid, promote, sources)
        self._require_conditional_store()
        self._mark()
        # The sources first: a published entry never names a copy that is not there yet.
        for data in sources:
            _put_object(self.source_uri(hashlib.sha256(data).hexdigest()), data)
        _put_object(storage.join(self._domain_uri(domain), doc["model"]["uri"]), model_bytes)
        version = max(self._version_numbers(domain), default=0) + 1
        for _ in range(MAX_ATTEMPTS):
            doc["version"] = version
            if storage.write_bytes_if_absent(self._version_uri(domain, version), _dumps(doc)):
                break
            # Another writer took this version: go past everything published since.
            taken, version = version, max(version, *self._version_numbers(domain)) + 1
            log.info("%s v%d was taken by another writer; trying v%d", domain, taken, version)
        else:
            raise RegistryConflictError(f"lost {MAX_ATTEMPTS} races for a version of {domain!r}")
        if promote and not self._move_current(domain, version, forward_only=True):
            log.warning("%s/%s v%d passed the gate, but a newer version is already current",
                        self.uri, domain, version)
        return self._entry(doc)

    def set_current(self, domain: str, version: int) -> Entry:
        """Make an existing version current (rollback or manual promotion)."""
        entry = self.get(domain, version)
        self._require_conditional_store()
        self._move_current(domain, version, forward_only=False)
        return entry

    def _require_conditional_store(self) -> None:
        """Once per instance, before its first write: versions are immutable only if the store says no."""
        if self._probed:
            return
        problem = storage.probe_conditional_writes(self.uri)
        if problem is not None:
            raise storage.ConditionalWritesIgnoredError(
                f"{self.uri} does not honour conditional writes ({problem}), so published versions could be "
                "overwritten and updates of CURRENT lost; publish to a store that does (AWS S3, a local folder)")
        self._probed = True

    def _mark(self) -> None:
        if self._marked:
            return
        if not storage.write_bytes_if_absent(storage.join(self.uri, MARKER), _MARKER_BYTES):
            raise RegistryError(f"{self.uri}/{MARKER} exists with other content: not a clipsr "
                                "registry of this layout (clipsr/registry/v1)")
        self._marked = True

    def _document(self, domain: str, model_bytes: bytes, entry: dict[str, Any],
                  centroid: np.ndarray | None, promote: bool, sources: Sequence[bytes]) -> dict[str, Any]:
        validate_domain(domain)
        if not isinstance(entry, dict):
            raise TypeError(f"entry must be a dict, got {type(entry).__name__}")
        sha = hashlib.sha256(model_bytes).hexdigest()
        if "centroid" in entry:
            raise ValueError("pass the centroid as publish(..., centroid=...), not in the entry")
        owned = {"schema": ENTRY_SCHEMA, "domain": domain, "version": 1, "created": utc_now(),
                 "promoted": bool(promote)}
        doc = dict(owned)
        for key, value in copy.deepcopy(entry).items():
            if key not in owned:
                doc[key] = value
            elif value != owned[key]:
                raise ValueError(f"entry[{key!r}] is set by the registry ({owned[key]!r}), got {value!r}")
        doc["centroid"] = _centroid_list(centroid)  # last: 512 numbers would bury the lineage
        model = doc.get("model")
        if not isinstance(model, dict):
            raise ValueError("entry['model'] must be an object with the model's id and kind")
        for key, value in (("uri", f"objects/{sha}.safetensors"), ("file_sha256", sha)):
            if key in model and model[key] != value:
                raise ValueError(f"entry['model'][{key!r}] is {model[key]!r}, but the model bytes give {value!r}")
            model[key] = value
        source = doc.get("source_model")
        if sources and isinstance(source, dict):
            value = hashlib.sha256(sources[0]).hexdigest()
            if source.setdefault("file_sha256", value) != value:
                raise ValueError(f"entry['source_model']['file_sha256'] is {source['file_sha256']!r}, but "
                                 f"the source bytes give {value!r}")
        _check_no_secrets(doc)
        validate(doc, "registry-entry")
        _dumps(doc)  # fail before writing anything if it is not valid JSON (NaN, ...)
        return doc

    def _move_current(self, domain: str, version: int, forward_only: bool) -> bool:
        """Point CURRENT at ``version`` by compare-and-swap; False if ``forward_only`` and a newer
        version is current."""
        uri = self._current_uri(domain)
        for _ in range(MAX_ATTEMPTS):
            state = self._pointer(domain)
            previous = None if state is None else state[0]["version"]
            if previous == version:
                return True
            if forward_only and previous is not None and previous > version:
                return False
            data = _dumps({"version": version, "updated": utc_now(), "previous": previous})
            if state is None:
                if storage.write_bytes_if_absent(uri, data):
                    return True
            elif storage.write_bytes_if_match(uri, data, state[1]):
                return True
        raise RegistryConflictError(f"lost {MAX_ATTEMPTS} races to move {uri}")


def _put_object(uri: str, data: bytes) -> None:
    """Store content-addressed bytes under ``uri``, unless they are there already."""
    if not storage.exists(uri) and not storage.write_bytes_if_absent(uri, data):
        raise RegistryError(f"{uri} holds other bytes than its name says: the registry is damaged")


def _centroid_list(centroid: np.ndarray | None) -> list[float] | None:
    if centroid is None:
        return None
    arr = np.asarray(centroid, dtype=np.float32)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"a centroid is a non-empty 1-D vector of finite numbers, got shape {arr.shape}")
    return [float(x) for x in arr]


def _dumps(doc: dict[str, Any]) -> bytes:
    try:
        return json.dumps(doc, allow_nan=False).encode() + b"\n"
    except ValueError as e:
        raise ValueError(f"registry entry is not valid JSON ({e}): a score or setting is NaN or infinite?") from None


def _check_no_secrets(value: Any, where: str = "entry") -> None:
    """Refuse credentials: URIs with a password or a signature, keys named like secrets."""
    if isinstance(value, dict):
        for key, item in value.items():
            if _SECRET_KEY.search(str(key)):
                raise ValueError(f"{where}/{key} looks like a credential; keep secrets out of registry entries")
            _check_no_secrets(item, f"{where}/{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_no_secrets(item, f"{where}/{i}")
    elif isinstance(value, str) and (_USERINFO.search(value) or _SIGNED_QUERY.search(value)):
        raise ValueError(f"{where} holds a URI with credentials or a signature; keep secrets out of "
                         "registry entries")


def is_registry(uri: str) -> bool:
    """Whether ``uri`` is the root of a registry (it holds the marker)."""
    return storage.exists(storage.join(uri.rstrip("/"), MARKER))


def resolve_ref(uri: str) -> Entry | None:
    """The entry a reference ``REGISTRY/DOMAIN[/vN]`` names, or None if ``uri`` is not one (so a
    caller can fall back to treating it as a checkpoint file).

    Raises EntryNotFoundError for a reference into a registry that lacks that domain or version;
    a file that happens to lie at a registry's top level is not a reference (None).
    """
    text = uri.rstrip("/")
    scheme, sep, path = text.rpartition("://")
    parts = path.split("/")
    versioned = bool(parts) and _VERSION_REF.match(parts[-1]) is not None
    if versioned:
        parts = parts[:-1]
    if len(parts) < 2 or not _DOMAIN.match(parts[-1]) or _VERSION_LIKE.match(parts[-1]):
        return None
    root = f"{scheme}{sep}{'/'.join(parts[:-1])}"
    if not root.rstrip("/") or root.endswith("://") or not is_registry(root):
        return None
    registry = Registry(root)
    if not versioned and not registry._version_numbers(parts[-1]) and storage.exists(text):
        return None
    return registry.resolve(text)
