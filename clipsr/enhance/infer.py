"""Stage 2: upscale decoded inputs in an actor that loads each model once.

The actor keeps the last few models it used (routing may send it several). Large images are
tiled by the upscaler (overlapping tiles, blended seams, memory bounded by the tile size), and
reduced precision (bf16/fp16, GPU only) falls back to fp32 on non-finite outputs, both in
clipsr.inference. The per-image time limit is checked before every forward call of the network
(a forward pre-hook), so a runaway image stops within one tile batch; bicubic, which has no
network, is checked when it returns.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from clipsr import imaging
from clipsr.enhance import rows as R
from clipsr.enhance.decode import to_float
from clipsr.enhance.routing import AUTO_PREFIX, AutoChooser, pack_embedding
from clipsr.factory import load_upscaler


class ImageTimeout(RuntimeError):
    """An image took longer than the per-image time limit."""


def output_bit_depth(input_bit_depth: int, fmt: str) -> int:
    """16 bits stay 16 bits where the output format can hold them (PNG, TIFF)."""
    return 16 if input_bit_depth == 16 and fmt in imaging.SIXTEEN_BIT_FORMATS else 8


def _node() -> tuple[str | None, str | None]:
    """The Ray node this actor runs on (None, None outside Ray)."""
    import ray

    if not ray.is_initialized():
        return None, None
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


class InferStage:
    """Ray Data actor UDF (``compute=ActorPoolStrategy``)."""

    def __init__(self, device: str = "cpu", precision: str = "fp32", tile: int = 256,
                 clip_weights: str | None = None, threads: int | None = None,
                 image_timeout: float = 600.0, max_models: int = 2) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device, self.precision, self.tile, self.clip_weights = device, precision, tile, clip_weights
        self.image_timeout = image_timeout
        self.max_models = max_models
        self._models: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._choosers: dict[str, AutoChooser] = {}
        self._deadline: float | None = None
        self.node_id, self.node_ip = _node()

    def _check_deadline(self, module: torch.nn.Module, args: Any) -> None:
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise ImageTimeout(f"over the per-image time limit of {self.image_timeout:g} s")

    def upscaler(self, spec: str, scale: int) -> Any:
        key = (spec, scale)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        up = load_upscaler(spec, scale, clip_weights=self.clip_weights, device=self.device,
                           precision=self.precision, tile=self.tile)
        network = getattr(up, "model", None)
        if isinstance(network, torch.nn.Module):
            network.register_forward_pre_hook(self._check_deadline)
        self._models[key] = up
        while len(self._models) > self.max_models:
            self._models.popitem(last=False)
        return up

    def _route_auto(self, row: dict[str, Any], lr: np.ndarray) -> str:
        """Choose this image's model (--route auto); record the choice in the row."""
        spec = row["model_spec"]
        if spec not in self._choosers:
            self._choosers[spec] = AutoChooser(spec)
        chosen, domain, version, similarity, embedding = self._choosers[spec].choose(imaging.to_rgb(lr))
        row.update(domain=domain, model_version=version, route_similarity=similarity,
                   route_embedding=pack_embedding(embedding))
        return chosen

    def upscale_row(self, row: dict[str, Any]) -> None:
        auto = row["model_spec"].startswith(AUTO_PREFIX)
        lr = to_float(R.unpack(row["lr"]))
        spec = self._route_auto(row, lr) if auto else row["model_spec"]
        up = self.upscaler(spec, int(row["scale"]))
        network = getattr(up, "model", None)
        if auto:  # the row records the model that ran; the index compares it with the next run's route
            row["model_id"] = up.describe()["id"]
            R.add_note(row, f"routed to {row['model_id']}")
        elif up.describe()["id"] != row["model_id"]:
            R.fail(row, f"model {row['model_spec']} is now {up.describe()['id']}, not the {row['model_id']} "
                        "the run was planned with; rerun")
            return
        fallbacks = getattr(up, "fp32_fallbacks", 0)
        start = time.monotonic()
        self._deadline = start + self.image_timeout
        try:
            encoder = getattr(up, "encoder", None)
            if encoder is not None:
                embedding = up.embed(imaging.to_rgb(lr))
                sr = up.upscale(lr, embedding=embedding)
            else:
                embedding, sr = None, up.upscale(lr)
        finally:
            self._deadline = None
        elapsed = time.monotonic() - start
        if elapsed > self.image_timeout:
            raise ImageTimeout(f"took {elapsed:.1f} s, over the per-image time limit of {self.image_timeout:g} s")
        if not np.isfinite(sr).all():
            R.fail(row, "model output has NaN or infinite values")
            return
        row["infer_s"] = elapsed
        row.update(infer_node_id=self.node_id, infer_node_ip=self.node_ip)
        if isinstance(network, torch.nn.Module):
            row["precision"] = "fp32" if up.fp32_fallbacks > fallbacks else up.precision
        if embedding is not None:
            row["clip_cosine"] = float(np.dot(embedding, encoder.embed_images([imaging.to_rgb(sr)])[0]))
        depth = output_bit_depth(int(row["input_bit_depth"]), row["output_format"])
        row["output_bit_depth"] = depth
        row["sr"] = R.pack(imaging.to_uint16(sr) if depth == 16 else imaging.to_uint8(sr))
        row["lr"] = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = R.from_table(batch)
        for row in rows:
            if not R.pending(row):
                continue
            try:
                self.upscale_row(row)
            except ImageTimeout as e:
                R.fail(row, f"inference stopped: {e}")
            except Exception as e:  # noqa: BLE001  one bad input must not fail the dataset
                R.fail(row, f"inference failed: {R.short_error(e)}")
        return R.to_table(rows)
