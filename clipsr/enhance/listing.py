"""What a listed key is (an input to enhance, a file to leave alone, a key never to touch) and
where its output goes. Pure functions: the rules the manifest's failed and skipped rows come from.
"""
from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from clipsr import storage
from clipsr.enhance.layout import RESERVED
from clipsr.imaging import EXTENSION_BY_FORMAT, format_for_path, normalise_format

Kind = Literal["candidate", "unsafe", "ignored", "reserved"]


@dataclass(frozen=True)
class KeyDecision:
    kind: Kind  # candidate: an image to enhance; unsafe/reserved: failed row; ignored: skipped row
    output_key: str | None  # for candidates: the key below the output prefix
    reason: str | None  # for the other kinds: the manifest's error text


def output_key(key: str, fmt: str | None = None) -> str:
    """The input's relative key, unchanged; with ``fmt`` its extension replaced (``a/b.JPG`` ->
    ``a/b.png``). The key must already be safe."""
    if fmt is None:
        return key
    folder, name = posixpath.split(key)
    stem = posixpath.splitext(name)[0]
    return posixpath.join(folder, stem + EXTENSION_BY_FORMAT[normalise_format(fmt)])


def output_format(key: str, fmt: str | None = None) -> str:
    """The format an output is written in: ``fmt`` if given, else the one its extension names."""
    return normalise_format(fmt) if fmt is not None else format_for_path(key)


def classify_key(key: str, fmt: str | None = None) -> KeyDecision:
    """Decide from the key alone, before anything is read.

    Order matters: an unsafe key is never inspected further (it could name another object than
    the one listed); hidden files and other extensions are left alone (sidecars, .DS_Store);
    an output key inside the job's own state (_index/, _manifests/...) is refused.
    """
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return KeyDecision("unsafe", None, f"unsafe key: not valid UTF-8: {key!r}")
    try:
        storage.safe_relative_key(key)
    except storage.UnsafeKeyError as e:
        return KeyDecision("unsafe", None, f"unsafe key, not read: {e}")
    if any(segment.startswith(".") for segment in key.split("/")):
        return KeyDecision("ignored", None, "hidden file (a name starting with '.'): not an input")
    if not storage.is_image_key(key):
        ext = posixpath.splitext(key)[1] or "no extension"
        return KeyDecision("ignored", None, f"not an image file name ({ext}): not an input")
    out = output_key(key, fmt)
    if out.split("/", 1)[0] in RESERVED:
        return KeyDecision("reserved", None,
                           f"output key {out!r} would land in the job's own state ({', '.join(RESERVED)})")
    return KeyDecision("candidate", out, None)


def iter_inputs(input_uri: str, excluded_prefixes: list[str], limit: int | None = None
                ) -> Iterator[storage.ObjectInfo]:
    """Stream the listing of the input prefix, leaving out the job's own outputs when they lie
    inside it; stop after ``limit`` keys (listing order: byte order on S3, folder order locally)."""
    count = 0
    for info in storage.iter_objects(input_uri):
        if any(info.key.startswith(prefix) for prefix in excluded_prefixes):
            continue
        if limit is not None and count >= limit:
            return
        count += 1
        yield info
