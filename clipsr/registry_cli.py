"""``clipsr registry``: look at a model registry and move a domain's current version (rollback).

Kept apart from :mod:`clipsr.cli` because it needs neither Ray nor torch: an operator can run it
from any machine that can read the registry.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from clipsr import storage
from clipsr.registry import EntryNotFoundError, Registry, is_registry, resolve_ref


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help="list a model registry's domains and versions; roll a domain back",
                       description="Read a registry written by `clipsr adapt --out`, or move a domain's "
                                   "CURRENT pointer to another existing version.")
    cmds = p.add_subparsers(dest="registry_command", required=True)
    q = cmds.add_parser("list", help="one line per domain (REGISTRY) or per version (REGISTRY/DOMAIN)")
    q.add_argument("ref", metavar="REGISTRY[/DOMAIN]")
    q.set_defaults(func=_run_list)
    q = cmds.add_parser("show", help="print a version's entry (lineage, settings, scores) as JSON")
    q.add_argument("ref", metavar="REGISTRY/DOMAIN[/vN]")
    q.set_defaults(func=_run_show)
    q = cmds.add_parser("routing", help="leave-one-out routing confusion of the current domains (--route auto)")
    q.add_argument("ref", metavar="REGISTRY")
    q.add_argument("--json", action="store_true", help="print the confusion as JSON")
    q.set_defaults(func=_run_routing)
    q = cmds.add_parser("set-current", help="make REGISTRY/DOMAIN/vN current (rollback or manual promotion)")
    q.add_argument("ref", metavar="REGISTRY/DOMAIN/vN")
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
    print(json.dumps(entry.doc, indent=2, sort_keys=True))
    return 0


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
