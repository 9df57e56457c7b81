"""Building and loading models by name, tag or path: the one place that resolves a model spec.

Architecture configs are data (``clipsr/model_configs/cdasr-*.json``). A model *spec*, as the
command line takes it, is one of:

- ``bicubic``: MATLAB-compatible bicubic interpolation (no parameters);
- ``default`` / ``default-x4`` / ``default-x2``: the weights bundled with the package;
- a checkpoint path or URI (local, ``file://``, ``s3://``...).
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from clipsr import storage
from clipsr.inference import BicubicUpscaler, NetworkUpscaler, Upscaler
from clipsr.models import CDASR
from clipsr.config import validate
from clipsr.models.checkpoint import CheckpointError, from_bytes, to_bytes
from clipsr.provenance import code_revision, utc_now

CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"
BUNDLED = {"default": "default-x4", "default-x4": "default-x4", "default-x2": "default-x2"}


@lru_cache(maxsize=None)
def _configs() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(CONFIG_DIR.glob("cdasr-*.json")):
        cfg = json.loads(path.read_text())
        cfg.pop("description", None)
        out[path.stem] = cfg
    return out


def list_models() -> list[str]:
    """Names of the architecture configs shipped with the package."""
    return sorted(_configs())


def get_model_config(name: str) -> dict[str, Any]:
    try:
        return copy.deepcopy(_configs()[name])
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {list_models()}") from None


def create_model(arch: str, scale: int) -> CDASR:
    """A freshly initialised network of a named architecture at ``scale``."""
    return CDASR(scale=scale, **get_model_config(arch))


def checkpoint_uri(spec: str) -> str:
    """Where a model spec's checkpoint lives (bundled names resolve inside the package)."""
    if spec in BUNDLED:
        path = WEIGHTS_DIR / f"{BUNDLED[spec]}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"the bundled model {spec!r} is not installed ({path} is missing)")
        return str(path)
    return spec


def load_checkpoint(spec: str) -> tuple[CDASR, dict[str, Any]]:
    uri = checkpoint_uri(spec)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"model {spec!r} not found: expected 'bicubic', one of {sorted(BUNDLED)}, "
            "or a checkpoint path/URI"
        ) from None
    model, meta = from_bytes(data)
    meta["source_uri"] = uri
    return model, meta


def save_checkpoint(
    uri: str,
    model: CDASR,
    arch: str,
    clip_encoder: dict[str, Any] | None = None,
    training_data: Any = None,
    parent: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model`` as a checkpoint of architecture ``arch``; returns the metadata written.

    The metadata is validated against ``schemas/checkpoint.schema.json`` before anything is
    written, and the file appears atomically.
    """
    meta = {
        "clip_encoder": clip_encoder,
        "training_data": training_data,
        "parent": parent,
        "metrics": metrics or {},
        "settings": settings or {},
        "code_revision": code_revision(),
        "created": utc_now(),
    }
    data, full = to_bytes(model, arch, get_model_config(arch), meta)
    validate(full, "checkpoint")
    storage.write_bytes_atomic(uri, data)
    return full


def load_encoder_for(meta: dict[str, Any], clip_weights: str | None) -> Any | None:
    """The CLIP encoder a checkpoint was trained with, checked against its recorded identity."""
    recorded = meta.get("clip_encoder")
    if recorded is None:
        if clip_weights is not None:
            raise CheckpointError(
                f"model {meta['id']} was trained without a CLIP encoder (null embedding); "
                "do not pass CLIP weights for it"
            )
        return None
    from clipsr.clip import ClipEncoder, EncoderIdentity

    want = EncoderIdentity.from_dict(recorded)
    random_seed = want.weights.startswith("random:")
    if clip_weights is None and not random_seed:
        raise CheckpointError(
            f"model {meta['id']} needs CLIP encoder {want.arch} with weights {want.weights} "
            f"(sha256 {want.sha256[:12]}); pass them with --clip-weights FILE_OR_URI"
        )
    seed = int(want.weights.split(":", 1)[1]) if random_seed else 0
    encoder = ClipEncoder.load(want.arch, clip_weights, seed=seed)
    if not encoder.identity.matches(want):
        raise CheckpointError(
            f"CLIP encoder mismatch for model {meta['id']}: it was trained with {want.arch} "
            f"sha256 {want.sha256[:12]}, the encoder given is {encoder.identity.arch} "
            f"sha256 {encoder.identity.sha256[:12]}"
        )
    return encoder


def load_upscaler(
    spec: str,
    scale: int | None = None,
    clip_weights: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    tile: int = 256,
) -> Upscaler:
    """Resolve a model spec to a ready upscaler; ``scale`` must agree with the checkpoint's."""
    if spec == "bicubic":
        if scale is None:
            raise ValueError("model 'bicubic' needs a scale")
        return BicubicUpscaler(scale)
    model, meta = load_checkpoint(spec)
    if scale is not None and scale != meta["scale"]:
        raise CheckpointError(f"model {meta['id']} is a x{meta['scale']} model, but x{scale} was asked for")
    encoder = load_encoder_for(meta, clip_weights)
    return NetworkUpscaler(model, meta, encoder=encoder, device=device, precision=precision, tile=tile)
