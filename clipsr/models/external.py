"""Networks of other architectures (ESRGAN, Real-ESRGAN compact, SwinIR, HAT, DAT, SPAN, ...), as
spandrel loads them: an optional extra, ``pip install 'clipsr[spandrel]'``, imported only here and
only when such a model is loaded.

spandrel tells an architecture by its state dict's keys and reads the hyperparameters off tensor
shapes; its descriptor states the scale, the channels, which reduced precisions work, the input
size the network needs and whether tiling suits it. :class:`SpandrelUpscaler` takes precision,
tiling and padding from those fields; :class:`SpandrelNetwork` lets adaptation train every weight.

Only spandrel's main registry is asked: its core architectures, under permissive licences (those
under non-commercial licences live in the separate ``spandrel_extra_arches`` package, never
loaded here), and only super-resolution models (spandrel purpose ``SR``) at clipsr's scales.

Files are safetensors, or PyTorch pickles (``.pth``, ``.ckpt``) read only through spandrel's
restricted unpickler, which admits the globals that rebuild tensors and nothing else. The kind is
told from the bytes, not the name: a registry keeps its source copies as ``.safetensors`` whatever
they were. The model id is ``spandrel-<arch>-x<scale>-<12 hex>``, the hash being
:func:`clipsr.digest.tensors_sha256` of the network's weights, so the same weights have one id in
either file format. Adapted weights are stored as a clipsr checkpoint (metadata and lineage in the
header) under the network's own tensor names, which spandrel can read as well.
"""
from __future__ import annotations

import logging
import pickle
import tempfile
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from clipsr import imaging
from clipsr.digest import tensors_sha256
from clipsr.models.checkpoint import CheckpointError, model_id
from clipsr.models.upsampler import SCALES
from clipsr.tiling import tiled_apply

log = logging.getLogger(__name__)

LIBRARY = "spandrel"
EXTRA = "pip install 'clipsr[spandrel]'"
_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"  # torch.save's zip container; a bare pickle (protocol >= 2)
_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _spandrel() -> Any:
    try:
        import spandrel
    except ImportError:
        raise CheckpointError(f"not a clipsr checkpoint; models of other architectures are loaded by "
                              f"spandrel, which is not installed: {EXTRA}") from None
    return spandrel


def _is_safetensors(data: bytes) -> bool:
    """An 8-byte header length that fits the file, then the JSON header (whose first byte can
    look like a pickle's, so this is asked first)."""
    return len(data) > 9 and int.from_bytes(data[:8], "little") <= len(data) - 8 and data[8:9] == b"{"


def read_state_dict(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or of a PyTorch pickle (restricted), canonicalised as
    spandrel does (``params_ema``/``state_dict`` unwrapped, ``module.`` stripped)."""
    if not _is_safetensors(data) and (data[:4] == _ZIP or data[:1] == _PICKLE):
        loader = _spandrel().ModelLoader()
        with tempfile.NamedTemporaryFile(suffix=".pth") as f:  # its public reader takes a path
            f.write(data)
            f.flush()
            try:
                return loader.load_state_dict_from_file(f.name)
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
                raise CheckpointError(f"{name}: not a clipsr checkpoint, and not a plain PyTorch state dict "
                                      f"(read with spandrel's restricted unpickler: {e})") from None
    try:
        state = st_load(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{name}: not a clipsr checkpoint, nor a safetensors or PyTorch weights "
                              f"file ({e})") from None
    return _spandrel().canonicalize_state_dict(state)


def describe_file(data: bytes, name: str) -> Any:
    """spandrel's descriptor of a weights file, checked to be a super-resolution model clipsr runs."""
    spandrel = _spandrel()
    state = read_state_dict(data, name)
    try:
        descriptor = spandrel.MAIN_REGISTRY.load(state)
    except spandrel.UnsupportedModelError:
        some = ", ".join(sorted(state)[:4])
        raise CheckpointError(f"{name}: not a clipsr checkpoint and spandrel does not recognise it: no "
                              f"architecture in spandrel {spandrel.__version__} matches its tensors "
                              f"({len(state)} tensors, e.g. {some})") from None
    except Exception as e:  # noqa: BLE001  a recognised architecture whose shapes do not add up
        raise CheckpointError(f"{name}: spandrel took it for an architecture it could not build: "
                              f"{type(e).__name__}: {e}") from None
    arch = descriptor.architecture.id
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR":
        raise CheckpointError(f"{name}: a spandrel {arch} {descriptor.purpose} model; clipsr runs "
                              "super-resolution models only")
    if descriptor.scale not in SCALES:
        raise CheckpointError(f"{name}: a x{descriptor.scale} {arch} model; clipsr runs "
                              f"{', '.join(f'x{s}' for s in SCALES)}")
    if descriptor.input_channels not in (1, 3) or descriptor.output_channels != descriptor.input_channels:
        raise CheckpointError(f"{name}: a {arch} model from {descriptor.input_channels} to "
                              f"{descriptor.output_channels} channels; clipsr runs grey or RGB to the same")
    return descriptor.eval()


class SpandrelNetwork(nn.Module):
    """A spandrel network where clipsr expects a CDASR: ``forward(x, emb)`` ignores the embedding
    (these networks have none), pads to the network's size requirements and crops back, and folds
    RGB into three grey images for a grey network. What adaptation trains."""

    def __init__(self, descriptor: Any) -> None:
        super().__init__()
        self.descriptor = descriptor
        self.net = descriptor.model
        self.scale = int(descriptor.scale)
        self.arch = str(descriptor.architecture.id)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        grey_net = self.descriptor.input_channels == 1
        if grey_net and c == 3:
            x = x.reshape(n * 3, 1, h, w)
        pad_w, pad_h = self.descriptor.size_requirements.get_padding(w, h)
        if pad_w or pad_h:  # reflect as far as the image reaches, then repeat the edge, as spandrel does
            rw, rh = min(pad_w, w - 1), min(pad_h, h - 1)
            x = nn.functional.pad(x, (0, rw, 0, rh), "reflect")
            x = nn.functional.pad(x, (0, pad_w - rw, 0, pad_h - rh), "replicate")
        y = self.net(x)
        if isinstance(y, (tuple, list)):  # some networks return extra outputs after the image
            y = y[0]
        y = y[..., : h * self.scale, : w * self.scale]
        return y.reshape(n, 3, h * self.scale, w * self.scale) if grey_net and c == 3 else y

    def folded(self) -> SpandrelNetwork:
        """Nothing to fold: the network has no condition input."""
        return self

    @cached_property
    def _trainable(self) -> bool:
        """Whether the plain forward is what spandrel runs: a few architectures wrap their network
        in extra steps at inference, and tuning the bare network would then tune something else."""
        side = max(16, self.descriptor.size_requirements.minimum)
        side += -side % self.descriptor.size_requirements.multiple_of
        x = torch.rand(1, self.descriptor.input_channels, side, side, generator=torch.Generator().manual_seed(0))
        x = x.to(next(self.net.parameters()).device)
        training = self.net.training
        self.net.eval()  # spandrel's call switches the network to eval mode: compare both there
        try:
            with torch.no_grad():
                mine = self(x).clamp(0, 1)
            return torch.allclose(mine, self.descriptor(x), atol=1e-4)
        finally:
            self.net.train(training)

    def adaptation_parameters(self, scope: str) -> list[nn.Parameter]:
        if scope != "all":
            raise ValueError(f"a spandrel {self.arch} model is adapted in scope 'all' (every weight); "
                             f"scope {scope!r} names parts of clipsr's own networks")
        if not self._trainable:
            raise ValueError(f"spandrel runs {self.arch} through extra steps around its network; "
                             "clipsr cannot adapt it")
        return list(self.net.parameters())

    def adaptation_names(self, scope: str) -> list[str]:
        self.adaptation_parameters(scope)
        return list(self.net.state_dict())

    def weights(self) -> dict[str, torch.Tensor]:
        """The network's tensors under spandrel's names: what the id hashes and a file stores."""
        return self.net.state_dict()


def arch_name(arch: str) -> str:
    return f"{LIBRARY}-{arch}"


def is_external(meta: dict[str, Any]) -> bool:
    """Whether a clipsr checkpoint's network is one spandrel builds (an adapted external model)."""
    return meta["arch"]["config"].get("library") == LIBRARY


def arch_config(network: SpandrelNetwork) -> dict[str, Any]:
    """What a checkpoint records of the architecture; spandrel rebuilds it from the tensors."""
    return {"library": LIBRARY, "arch": network.arch, "tags": list(network.descriptor.tags),
            "version": _spandrel().__version__}


def load_file(data: bytes, name: str) -> tuple[SpandrelNetwork, dict[str, Any]]:
    """A weights file without clipsr metadata: the network and the metadata clipsr keeps for it."""
    network = SpandrelNetwork(describe_file(data, name))
    sha = tensors_sha256(network.weights())
    meta = {"id": model_id(arch_name(network.arch), network.scale, sha), "kind": "full",
            "weights_sha256": sha, "scale": network.scale, "clip_encoder": None, "parent": None,
            "arch": {"name": arch_name(network.arch), "config": arch_config(network)}}
    return network, meta


def load_checkpoint(data: bytes, meta: dict[str, Any], name: str) -> SpandrelNetwork:
    """The network of a clipsr checkpoint of an external architecture (adapted weights), verified
    against the architecture and weights hash its header records."""
    network = SpandrelNetwork(describe_file(data, name))
    want = meta["arch"]["config"]["arch"]
    if network.arch != want or network.scale != meta["scale"]:
        raise CheckpointError(f"{meta['id']}: spandrel reads a x{network.scale} {network.arch}, the header "
                              f"says x{meta['scale']} {want}")
    if tensors_sha256(network.weights()) != meta["weights_sha256"]:
        raise CheckpointError("checkpoint weights do not match their recorded sha256 (corrupt file?)")
    return network


def choose_precision(requested: str, device: str, supports_half: bool, supports_bf16: bool) -> str:
    """The arithmetic to run in: ``requested`` where the descriptor allows it, else fp32 (``auto``
    too: clipsr measured reduced precision on its own networks only). fp16 needs a GPU."""
    if requested not in (*_PRECISIONS, "auto"):
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)} or auto, got {requested!r}")
    if requested == "fp16" and not device.startswith("cuda"):
        raise ValueError(f"fp16 inference is only supported on GPU; use fp32 on {device}")
    supported = {"fp32": True, "auto": False, "fp16": supports_half, "bf16": supports_bf16}[requested]
    if not supported and requested != "auto":
        log.warning("this spandrel model does not support %s (its descriptor says so); running fp32", requested)
    return requested if supported else "fp32"


class SpandrelUpscaler:
    """A spandrel model behind clipsr's Upscaler interface: each tile goes through spandrel's own
    call (which pads to the size requirements and crops back), in a precision the descriptor
    allows, and the whole image goes at once where the descriptor says the model tiles itself."""

    def __init__(self, network: SpandrelNetwork, meta: dict[str, Any], device: str = "cpu",
                 precision: str = "fp32", tile: int = 256, overlap: int = 32) -> None:
        d = network.descriptor
        self.meta, self.scale, self.encoder = meta, network.scale, None
        self.device = torch.device(device)
        self.precision = choose_precision(precision, device, d.supports_half, d.supports_bfloat16)
        self.last_precision = self.precision
        self.fp32_fallbacks = 0
        self.tiling = d.tiling.name.lower()
        # --tile bounds memory, so a model whose tiling spandrel only discourages (global attention:
        # SwinIR) is still tiled beyond it, and reports so; one that tiles internally never is.
        self.tile = None if d.tiling == _spandrel().ModelTiling.INTERNAL else tile
        self.overlap = overlap
        self.descriptor = d.to(self.device).eval()
        self.model = d.model  # the nn.Module: callers hook its forward (the per-image time limit)

    def _run(self, t: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, C, s*h, s*w], one image (and, for a grey network, one channel) a call:
        spandrel's call takes a single image."""
        grey_net = self.descriptor.input_channels == 1
        outs = []
        for img in t.split(1):
            parts = img.split(1, dim=1) if grey_net else (img,)
            outs.append(torch.cat([self.descriptor(p) for p in parts], dim=1))
        return torch.cat(outs)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile is None:
            return self._run(x).float()
        return tiled_apply(self._run, x, self.scale, self.tile, self.overlap, batch=1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_precision = self.precision
        with torch.inference_mode():
            if self.precision == "fp32":
                return self._apply(x)
            with torch.autocast(self.device.type, dtype=_PRECISIONS[self.precision]):
                y = self._apply(x)
            if torch.isfinite(y).all():
                return y
            self.fp32_fallbacks += 1
            self.last_precision = "fp32"
            log.warning("non-finite %s output; recomputing this image in fp32", self.precision)
            return self._apply(x)

    def embed(self, lr_rgb: np.ndarray) -> None:
        """No CLIP encoder: these models have no condition."""
        return None

    def upscale(self, lr: np.ndarray, embedding: np.ndarray | None = None) -> np.ndarray:
        if lr.ndim != 3 or lr.shape[2] not in (1, 3) or 0 in lr.shape[:2]:
            raise ValueError(f"expected a non-empty HxWxC image with C in (1, 3), got shape {lr.shape}")
        grey = lr.shape[2] == 1
        img = lr if grey and self.descriptor.input_channels == 1 else imaging.to_rgb(lr)
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))[None]
        out = self._forward(x.to(self.device))[0].clamp(0.0, 1.0).permute(1, 2, 0).cpu().numpy()
        return out.mean(axis=2, keepdims=True) if grey and out.shape[2] == 3 else out

    def describe(self) -> dict[str, Any]:
        d = self.descriptor
        req = d.size_requirements
        return {
            "id": self.meta["id"],
            "params": sum(p.numel() for p in d.model.parameters()),
            "scale": self.scale,
            "clip_encoder": None,
            "arch": self.meta["arch"]["name"],
            "precision": self.precision,
            "tiling": f"{self.tiling}: " + (f"tiles of up to {self.tile}" if self.tile else "whole image"),
            "size_requirements": {"minimum": req.minimum, "multiple_of": req.multiple_of, "square": req.square},
        }
