"""Building and loading models by name, tag or path: the one place that resolves a model spec.

Architecture configs are data (``clipsr/model_configs/cdasr-*.json``). A model *spec*, as the
command line takes it, is one of:

- ``bicubic``: MATLAB-compatible bicubic interpolation (no parameters);
- ``default`` / ``default-x4`` / ``default-x2``...: the weights bundled with the package; a
  versioned name (``default-x4-v1``) pins one release of a bundled model, so that a nightly job
  does not redo its archive when the package's default changes;
- a registry reference ``REGISTRY/DOMAIN`` (that domain's current version) or
  ``REGISTRY/DOMAIN/vN`` (a given version), as written by ``clipsr adapt --out REGISTRY``;
- a checkpoint path or URI (local, ``file://``, ``s3://``...);
- ``spandrel:PATH_OR_URI``: a weights file of another architecture, read by spandrel (the
  optional extra; :mod:`clipsr.models.external`). A path or URI without the prefix is read by
  spandrel too when it holds no clipsr metadata, so a ``.safetensors`` or ``.pth`` of ESRGAN,
  SwinIR, SPAN... is a model spec as it is.

Adapted models are deltas on a source model: loading one loads its parent too, and checks the
parent's content hash against the one recorded, so a renamed or retrained source is caught. A
delta in a registry finds its parent first by file hash in the registry's own copies (verified on
read), and only then by the locator it recorded, so moving or deleting the source breaks nothing.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from clipsr import storage
from clipsr.inference import BicubicUpscaler, NetworkUpscaler, Upscaler
from clipsr.models import CDASR, external
from clipsr.config import validate
from clipsr.digest import tensors_sha256
from clipsr.models.checkpoint import CheckpointError, NotACheckpointError, from_bytes, pack, read_metadata, to_bytes
from clipsr.models.strength import check_strength, interpolate, strength_id
from clipsr.models.upsampler import SCALES
from clipsr.provenance import code_revision, utc_now

CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"
#: Bundled names and the file (``clipsr/weights/<file>.safetensors``) each one loads. When a bundled
#: model is replaced, the one it replaces stays under its versioned name.
BUNDLED = {"default": "default-x4", "default-x4": "default-x4", "default-x4-v2": "default-x4",
           "default-x4-v1": "default-x4-v1", "default-x2": "default-x2", "default-x8": "default-x8",
           "default-x16": "default-x16", "default-x4-jpeg": "default-x4-jpeg"}
#: The bundled model for JPEG-compressed inputs of a bundled model, which ``clipsr enhance`` pairs
#: with it by default (``--jpeg-model auto``).
BUNDLED_JPEG = {"default-x4": "default-x4-jpeg", "default-x4-v1": "default-x4-jpeg"}
SPANDREL_PREFIX = "spandrel:"


#: A bundled name that names one release of a model (``default-x4-v1``), not whatever is bundled now.
_VERSIONED = re.compile(r"-v[0-9]+$")


def pin_name(file: str) -> str:
    """The bundled name that keeps loading this bundled file's model after a later release replaces
    it: its versioned name, or the file's own name for a model that has none."""
    return next((n for n, f in BUNDLED.items() if f == file and _VERSIONED.search(n)), file)


def bundled_file_ids() -> dict[str, str]:
    """Bundled file -> the id of the model it holds, for each one installed (read once per process;
    a file that cannot be read is left out, to fail only where it is loaded)."""
    return dict(_bundled_file_ids())


@lru_cache(maxsize=None)
def _bundled_file_ids() -> tuple[tuple[str, str], ...]:
    out = []
    for file in sorted(set(BUNDLED.values())):
        try:
            out.append((file, read_metadata((WEIGHTS_DIR / f"{file}.safetensors").read_bytes())["id"]))
        except (OSError, CheckpointError):
            continue
    return tuple(out)


def bundled_ids() -> dict[str, str]:
    """Model id -> the bundled name that pins it (:func:`pin_name`), for every bundled file installed."""
    return {model_id: pin_name(file) for file, model_id in _bundled_file_ids()}


def scale_mismatch(meta: dict[str, Any], scale: int, flag: str = "--scale") -> str:
    """The message for a model asked to run at a scale it was not trained for, with the fix: the
    bundled model of that scale, when there is one, or the model's own scale."""
    text = f"model {meta['id']} is a x{meta['scale']} model, but x{scale} was asked for ({flag} {scale})"
    bundled = f"default-x{scale}"
    if bundled in BUNDLED:
        return f"{text}; for x{scale} use --model {bundled} (bundled), or leave out {flag} to run at x{meta['scale']}"
    return f"{text}; use a x{scale} model, or leave out {flag} to run at x{meta['scale']}"


#: A loaded network: clipsr's own, or another architecture's as spandrel builds it.
Network = CDASR | external.SpandrelNetwork


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


def parse_model_spec(spec: str) -> tuple[str, str]:
    """A spec's kind and what it names, before any lookup: ``bicubic``, ``bundled`` (the bundled
    name), ``spandrel`` (the URI after the prefix), or ``file`` (a registry reference or a path/URI,
    whose bytes tell a clipsr checkpoint from another architecture's weights)."""
    if spec == "bicubic":
        return "bicubic", spec
    if spec in BUNDLED:
        return "bundled", BUNDLED[spec]
    if spec.startswith(SPANDREL_PREFIX):
        uri = spec[len(SPANDREL_PREFIX):]
        if not uri:
            raise ValueError("model spec 'spandrel:' names no file; expected spandrel:PATH_OR_URI")
        return "spandrel", uri
    return "file", spec


def absolute_spec(spec: str) -> str:
    """``spec`` with a local path made absolute: Ray workers do not share the driver's working directory."""
    kind, name = parse_model_spec(spec)
    if kind in ("bicubic", "bundled"):
        return spec
    if kind == "spandrel":
        return SPANDREL_PREFIX + storage.absolute(name)
    return storage.absolute(name)


def _locate(spec: str) -> tuple[str, str | None]:
    """A model spec's checkpoint URI, and the registry it lies in if the spec is a reference."""
    kind, name = parse_model_spec(spec)
    if kind == "bundled":
        path = WEIGHTS_DIR / f"{name}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"the bundled model {spec!r} is not installed ({path} is missing)")
        return str(path), None
    if kind == "spandrel":
        return name, None
    from clipsr.registry import resolve_ref

    entry = resolve_ref(spec)
    return (entry.model_uri, entry.registry) if entry is not None else (spec, None)


def checkpoint_uri(spec: str) -> str:
    """Where a model spec's checkpoint lives: bundled names and registry references resolved."""
    return _locate(spec)[0]


def load_checkpoint(spec: str, strength: float | None = None) -> tuple[Network, dict[str, Any]]:
    """The network and metadata a model spec names (deltas applied onto their verified parent);
    with ``strength``, an adapted model's weights moved that far from its source's
    (:mod:`clipsr.models.strength`)."""
    model, meta, _ = load_checkpoint_files(spec)
    if strength is not None:
        model, meta = _at_strength(spec, model, meta, strength)
    return model, meta


def _weights(model: Network) -> dict[str, Any]:
    """The tensors a model's id hashes."""
    return model.weights() if isinstance(model, external.SpandrelNetwork) else model.state_dict()


def _at_strength(spec: str, model: Network, meta: dict[str, Any], strength: float) -> tuple[Network, dict[str, Any]]:
    """An adapted model toned down towards its source; the metadata records the strength. A model
    without a source (not adapted) is refused below strength 1."""
    strength = check_strength(strength)
    if not is_adapted(meta):
        if strength != 1.0:
            raise CheckpointError(f"model {meta['id']} has no source model to interpolate from: --strength "
                                  "below 1 applies to adapted models (a registry domain, or a checkpoint "
                                  "written by clipsr adapt)")
        return model, meta
    meta = {**meta, "strength": strength}
    if strength == 1.0:
        return model, meta
    source, smeta, _, where = _load_parent(meta, _locate(spec)[1])
    if smeta["weights_sha256"] != meta["parent"]["weights_sha256"]:
        raise CheckpointError(f"{meta['id']} was adapted from {meta['parent']['id']}, but {where!r} now holds "
                              f"{smeta['id']}; pass the original source model")
    try:
        toned = interpolate(source.state_dict(), model.state_dict(), strength)
    except ValueError as e:
        raise CheckpointError(f"{meta['id']} cannot be interpolated with its source {smeta['id']}: {e}") from None
    model.load_state_dict(toned)
    meta["id"] = strength_id(meta["id"], strength)
    meta["weights_sha256"] = tensors_sha256(_weights(model))
    return model.eval(), meta


def is_adapted(meta: dict[str, Any]) -> bool:
    """Written by ``clipsr adapt``: it names the source model it was adapted from. A pretrained
    model's ``parent`` is only where its training started, not a source to tone it down towards."""
    return meta.get("parent_spec") is not None or meta.get("kind") == "delta"


def load_checkpoint_files(spec: str) -> tuple[Network, dict[str, Any], list[bytes]]:
    """:func:`load_checkpoint`, plus the bytes of the file read and of each parent it was applied
    onto, nearest first: what a registry keeps so that a delta on this model stays loadable."""
    data, uri, registry = _read(spec)
    if parse_model_spec(spec)[0] == "spandrel":
        return (*_external(data, uri), [data])
    return _from_file(data, uri, registry)


def _read(spec: str) -> tuple[bytes, str, str | None]:
    uri, registry = _locate(spec)
    try:
        return storage.read_bytes(uri), uri, registry
    except FileNotFoundError:
        raise FileNotFoundError(
            f"model {spec!r} not found: expected 'bicubic', one of {sorted(BUNDLED)}, "
            "a registry reference REGISTRY/DOMAIN[/vN], a checkpoint path/URI, or spandrel:PATH_OR_URI"
        ) from None


def _external(data: bytes, uri: str) -> tuple[external.SpandrelNetwork, dict[str, Any]]:
    network, meta = external.load_file(data, uri)
    meta["source_uri"] = uri
    return network, meta


def read_model_metadata(spec: str) -> dict[str, Any]:
    """A model's metadata (id, scale, CLIP encoder) as cheaply as it comes: a clipsr checkpoint's
    header, without the weights; a file of another architecture has no header, so spandrel builds
    the network to read its scale and hash its weights."""
    data, uri, _ = _read(spec)
    if parse_model_spec(spec)[0] != "spandrel":
        try:
            return read_metadata(data)
        except NotACheckpointError:
            pass
    return _external(data, uri)[1]


def _from_file(data: bytes, uri: str, registry: str | None) -> tuple[Network, dict[str, Any], list[bytes]]:
    try:
        meta = read_metadata(data)
    except NotACheckpointError:
        return (*_external(data, uri), [data])
    if external.is_external(meta):  # adapted weights of another architecture: stored whole
        meta["source_uri"] = uri
        return external.load_checkpoint(data, meta, uri), meta, [data]
    base, files = None, [data]
    if meta["kind"] == "delta":
        parent = meta["parent"]
        base, parent_meta, parent_files, where = _load_parent(meta, registry)
        if parent_meta["weights_sha256"] != parent["weights_sha256"]:
            raise CheckpointError(
                f"{meta['id']} was adapted from {parent['id']}, but {where!r} now holds "
                f"{parent_meta['id']}; pass the original source model"
            )
        files += parent_files
    model, meta = from_bytes(data, base=base)
    meta["source_uri"] = uri
    return model, meta, files


def _load_parent(meta: dict[str, Any], registry: str | None) -> tuple[Network, dict[str, Any], list[bytes], str]:
    """A delta's parent and where it was found: the registry's copy named by the parent's file
    hash if there is one, else the locator recorded (registries written before copies were kept)."""
    file_sha = meta["parent"].get("file_sha256")
    if registry is not None and file_sha is not None:
        from clipsr.registry import Registry

        uri = Registry(registry).source_uri(file_sha)
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            data = None
        if data is not None:
            found = hashlib.sha256(data).hexdigest()
            if found != file_sha:  # as open_clip does with a cached download: never trust the name alone
                raise CheckpointError(
                    f"{meta['id']} needs its source model file sha256 {file_sha}, but the registry's copy "
                    f"{uri} has sha256 {found}: the copy is damaged; restore it from the original file"
                )
            return (*_from_file(data, uri, registry), uri)
    spec = meta["parent_spec"]
    if parse_model_spec(spec)[0] == "bundled":  # adapted from a bundled model since replaced: its versioned name
        spec = bundled_ids().get(meta["parent"]["id"], spec)
    return (*load_checkpoint_files(spec), spec)


def encode_checkpoint(
    model: Network,
    arch: str,
    clip_encoder: dict[str, Any] | None = None,
    training_data: Any = None,
    parent: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    delta_keys: list[str] | None = None,
    parent_spec: str | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """``model`` as checkpoint bytes of architecture ``arch``, and the metadata they carry.

    With ``delta_keys``, only those tensors are stored and ``parent`` / ``parent_spec`` say what
    they apply to. The metadata is validated against ``schemas/checkpoint.schema.json``. A network
    of another architecture is stored whole, under its own tensor names.
    """
    meta = {
        "clip_encoder": clip_encoder,
        "training_data": training_data,
        "parent": parent,
        "metrics": metrics or {},
        "settings": settings or {},
        "code_revision": code_revision(),
        "created": utc_now(),
        "parent_spec": parent_spec,
    }
    if delta_keys is not None and parent is None:
        raise ValueError("a delta checkpoint needs its parent (id and weights_sha256)")
    if isinstance(model, external.SpandrelNetwork):
        if delta_keys is not None:
            raise ValueError(f"a spandrel {model.arch} model is stored whole, not as a delta")
        data, full = pack(model.weights(), model.scale, arch, external.arch_config(model), meta)
    else:
        data, full = to_bytes(model, arch, get_model_config(arch), meta, keys=delta_keys)
    validate(full, "checkpoint")
    return data, full


def save_checkpoint(uri: str, model: CDASR, arch: str, **meta: Any) -> dict[str, Any]:
    """Write ``model`` to ``uri`` atomically (see :func:`encode_checkpoint`); returns its metadata."""
    data, full = encode_checkpoint(model, arch, **meta)
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
    from clipsr.clip import EncoderIdentity, load_image_encoder

    want = EncoderIdentity.from_dict(recorded)
    random_seed = want.weights.startswith("random:")
    if clip_weights is None and not random_seed:
        raise CheckpointError(
            f"model {meta['id']} needs CLIP encoder {want.arch} with weights {want.weights} "
            f"(sha256 {want.sha256[:12]}); pass them with --clip-weights FILE_OR_URI"
        )
    seed = int(want.weights.split(":", 1)[1]) if random_seed else 0
    encoder = load_image_encoder(want.arch, clip_weights, seed=seed)
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
    strength: float | None = None,
) -> Upscaler:
    """Resolve a model spec to a ready upscaler; ``scale`` must agree with the checkpoint's, and
    ``strength`` (an adapted model's, see :func:`load_checkpoint`) is refused below 1 for bicubic."""
    if spec == "bicubic":
        if scale not in SCALES:  # else every image fails on its own (x0) or scores trivially (x1)
            raise ValueError(f"model 'bicubic' needs a scale of {', '.join(f'x{s}' for s in SCALES)}; got {scale}")
        if strength is not None and check_strength(strength) != 1.0:
            raise ValueError("model 'bicubic' has no source model to interpolate from; --strength applies to "
                             "adapted models")
        return BicubicUpscaler(scale)
    model, meta = load_checkpoint(spec, strength)
    if scale is not None and scale != meta["scale"]:
        raise CheckpointError(scale_mismatch(meta, scale))
    encoder = load_encoder_for(meta, clip_weights)
    if isinstance(model, external.SpandrelNetwork):
        return external.SpandrelUpscaler(model, meta, device=device, precision=precision, tile=tile)
    return NetworkUpscaler(model, meta, encoder=encoder, device=device, precision=precision, tile=tile)
