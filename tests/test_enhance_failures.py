"""Which failures are permanent, checked against the reasons the code really writes."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipsr.enhance import rows as R
from clipsr.enhance.decode import decode_batch
from clipsr.enhance.failures import is_permanent
from clipsr.enhance.listing import classify_key


def _png(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _gif(frames: int) -> bytes:
    buf = io.BytesIO()
    images = [Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)) for i in range(frames)]
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:])
    return buf.getvalue()


def _decode_error(tmp_path, data: bytes, max_output_pixels: int = 64_000_000) -> str:
    """The error the decode stage writes for these bytes."""
    path = tmp_path / "x.png"
    path.write_bytes(data)
    row = {name: None for name in R.WORK.names}
    row.update(input_key="x.png", input_uri=str(path), input_size=len(data), scale=2)
    (out,) = R.from_table(decode_batch(R.to_table([row]), max_output_pixels))
    assert out["status"] == "failed"
    return out["error"]


@pytest.mark.parametrize("data, max_output_pixels", [
    (b"", 64_000_000),  # empty file
    (b"this is not an image", 64_000_000),  # not a supported image
    (_png(10, 12)[:60], 64_000_000),  # truncated
    (_png(40, 40), 1000),  # x2 over --max-output-pixels
    (_gif(frames=3), 64_000_000),  # animated GIF
])
def test_failures_of_the_bytes_themselves_are_permanent(tmp_path, data, max_output_pixels):
    assert is_permanent(_decode_error(tmp_path, data, max_output_pixels))


@pytest.mark.parametrize("key", ["a/../b.png", "/abs.png", "a\x00b.png", "_index/x.png", "_owner.json/x.png"])
def test_failures_of_the_key_are_permanent(key):
    decision = classify_key(key, "webp")
    assert decision.kind in ("unsafe", "reserved") and is_permanent(decision.reason)


def test_an_object_over_the_byte_limit_stays_refused():
    decision = classify_key("huge.png", None, size=10**9, max_bytes=10**6)
    assert decision.kind == "too_large" and is_permanent(decision.reason)


def test_storage_errors_timeouts_lost_workers_and_collisions_are_retried(tmp_path, monkeypatch):
    from clipsr import storage

    row = {name: None for name in R.WORK.names}
    row.update(input_key="gone.png", input_uri=str(tmp_path / "gone.png"), input_size=3, scale=2)
    (gone,) = R.from_table(decode_batch(R.to_table([row]), 64_000_000))
    assert gone["error"].startswith("input not found") and not is_permanent(gone["error"])

    def throttled(uri, *args, **kwargs):
        raise TimeoutError("read timed out")

    monkeypatch.setattr(storage, "read_bytes", throttled)
    monkeypatch.setattr(storage, "read_range", throttled)  # the header is read first
    (slow,) = R.from_table(decode_batch(R.to_table([row]), 64_000_000))
    assert slow["error"].startswith("read/decode failed") and not is_permanent(slow["error"])
    for error in ("inference stopped: over the per-image time limit of 600 s",
                  "inference failed: RayActorError: The actor died unexpectedly",
                  "encode/write failed: OSError: SlowDown",
                  "model output has NaN or infinite values",
                  "output key collision: 'a.webp' is already the output of 'a.jpg', which comes first in sorted order; "
                  "not overwritten",
                  None):
        assert not is_permanent(error)
