"""Domain specs: a name and its exemplars, from a YAML/JSON file or the NAME=DIR shorthand."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clipsr import storage
from clipsr.config import parse_document, validate
from clipsr.degradations import Degradation


@dataclass(frozen=True)
class DomainSpec:
    name: str
    exemplars: tuple[str, ...] | None = None  # explicit URIs
    prefix: str | None = None  # or: the first ``take`` images under a prefix, in sorted order
    take: int | None = None
    scale: int | None = None
    notes: str = ""
    # What this domain's archive did to its LR (a Degradation spec), or where to measure it; None:
    # the run's (clipsr adapt --degradation / --degradation-from).
    degradation: str | None = None
    degradation_from: str | None = None

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "DomainSpec":
        if isinstance(doc, dict) and "degradation" in doc and "degradation_from" in doc:
            raise ValueError(f"domain {doc.get('name')}: give degradation or degradation_from, not both")
        validate(doc, "domain-spec")
        ex = doc["exemplars"]
        degradation, source = doc.get("degradation"), doc.get("degradation_from")
        if degradation is not None:
            try:
                degradation = Degradation.parse(degradation).label
            except ValueError as e:
                raise ValueError(f"domain {doc['name']}: {e}") from None
        common = {"name": doc["name"], "scale": doc.get("scale"), "notes": doc.get("notes", ""),
                  "degradation": degradation, "degradation_from": source and storage.absolute(source)}
        if isinstance(ex, list):
            return cls(exemplars=tuple(storage.absolute(u) for u in ex), **common)
        return cls(prefix=storage.absolute(ex["prefix"]), take=ex["take"], **common)

    @classmethod
    def shorthand(cls, text: str, shots: int, scale: int | None) -> "DomainSpec":
        """``NAME=DIR_OR_URI``: the first ``shots`` images of the folder in sorted order."""
        name, sep, uri = text.partition("=")
        if not sep or not name or not uri:
            raise ValueError(f"expected --domain NAME=DIR_OR_URI, got {text!r}")
        return cls.from_dict({"name": name, "exemplars": {"prefix": uri, "take": shots},
                              **({"scale": scale} if scale else {})})

    def exemplar_uris(self) -> list[str]:
        """The exemplars, resolved (listing the prefix when the spec names one)."""
        if self.exemplars is not None:
            return list(self.exemplars)
        assert self.prefix is not None and self.take is not None
        images = storage.list_images(self.prefix)
        if len(images) < self.take:
            raise ValueError(f"domain {self.name}: {self.prefix} has {len(images)} images, {self.take} asked for")
        return images[: self.take]


def load_specs(uri: str) -> list[DomainSpec]:
    """A file with one spec or a list of them (``domains: [...]`` or a bare list)."""
    doc = parse_document(storage.read_bytes(uri))
    if isinstance(doc, dict) and "domains" in doc:
        doc = doc["domains"]
    docs = doc if isinstance(doc, list) else [doc]
    return [DomainSpec.from_dict(d) for d in docs]
