"""``clipsr registry``: look at a model registry and move a domain's current version (rollback).

It imports neither Ray nor torch: an operator can run it from any machine that can read the registry.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from clipsr import storage
from clipsr.registry import EntryNotFoundError, Registry, is_registry, resolve_ref


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help="list a model registry's domains and versions; roll a domain back",
                       description="Read a registry written by `clipsr adapt --out`, or move a domain's "
                                   "CURRENT pointer to another existing version.")
    cmds = p.add_subparsers(dest="registry_command", required=True)
    q = cmds.add_parser("list", help="one line per domain (REGISTRY) or per version (REGISTRY/DOMAIN)")
    q.add_argument("ref", metavar="REGISTRY[/DOMAIN]", help="a registry, or one of its domains")
    q.set_defaults(func=_run_list)
    q = cmds.add_parser("show", help="print a version's lineage, scores and settings (--json: the whole entry)")
    q.add_argument("ref", metavar="REGISTRY/DOMAIN[/vN]",
                   help="a domain (its current version) or one version of it, e.g. s3://models/registry/manga/v2")
    q.add_argument("--json", action="store_true",
                   help="print the whole entry as JSON, the centroid's numbers included")
    q.set_defaults(func=_run_show)
    q = cmds.add_parser("routing", help="leave-one-out routing confusion of the current domains (--route auto)")
    q.add_argument("ref", metavar="REGISTRY", help="a registry written by clipsr adapt")
    q.add_argument("--json", action="store_true", help="print the confusion as JSON")
    q.set_defaults(func=_run_routing)
    q = cmds.add_parser("set-current", help="make REGISTRY/DOMAIN/vN current (rollback or manual promotion)")
    q.add_argument("ref", metavar="REGISTRY/DOMAIN/vN", help="the version to make current")
    q.set_defaults(func=_run_set_current)


def _split(ref: str) -> tuple[Registry, str | None]:
    """A registry root, or a registry and one of its domains."""
    text = ref.rstrip("/")
    registry_root, _, last = text.rpartition("/")
    if registry_root and is_registry(registry_root):
        return Registry(registry_root), last
    if is_registry(text):
        return Registry(text), None
    raise ValueError(f"{ref!r} is neither a registry (no _registry.json) nor REGISTRY/DOMAIN")


def _row(entry: Any, current: int | None) -> str:
    scores = entry.doc["scores"]
    mark = "*" if entry.version == current else " "
    return (f"{mark} {entry.domain:<20}v{entry.version:<5}{entry.doc['created']:<22}"
            f"{scores.get('gain_db', float('nan')):>+9.3f}  {'yes' if entry.promoted else 'no':<9}"
            f"{entry.doc['model']['id']}")


HEADER = f"  {'domain':<20}{'ver':<6}{'created':<22}{'gain dB':>9}  {'promoted':<9}model"


def _run_list(args: argparse.Namespace) -> int:
    registry, domain = _split(args.ref)
    lines = [HEADER]
    if domain is None:
        for name in registry.domains():
            current = registry.current(name)
            latest = registry.versions(name)[-1]
            shown = current or latest
            lines.append(_row(shown, current.version if current else None)
                         + ("" if shown.version == latest.version else f"  (latest v{latest.version})"))
    else:
        entries = registry.versions(domain)
        if not entries:
            raise EntryNotFoundError(f"no domain {domain!r} in {registry.uri}")
        current = registry.current(domain)
        lines += [_row(e, current.version if current else None) for e in entries]
    print("\n".join(lines))
    print(f"{registry.uri}: * marks the current version (what `enhance --domain` and routing use)")
    return 0


def _run_show(args: argparse.Namespace) -> int:
    entry = resolve_ref(args.ref)
    if entry is None:
        raise ValueError(f"{args.ref!r} is not a registry reference REGISTRY/DOMAIN[/vN]")
    if args.json:
        print(json.dumps(entry.doc, indent=2, sort_keys=True))
    else:
        current = Registry(entry.registry).current(entry.domain)
        print("\n".join(show_lines(entry, current.version if current else None)))
    return 0


#: Entry keys that show_lines prints in their own place; any other key follows, summarised.
_SHOWN = {"schema", "domain", "version", "created", "promoted", "reason", "seconds", "code_revision", "model",
          "source_model", "scores", "settings", "exemplars", "clip_encoder", "centroid", "centroid_encoder"}


def show_lines(entry: Any, current: int | None) -> list[str]:
    """A version for a person: what it is and where it came from, its scores and settings, then
    the centroid summed up (the 512 numbers are for --json)."""
    doc = entry.doc
    if entry.version == current:
        state = "current"
    else:
        state = f"not current (current: v{current})" if current else "not current (the domain has none)"
    lines = [f"{entry.ref}: {state}; promoted when published: {'yes' if entry.promoted else 'no'}"]
    if doc.get("reason"):
        lines.append(f"  reason        {doc['reason']}")
    took = f", took {doc['seconds']:.0f} s" if isinstance(doc.get("seconds"), (int, float)) else ""
    lines.append(f"  created       {doc.get('created')}{took}, code revision {doc.get('code_revision')}")
    model = doc.get("model") or {}
    lines.append(f"  model         {model.get('id')} ({model.get('kind', 'model')}), file {model.get('uri')}")
    source = doc.get("source_model") or {}
    lines.append(f"  source model  {_summary(source)}")
    lines.append(f"  scores        {_summary(doc.get('scores') or {})}")
    lines.append(f"  settings      {_summary(doc.get('settings') or {})}")
    shots = [str(shot.get("uri")) for shot in doc.get("exemplars") or []]
    span = " ... ".join(dict.fromkeys([shots[0], shots[-1]])) if shots else ""
    lines.append(f"  exemplars     {len(shots)}" + (f": {span}" if span else ""))
    lines.append(f"  CLIP encoder  {_encoder(doc.get('clip_encoder'))}")
    lines.append(f"  centroid      {_centroid(entry.centroid, doc.get('centroid_encoder'))}")
    for key in sorted(set(doc) - _SHOWN):
        lines.append(f"  {key:<13} {_value(doc[key])}")
    return lines


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return f"[{len(value)} values]"
    if isinstance(value, dict):
        return "{" + _summary(value) + "}"
    return str(value)


def _summary(doc: dict[str, Any]) -> str:
    """``key value`` pairs on one line; lists counted, hashes shortened."""
    parts = []
    for key, value in sorted(doc.items()):
        text = _value(value)
        if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
            text = value[:12] + "..."
        parts.append(f"{key} {text}")
    return ", ".join(parts) or "-"


def _encoder(identity: dict[str, Any] | None) -> str:
    if not identity:
        return "none"
    details = [f"weights {identity['weights']}"] if identity.get("weights") else []
    if identity.get("sha256"):
        details.append(f"sha256 {str(identity['sha256'])[:12]}...")
    return str(identity.get("arch")) + (f" ({', '.join(details)})" if details else "")


def _centroid(centroid: Any, encoder: dict[str, Any] | None) -> str:
    if centroid is None:
        return "none (this version is not routed to by --route auto)"
    norm = float(np.linalg.norm(centroid))
    return (f"{len(centroid)} numbers, norm {norm:.3f}, encoder {_encoder(encoder)} "
            "(--json prints them)")


def _run_routing(args: argparse.Namespace) -> int:
    from clipsr.adapt.routing_fit import registry_confusion
    from clipsr.domain_routing import format_confusion

    registry, domain = _split(args.ref)
    if domain is not None:
        raise ValueError(f"expected a registry, got {args.ref!r}: the confusion is over all its current domains")
    conf = registry_confusion(registry.uri)
    if conf is None:
        raise EntryNotFoundError(f"no current domain in {registry.uri} has routing data")
    print(json.dumps(conf, indent=2) if args.json else format_confusion(conf))
    return 0


def _run_set_current(args: argparse.Namespace) -> int:
    entry = resolve_ref(args.ref)
    if entry is None or entry.ref != storage.absolute(args.ref).rstrip("/"):  # not REGISTRY/DOMAIN/vN
        raise ValueError(f"expected REGISTRY/DOMAIN/vN, got {args.ref!r}")
    registry = Registry(entry.registry)
    before = registry.current(entry.domain)
    registry.set_current(entry.domain, entry.version)
    print(f"{entry.registry}/{entry.domain}: current v{before.version if before else '-'} -> v{entry.version} "
          f"({entry.doc['model']['id']})")
    return 0
