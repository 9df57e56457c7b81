"""The checkpoint format: safetensors weights with JSON metadata in the header.

safetensors cannot execute code on load (unlike pickle), and its header carries a string map, in
which we keep one JSON document under the key ``clipsr``: architecture, scale, CLIP encoder
identity, training data, parent model, code revision, metrics. The model id is derived from the
weights' content hash, so two different weights never share an id.

A *delta* checkpoint (an adapted domain model) stores only the tensors that adaptation changed
and names its parent by id and content hash; its ``weights_sha256`` is still the hash of the full
effective weights, so loading it onto the wrong parent is detected, not silently wrong.

This module works on bytes; reading and writing URIs is :mod:`clipsr.storage`'s job.
"""
from __future__ import annotations

import copy
import json
import struct
from typing import Any

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from clipsr.digest import tensors_sha256
from clipsr.models.cdasr import CDASR

FORMAT = "clipsr.checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "clipsr"


class CheckpointError(ValueError):
    """A file that is not a clipsr checkpoint, or one that does not fit what it is loaded into."""


class NotACheckpointError(CheckpointError):
    """A file without clipsr metadata: the factory then offers it to the loader of other architectures."""


def model_id(arch_name: str, scale: int, sha256: str) -> str:
    return f"{arch_name}-x{scale}-{sha256[:12]}"


def to_bytes(
    model: CDASR, arch_name: str, arch_config: dict[str, Any], meta: dict[str, Any],
    keys: list[str] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Serialise ``model`` (only ``keys`` for a delta); returns the bytes and the metadata written."""
    return pack(model.state_dict(), model.scale, arch_name, arch_config, meta, keys)


def pack(
    state: dict[str, Any], scale: int, arch_name: str, arch_config: dict[str, Any], meta: dict[str, Any],
    keys: list[str] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """:func:`to_bytes` on named tensors: networks of other architectures are stored under their
    own tensor names, so the file stays loadable by the library that built them."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    sha = tensors_sha256(state)
    stored = state if keys is None else {k: state[k] for k in keys}
    full = {
        **meta,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "full" if keys is None else "delta",
        "id": model_id(arch_name, scale, sha),
        "weights_sha256": sha,
        "stored_sha256": tensors_sha256(stored),
        "arch": {"name": arch_name, "config": arch_config},
        "scale": scale,
    }
    full.setdefault("clip_encoder", None)
    return st_save(stored, metadata={METADATA_KEY: json.dumps(full, sort_keys=True)}), full


def read_metadata(data: bytes) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, read from the safetensors header without the weights."""
    if len(data) < 8:
        raise NotACheckpointError("not a clipsr checkpoint: file is too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise NotACheckpointError("not a clipsr checkpoint: bad safetensors header")
    try:
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise NotACheckpointError(f"not a clipsr checkpoint: no '{METADATA_KEY}' metadata ({e})") from None
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"unsupported checkpoint format {meta.get('format')!r} v{meta.get('format_version')}"
        )
    return meta


def from_bytes(data: bytes, base: CDASR | None = None) -> tuple[CDASR, dict[str, Any]]:
    """Rebuild the network a checkpoint describes; a delta is applied onto (a copy of) ``base``."""
    meta = read_metadata(data)
    state = st_load(data)
    if tensors_sha256(state) != meta["stored_sha256"]:
        raise CheckpointError("checkpoint weights do not match their recorded sha256 (corrupt file?)")
    delta = meta["kind"] == "delta"
    if delta and base is None:
        raise CheckpointError(f"{meta['id']} is a delta on {meta['parent']['id']}; its parent is needed to load it")
    model = copy.deepcopy(base) if delta else CDASR(scale=meta["scale"], **meta["arch"]["config"])
    unknown = set(state) - set(model.state_dict())
    if unknown:
        raise CheckpointError(f"checkpoint tensors do not fit architecture {meta['arch']['name']}: {sorted(unknown)[:3]}")
    try:
        model.load_state_dict(state, strict=not delta)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit architecture {meta['arch']['name']}: {e}") from None
    if delta and tensors_sha256(model.state_dict()) != meta["weights_sha256"]:
        raise CheckpointError(f"{meta['id']} does not match the parent it was loaded onto")
    return model.eval(), meta
