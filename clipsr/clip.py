"""Frozen CLIP image encoders and their embeddings: the one module that knows about open_clip.

Every embedding this project stores or uses is tied to an :class:`EncoderIdentity` (architecture +
a hash of the image tower's weights), because vectors from different encoders (or from random
weights, which carry no semantic meaning) must never be compared with each other.

Preprocessing follows open_clip's evaluation transform: bicubic antialiased resize of the shorter
side to the tower's input size, centre crop, OpenAI mean/std. It is applied to tensors so the same
path serves cached embeddings (:meth:`embed_images`) and the differentiable semantic-consistency
loss (:meth:`embed_tensor`).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import load_state_dict as _open_clip_load_state_dict
from open_clip.model import _build_vision_tower  # open_clip has no public "vision tower only" builder

from clipsr.digest import tensors_sha256

TINY_ARCH = "clipsr-tiny-vit"
_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_MEMORY_CACHE_ENTRIES = 65536  # about 130 MB of 512-d float32 vectors


def _register_configs() -> None:
    """Make clipsr's own tower configs known to open_clip (safe to call repeatedly)."""
    if TINY_ARCH not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR / f"{TINY_ARCH}.json")


_register_configs()


@dataclass(frozen=True)
class EncoderIdentity:
    """What produced an embedding; stored with every model and cache that used the encoder."""

    arch: str
    weights: str  # "random:<seed>", "file:<basename>", a URI, or an open_clip pretrained tag
    sha256: str  # of the image tower's tensors, see clipsr.digest.tensors_sha256
    semantic_prior: bool  # False: random weights, similarities mean nothing semantically
    embed_dim: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EncoderIdentity":
        fields = {"arch": str, "weights": str, "sha256": str, "semantic_prior": bool, "embed_dim": int}
        missing = sorted(set(fields) - set(data))
        if missing:
            raise ValueError(f"encoder identity is missing {missing}; got keys {sorted(data)}")
        for name, kind in fields.items():
            if not isinstance(data[name], kind) or (kind is int and isinstance(data[name], bool)):
                raise ValueError(f"encoder identity field {name!r} must be {kind.__name__}, got {data[name]!r}")
        return cls(**{name: data[name] for name in fields})

    def matches(self, other: "EncoderIdentity") -> bool:
        """Same architecture and same weights: embeddings are comparable."""
        return self.arch == other.arch and self.sha256 == other.sha256


def is_uri(weights: str) -> bool:
    """A scheme such as s3:// or file:// (a Windows drive letter is not a scheme)."""
    return len(urlparse(weights).scheme) > 1


def fetch_weights(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Copy a weights file from any fsspec URI to a local file and return its path.

    With ``cache_dir`` the copy is kept (named by a hash of the URI) and reused on the next call;
    without it the copy goes to a fresh temporary directory that the caller may delete.
    """
    import fsspec  # only URIs need it

    name = Path(urlparse(uri).path).name or "weights"
    if cache_dir is not None:
        folder = Path(cache_dir) / "weights" / hashlib.sha256(uri.encode()).hexdigest()[:16]
        target = folder / name
        if target.is_file():
            return target
    else:
        folder = Path(tempfile.mkdtemp(prefix="clipsr-weights-"))
        target = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".part-{os.getpid()}")
    try:
        with fsspec.open(uri, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except FileNotFoundError as exc:
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(f"weights not found at {uri}") from exc
    os.replace(partial, target)
    return target


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors, torch or TorchScript checkpoint (bare state dict or {'state_dict': ...})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if _is_torchscript(path):  # OpenAI's original ViT-*.pt files are TorchScript archives
        with warnings.catch_warnings():  # jit.load is deprecated, but these archives only exist as TorchScript
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    return dict(_open_clip_load_state_dict(str(path), device="cpu", weights_only=True))


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_weights(weights: str, cache_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a local checkpoint or a URI (copied locally first, kept only under ``cache_dir``)."""
    if not is_uri(weights):
        return load_state_dict_file(weights)
    local = fetch_weights(weights, cache_dir)
    try:
        return load_state_dict_file(local)
    finally:
        if cache_dir is None:
            shutil.rmtree(local.parent, ignore_errors=True)


def weights_label(weights: str) -> str:
    """How a weights source is recorded: "file:<basename>" for local files, URIs as given."""
    return weights if is_uri(weights) else f"file:{Path(weights).name}"


class ImageEncoder:
    """Frozen image -> L2-normalised vector, with preprocessing and an embedding cache.

    Not an ``nn.Module`` on purpose: attaching an encoder to an SR model or a loss must not put its
    frozen weights into that model's ``state_dict``, optimiser or ``train()`` switch.
    Subclasses set ``module``, ``identity`` and ``input_size`` and implement ``_encode``.
    """

    module: torch.nn.Module
    identity: EncoderIdentity
    input_size: tuple[int, int]
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __init__(self, device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None):
        self.device = torch.device(device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()

    def _freeze(self) -> None:
        self.module.to(self.device).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        return self.identity.embed_dim

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, *input_size] in [0, 1] -> [B, D] unnormalised."""
        raise NotImplementedError

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """Shorter side to the input size (bicubic, antialiased), then centre crop: open_clip's eval transform."""
        th, tw = self.input_size
        h, w = x.shape[-2:]
        if (h, w) != (th, tw):
            scale = max(th / h, tw / w)
            nh, nw = max(th, int(h * scale)), max(tw, int(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
            x = x[..., top : top + th, left : left + tw]
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images as [B, 3, H, W] (or [B, 1, H, W]), got {tuple(x.shape)}")
        x = x.to(device=self.device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self._resize(x)

    def embed_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] floats in [0, 1] (C = 3, or 1 for grey) -> [B, D] unit vectors; differentiable in x."""
        return F.normalize(self._encode(self._prepare(x)), dim=-1)

    def embed_images(self, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """HxWxC arrays (uint8, uint16 or float in [0, 1]; C in {1, 3}) -> [N, D] float32 unit vectors.

        Each image is embedded once per encoder: results are cached in memory and, when the encoder
        has a ``cache_dir``, as one .npy per image content hash, so reruns never recompute.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        keys = [_content_key(image) for image in images]
        out = np.empty((len(keys), self.embed_dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            cached = self._cached(key)
            if cached is None:
                missing.setdefault(key, []).append(i)
            else:
                out[i] = cached
        todo = list(missing)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            with torch.no_grad():
                batch = torch.cat([self._prepare(_to_tensor(images[missing[k][0]])) for k in chunk])
                vectors = F.normalize(self._encode(batch), dim=-1).float().cpu().numpy()
            for key, vector in zip(chunk, vectors):
                self._store(key, vector)
                out[missing[key]] = vector
        return out

    def _disk_path(self, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / "embeddings" / self.identity.sha256 / f"{key}.npy"

    def _cached(self, key: str) -> np.ndarray | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._disk_path(key)
        if path is not None and path.is_file():
            vector = np.load(path)
            if vector.shape == (self.embed_dim,):
                self._remember(key, vector)
                return vector
        return None

    def _store(self, key: str, vector: np.ndarray) -> None:
        self._remember(key, vector)
        path = self._disk_path(key)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.stem}.{os.getpid()}.part.npy")
            np.save(partial, vector)
            os.replace(partial, path)  # readers never see half-written files

    def _remember(self, key: str, vector: np.ndarray) -> None:
        self._memory[key] = vector
        if len(self._memory) > _MEMORY_CACHE_ENTRIES:
            self._memory.popitem(last=False)


def _content_key(image: np.ndarray) -> str:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"images must be numpy arrays, got {type(image).__name__}")
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{image.dtype.str}|{image.shape}|".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWxC array -> [1, C, H, W] float32 in [0, 1]."""
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an HxWxC image with C in {{1, 3}}, got shape {image.shape}")
    if image.dtype == np.uint8:
        array = image.astype(np.float32) / 255.0
    elif image.dtype == np.uint16:
        array = image.astype(np.float32) / 65535.0
    elif np.issubdtype(image.dtype, np.floating):
        array = np.clip(image.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"unsupported image dtype {image.dtype}: use uint8, uint16 or float in [0, 1]")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]


class ClipEncoder(ImageEncoder):
    """A frozen open_clip image tower (the text tower is never built)."""

    mean = tuple(open_clip.OPENAI_DATASET_MEAN)
    std = tuple(open_clip.OPENAI_DATASET_STD)

    def __init__(self, visual: torch.nn.Module, identity: EncoderIdentity, input_size: tuple[int, int],
                 device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None):
        super().__init__(device, cache_dir)
        self.module = visual
        self.identity = identity
        self.input_size = input_size
        self._freeze()

    @property
    def visual(self) -> torch.nn.Module:
        return self.module

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @classmethod
    def load(cls, arch: str, weights: str | None = None, seed: int = 0, device: str | torch.device = "cpu",
             cache_dir: str | os.PathLike | None = None) -> "ClipEncoder":
        """Build the image tower of ``arch`` and load ``weights``.

        ``weights``: None (random init from ``seed``: for tests only, no semantic meaning), a local
        checkpoint (.safetensors/.pt/.bin; a full open_clip/OpenAI CLIP checkpoint or the image
        tower alone), a URI fsspec can open (copied to ``cache_dir`` first), or an open_clip
        pretrained tag that is already in the local download cache. OpenAI weights use QuickGELU:
        load them with an arch ending in ``-quickgelu`` (e.g. ViT-B-32-quickgelu).
        ``cache_dir`` also holds the on-disk embedding cache.
        """
        config = open_clip.get_model_config(arch)
        if config is None or "vision_cfg" not in config:
            known = [name for name in open_clip.list_models() if name.startswith(("ViT-B", "RN50", "clipsr"))]
            raise ValueError(f"unknown CLIP architecture {arch!r}; known ones include {known}")
        quick_gelu = bool(config.get("quick_gelu", False))
        if weights is None:
            state, label = None, f"random:{seed}"
        elif os.path.isfile(weights) or is_uri(weights):
            state, label = read_weights(weights, cache_dir), weights_label(weights)
        elif open_clip.get_pretrained_cfg(arch, weights):
            tag_cfg = open_clip.get_pretrained_cfg(arch, weights)
            state, label = load_state_dict_file(_cached_pretrained(arch, weights, tag_cfg)), weights
            quick_gelu = quick_gelu or bool(tag_cfg.get("quick_gelu", False))
        elif Path(weights).suffix or os.sep in weights:
            raise FileNotFoundError(f"CLIP weights file not found: {weights}")
        else:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ValueError(f"{weights!r} is not a file, a URI or a pretrained tag of {arch} (tags: {tags})")

        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"], quick_gelu)
        if state is not None:
            _load_visual(visual, state, arch, label)
        image_size = config["vision_cfg"].get("image_size", 224)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        identity = EncoderIdentity(
            arch=arch,
            weights=label,
            sha256=tensors_sha256(visual.state_dict()),
            semantic_prior=state is not None,
            embed_dim=int(config["embed_dim"]),
        )
        return cls(visual, identity, size, device=device, cache_dir=cache_dir)


def _load_visual(visual: torch.nn.Module, state: dict[str, torch.Tensor], arch: str, label: str) -> None:
    """Load the image tower from a full CLIP checkpoint (``visual.*`` keys) or a tower-only one."""
    if any(key.startswith("visual.") for key in state):
        state = {key[len("visual."):]: value for key, value in state.items() if key.startswith("visual.")}
    try:
        visual.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights {label} do not fit the {arch} image tower: {str(exc)[:600]}") from exc


def _cached_pretrained(arch: str, tag: str, tag_cfg: Mapping[str, Any]) -> str:
    """Path of an already-downloaded open_clip pretrained checkpoint; never touches the network."""
    candidates: list[Path] = []
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(tag_cfg["hf_hub"])  # "org/repo/" means open_clip's default names
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo_id=repo_id, filename=name)
            if isinstance(found, str):
                candidates.append(Path(found))
    if tag_cfg.get("url"):
        candidates.append(Path("~/.cache/clip").expanduser() / Path(urlparse(tag_cfg["url"]).path).name)
    for path in candidates:
        if path.is_file():
            return str(path)
    raise RuntimeError(
        f"pretrained weights {arch}/{tag} are not in the local open_clip/Hugging Face cache and clipsr "
        f"never downloads weights: pass a local weights file or a URI (s3://..., file://...) instead"
    )


class ColorStatsEncoder(ImageEncoder):
    """Deterministic stand-in encoder: colour and texture statistics through a fixed projection.

    Same interface and cache as :class:`ClipEncoder`, but cheap and predictable (grey pages and
    colourful photos land far apart), so routing and caching can be tested without CLIP weights.
    """

    _FEATURES = 12
    _CENTRE = torch.tensor([0.5] * 3 + [0.25] * 3 + [0.05] * 3 + [0.1] * 3)
    _SCALE = torch.tensor([0.25] * 3 + [0.1] * 3 + [0.05] * 3 + [0.1] * 3)

    def __init__(self, embed_dim: int = 512, seed: int = 0, input_size: int = 64,
                 device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None):
        super().__init__(device, cache_dir)
        generator = torch.Generator().manual_seed(seed)
        projection = torch.nn.Linear(self._FEATURES, embed_dim, bias=False)
        projection.weight.data = torch.randn(embed_dim, self._FEATURES, generator=generator)
        self.module = projection
        self.input_size = (input_size, input_size)
        self.identity = EncoderIdentity(
            arch="color-stats",
            weights=f"random:{seed}",
            sha256=tensors_sha256({**projection.state_dict(), "input_size": torch.tensor(input_size)}),
            semantic_prior=False,
            embed_dim=embed_dim,
        )
        self._freeze()

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3))
        std = x.std(dim=(2, 3))
        edges = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(2, 3)) + (
            x[..., :, 1:] - x[..., :, :-1]
        ).abs().mean(dim=(2, 3))
        chroma = (x - x.roll(1, dims=1)).abs().mean(dim=(2, 3))  # zero for grey images
        features = torch.cat([mean, std, edges, chroma], dim=1)
        centre, scale = self._CENTRE.to(features), self._SCALE.to(features)
        return self.module((features - centre) / scale)



def load_image_encoder(
    arch: str, weights: str | None = None, seed: int = 0, device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
) -> ImageEncoder:
    """Any encoder by architecture name: ``color-stats`` (the deterministic stand-in) or a CLIP tower."""
    if arch == "color-stats":
        if weights is not None:
            raise ValueError("the color-stats encoder has no weights to load; it is defined by its seed")
        return ColorStatsEncoder(seed=seed, device=device, cache_dir=cache_dir)
    return ClipEncoder.load(arch, weights, seed=seed, device=device, cache_dir=cache_dir)
