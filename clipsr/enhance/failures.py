"""Which failures are permanent: the one place that reads meaning into a failed row's ``error``.

A permanent failure comes from the input's key or bytes alone, so reading the same object again
fails the same way: an unsafe key, an output key inside the job's own state, an empty, corrupt,
truncated or unsupported file, an image over the pixel limit or an object over the byte limit,
an animated GIF, and bytes that crash or exhaust the isolated decoder process. The index remembers such inputs, and
later runs carry their failure forward without reading them while key, size and ETag (mtime) and
scale are unchanged (plan.py); ``--retry-failed`` reads them again.

Everything else is transient and retried the next night: storage errors, timeouts and throttling
(``read/decode failed``, ``encode/write failed``), ``inference stopped`` (the per-image time
limit), ``inference failed`` (a lost worker, out of memory), an input deleted after the listing,
and output key collisions, which depend on the other keys listed.

The patterns follow the reasons written by clipsr.enhance.listing (key rules), clipsr.imaging
(``ImageDecodeError``) and clipsr.enhance.decode (the pixel limit); tests/test_enhance_failures.py
checks each of them against the code that writes it.
"""
from __future__ import annotations

import re

_PERMANENT = re.compile(
    r"unsafe key"  # listing: not UTF-8, '..', absolute, control characters
    r"|output key .* would land in the job's own state"  # listing: a reserved top-level name
    r"|empty file \(0 bytes\)"
    r"|unreadable image header"
    r"|not a supported image"
    r"|image has no pixels"
    r"|truncated or corrupt image"
    r"|unsupported (image )?mode"
    r"|unsupported or corrupt TIFF"
    r"|unsupported TIFF photometric interpretation"
    r"|too many pixels"  # Pillow's own limit
    r"|output too large: x[0-9]+ would exceed --max-output-pixels"
    r"|input too large: "  # --max-input-bytes, from the listing or when read
    r"|animated GIF"
    r"|decoder crashed: "  # the isolated decoder process died on these bytes
    r"|decoder out of memory: "
)


def is_permanent(error: str | None) -> bool:
    """Whether a failed row's reason will recur for as long as the input's key and bytes are the same."""
    return error is not None and _PERMANENT.match(error) is not None
