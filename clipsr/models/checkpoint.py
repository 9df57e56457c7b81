"""The checkpoint format: safetensors weights with JSON metadata in the header.

safetensors cannot execute code on load (unlike pickle), and its header carries a string map, in
which we keep one JSON document under the key ``clipsr``: architecture, scale, CLIP encoder
identity, training data, parent model, code revision, metrics. The model id is derived from the
weights' content hash, so two different weights never share an id.

This module works on bytes; reading and writing URIs is :mod:`clipsr.storage`'s job.
"""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from clipsr.models.cdasr import CDASR

FORMAT = "clipsr.checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "clipsr"


class CheckpointError(ValueError):
    """A file that is not a clipsr checkpoint, or one that does not fit what it is loaded into."""


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """Content hash of named tensors, independent of file layout and metadata."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def model_id(arch_name: str, scale: int, sha256: str) -> str:
    return f"{arch_name}-x{scale}-{sha256[:12]}"


def to_bytes(model: CDASR, arch_name: str, arch_config: dict[str, Any], meta: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """Serialise ``model``; returns the bytes and the full metadata written (with id and hash)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    sha = weights_sha256(state)
    full = {
        **meta,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "id": model_id(arch_name, model.scale, sha),
        "weights_sha256": sha,
        "arch": {"name": arch_name, "config": arch_config},
        "scale": model.scale,
    }
    full.setdefault("clip_encoder", None)
    return st_save(state, metadata={METADATA_KEY: json.dumps(full, sort_keys=True)}), full


def read_metadata(data: bytes) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, read from the safetensors header without the weights."""
    if len(data) < 8:
        raise CheckpointError("not a clipsr checkpoint: file is too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointError("not a clipsr checkpoint: bad safetensors header")
    try:
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"not a clipsr checkpoint: no '{METADATA_KEY}' metadata ({e})") from None
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"unsupported checkpoint format {meta.get('format')!r} v{meta.get('format_version')}"
        )
    return meta


def from_bytes(data: bytes) -> tuple[CDASR, dict[str, Any]]:
    """Rebuild the network a checkpoint describes and load its weights (strictly)."""
    meta = read_metadata(data)
    state = st_load(data)
    if weights_sha256(state) != meta["weights_sha256"]:
        raise CheckpointError("checkpoint weights do not match their recorded sha256 (corrupt file?)")
    model = CDASR(scale=meta["scale"], **meta["arch"]["config"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit architecture {meta['arch']['name']}: {e}") from None
    return model.eval(), meta
