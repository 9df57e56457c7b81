"""Image embeddings for training, computed once per (image set, encoder, scale) in a Ray Data pass.

What is embedded is each training image's LR, degraded whole with the evaluation protocol's
bicubic at the model's scale: inference has only the LR input to embed, so the model must learn
from the same vectors it will be given. Embedding is the expensive part of CLIP conditioning
(~0.35 s per image for ViT-B-32 on CPU), so it runs once, over whole images, and is cached as
Parquet under the run's storage (one table per encoder and scale); workers read the table instead
of embedding patches at every step. The same pass assigns k-means pseudo-domains.
"""
from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipsr import imaging, storage
from clipsr.degrade import make_lr, modcrop
from clipsr.train.data import list_training_images
from clipsr.train.episodes import kmeans

log = logging.getLogger(__name__)


def needs_embeddings(s: dict[str, Any]) -> bool:
    return s["clip"]["arch"] is not None or (s["episodes"]["enabled"] and s["episodes"]["domains"] == "kmeans")


def encoder_spec(s: dict[str, Any]) -> dict[str, Any]:
    """The conditioning encoder, or the colour-statistics stand-in when only clusters are needed."""
    if s["clip"]["arch"] is not None:
        return dict(s["clip"])
    return {"arch": "color-stats", "weights": None, "seed": s["seed"]}


def table_uri(s: dict[str, Any], encoder_sha: str) -> str:
    name = f"embeddings/{encoder_sha[:16]}-x{s['model']['scale']}.parquet"
    return storage.join(storage.join(s["storage_path"], s["name"]), name)


def lr_view(image: np.ndarray, scale: int) -> np.ndarray:
    """What inference would be given for this HR image: its RGB, modcropped, degraded whole (uint8)."""
    return make_lr(modcrop(imaging.to_rgb(image), scale), scale)


class Embedder:
    """Ray Data stage: bytes of each listed image -> the embedding of its LR (encoder loaded once per actor)."""

    def __init__(self, spec: dict[str, Any], max_pixels: int, scale: int) -> None:
        from clipsr.clip import load_image_encoder

        self.encoder = load_image_encoder(spec["arch"], spec["weights"], seed=spec["seed"])
        self.max_pixels, self.scale = max_pixels, scale

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        uris = [str(u) for u in batch["uri"]]
        imgs = [lr_view(imaging.load_rgb_or_grey_uint8(storage.read_bytes(u), self.max_pixels), self.scale)
                for u in uris]
        return {"uri": uris, "embedding": list(self.encoder.embed_images(imgs))}


def prepare_embeddings(s: dict[str, Any]) -> str | None:
    """Compute (or reuse) the embedding table for the run's training images; returns its URI."""
    if not needs_embeddings(s):
        return None
    import ray

    from clipsr.clip import load_image_encoder

    spec = encoder_spec(s)
    sha = load_image_encoder(spec["arch"], spec["weights"], seed=spec["seed"]).identity.sha256
    uri = table_uri(s, sha)
    uris = [u for u, _ in list_training_images(s["data"]["train"])]
    if storage.exists(uri):
        cached = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        if set(cached.column("uri").to_pylist()) >= set(uris):
            log.info("reusing embeddings %s", uri)
            return uri
    log.info("embedding the x%d LR of %d training images with %s", s["model"]["scale"], len(uris), spec["arch"])
    ds = ray.data.from_items([{"uri": u} for u in uris]).map_batches(
        Embedder,
        fn_constructor_kwargs={"spec": spec, "max_pixels": s["data"]["max_pixels"], "scale": s["model"]["scale"]},
        batch_size=16,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    )
    rows = ds.take_all()
    emb = np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in rows])
    clusters = kmeans(emb, s["episodes"]["k"], seed=s["seed"])
    table = pa.table({
        "uri": [r["uri"] for r in rows],
        "embedding": pa.array(list(emb), type=pa.list_(pa.float32())),
        "cluster": pa.array(clusters.astype(np.int32)),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())
    return uri


def read_embeddings(
    s: dict[str, Any], uris: list[str]
) -> tuple[dict[str, np.ndarray] | None, dict[str, int] | None, Any]:
    """(embedding per uri, k-means cluster per uri or None, conditioning encoder or None) for a worker."""
    if not needs_embeddings(s):
        return None, None, None
    from clipsr.clip import load_image_encoder

    spec = encoder_spec(s)
    enc = load_image_encoder(spec["arch"], spec["weights"], seed=spec["seed"])
    table = pq.read_table(io.BytesIO(storage.read_bytes(table_uri(s, enc.identity.sha256)))).to_pydict()
    emb = {u: np.asarray(e, dtype=np.float32) for u, e in zip(table["uri"], table["embedding"])}
    missing = [u for u in uris if u not in emb]
    if missing:
        raise RuntimeError(f"{len(missing)} training images have no cached embedding (e.g. {missing[0]})")
    labels = dict(zip(table["uri"], table["cluster"])) if s["episodes"]["domains"] == "kmeans" else None
    return emb, labels, enc if s["clip"]["arch"] is not None else None
