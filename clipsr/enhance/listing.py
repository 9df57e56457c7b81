"""What a listed key is (an input to enhance, a file to leave alone, an image of a format not
decoded, a key never to touch or an object too large to read) and where its output goes. Pure
functions: the rules the manifest's failed, skipped and unsupported rows come from.
"""
from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from clipsr import storage
from clipsr.enhance.layout import RESERVED
from clipsr.imaging import (
    ENCODE_FORMATS,
    EXTENSION_BY_FORMAT,
    format_for_path,
    normalise_format,
    output_format_for,
    unsupported_reason,
)

Kind = Literal["candidate", "unsafe", "ignored", "unsupported", "reserved", "too_large"]
#: The manifest status of each kind's row (a candidate's comes from the pipeline).
STATUS_BY_KIND: dict[str, str] = {"unsafe": "failed", "reserved": "failed", "too_large": "failed",
                                  "ignored": "skipped", "unsupported": "unsupported"}


@dataclass(frozen=True)
class KeyDecision:
    kind: Kind  # candidate: an image to enhance; the others: a row of status STATUS_BY_KIND[kind]
    output_key: str | None  # for candidates: the key below the output prefix
    reason: str | None  # for the other kinds: the manifest's error text


def output_key(key: str, fmt: str | None = None) -> str:
    """The input's relative key, unchanged; with ``fmt``, or for an input in a format that is not
    written (GIF, JPEG 2000, HEIF...: PNG), its extension replaced (``a/b.JPG`` -> ``a/b.png``).
    The key must already be safe."""
    if fmt is None:
        source = format_for_path(key)
        if source in ENCODE_FORMATS:
            return key
        fmt = output_format_for(source)
    folder, name = posixpath.split(key)
    stem = posixpath.splitext(name)[0]
    return posixpath.join(folder, stem + EXTENSION_BY_FORMAT[normalise_format(fmt)])


def output_format(key: str, fmt: str | None = None) -> str:
    """The format an output is written in: ``fmt`` if given, else the input's own where it is
    written, else PNG."""
    return normalise_format(fmt) if fmt is not None else output_format_for(format_for_path(key))


def classify_key(key: str, fmt: str | None = None, size: int | None = None,
                 max_bytes: int | None = None) -> KeyDecision:
    """Decide from the listing alone (the key and its size), before anything is read.

    Order matters: an unsafe key is never inspected further (it could name another object than
    the one listed); hidden files and other extensions are left alone (sidecars, .DS_Store), but an
    image file of a format not decoded here is unsupported, counted, not left alone; an output key
    inside the job's own state (_index/, _manifests/...) is refused; so is an object over
    ``max_bytes``, which a worker would otherwise have to hold whole.
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
    unsupported = unsupported_reason(key)
    if unsupported is not None:
        return KeyDecision("unsupported", None, unsupported)
    if not storage.is_image_key(key):
        ext = posixpath.splitext(key)[1] or "no extension"
        return KeyDecision("ignored", None, f"not an image file name ({ext}): not an input")
    out = output_key(key, fmt)
    if out.split("/", 1)[0] in RESERVED:
        return KeyDecision("reserved", None,
                           f"output key {out!r} would land in the job's own state ({', '.join(RESERVED)})")
    if size is not None and max_bytes is not None and size > max_bytes:
        return KeyDecision("too_large", None, f"input too large: {size:,} bytes listed, more than "
                                              f"--max-input-bytes={max_bytes:,}; not read")
    return KeyDecision("candidate", out, None)


@dataclass(frozen=True)
class InputSource:
    """What ``--input`` names: a folder or prefix (``file`` None), or one file (``file``: its listing
    entry, key = its name), whose parent is then the prefix outputs are keyed against."""
    prefix: str
    file: storage.ObjectInfo | None = None


def resolve_input(uri: str) -> InputSource:
    """A file, a folder, or an object-store prefix with at least one object below it (an empty
    prefix cannot be told from a mistyped one); anything else is refused here, before the run
    writes anything."""
    uri = storage.absolute(uri)
    single = storage.file_info(uri)
    if single is not None:
        return InputSource(prefix=posixpath.dirname(uri), file=single)
    if storage.is_local(uri):
        found = os.path.isdir(uri)  # an empty folder is a run with nothing to do
    else:
        try:
            found = next(iter(storage.iter_objects(uri)), None) is not None
        except FileNotFoundError:
            found = False
    if not found:
        raise FileNotFoundError(f"--input {uri}: no such file, and no files below it; give an image file, "
                                "a folder or an s3:// prefix that holds the images")
    return InputSource(prefix=uri)


def refuse_file(uri: str | None, flag: str) -> None:
    """``--output`` and ``--manifest`` are folders or prefixes: a file there is refused by name."""
    if uri is not None and storage.file_info(storage.absolute(uri)) is not None:
        raise ValueError(f"{flag} {uri} is a file; give a folder (created if missing) or an s3:// prefix")


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
