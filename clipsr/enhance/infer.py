"""Stage 2: upscale decoded inputs in an actor that loads each model once.

The actor keeps the last few models it used (routing may send it several). Each call takes a
batch of rows: images no larger than a tile that share a model and a size go through the network
together, as many as fill one batch of tiles (per-call overhead dominates small images); larger
images are tiled by the upscaler (overlapping tiles, blended seams, memory bounded by the tile
size). Reduced precision (bf16 by default on CPUs with AVX-512 BF16; bf16/fp16 on GPUs) falls
back to fp32 on non-finite outputs, and each row records what ran. The per-image time limit is
checked before every forward call of the network (a forward pre-hook), so a runaway image stops
within one tile batch; a batch of small images gets the limit once per image, and if it fails,
its images are run again one by one. Bicubic, which has no network, is checked when it returns.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from clipsr import imaging
from clipsr.enhance import jpeg_route
from clipsr.enhance import rows as R
from clipsr.enhance.decode import to_float
from clipsr.enhance.routing import AUTO_PREFIX, DEFAULT_DOMAIN, AutoChooser, pack_embedding
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

    def __init__(self, device: str = "cpu", precision: str = "auto", tile: int = 256,
                 clip_weights: str | None = None, threads: int | None = None,
                 image_timeout: float = 600.0, max_models: int = 2) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device, self.precision, self.tile, self.clip_weights = device, precision, tile, clip_weights
        self.image_timeout = image_timeout
        self.max_models = max_models
        self._models: OrderedDict[tuple[str, int, float | None], Any] = OrderedDict()
        self._choosers: dict[str, AutoChooser] = {}
        self._deadline: float | None = None
        self.node_id, self.node_ip = _node()

    def _check_deadline(self, module: torch.nn.Module, args: Any) -> None:
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise ImageTimeout(f"over the per-image time limit of {self.image_timeout:g} s")

    def upscaler(self, spec: str, scale: int, strength: float | None = None) -> Any:
        key = (spec, scale, strength)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        up = load_upscaler(spec, scale, clip_weights=self.clip_weights, device=self.device,
                           precision=self.precision, tile=self.tile, strength=strength)
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
        choice = self._choosers[spec].choose(imaging.to_rgb(lr))
        row.update(domain=choice.domain, model_version=choice.version, route_similarity=choice.similarity,
                   route_runner_up=choice.runner_up, route_margin=choice.margin,
                   route_descriptor=choice.descriptor, route_embedding=pack_embedding(choice.embedding))
        return choice.spec

    def _prepare(self, row: dict[str, Any]) -> tuple[Any, np.ndarray] | None:
        """Route the row and load its model: (upscaler, LR image), or None when the row failed."""
        auto = row["model_spec"].startswith(AUTO_PREFIX)
        lr = to_float(R.unpack(row["lr"]))
        spec = self._route_auto(row, lr) if auto else row["model_spec"]
        if auto and row["domain"] == DEFAULT_DOMAIN:  # --strength tones down domain models, not the source
            row["strength"] = None
        pair = jpeg_route.parse(spec)
        if pair is not None:  # JPEG inputs to the JPEG model, by the quality the decode stage read
            spec = pair.choose(row["input_jpeg_quality"])
        up = self.upscaler(spec, int(row["scale"]), row["strength"])
        ran = up.describe()["id"]
        if pair is not None:
            planned, row["model_id"] = pair.ids[spec], pair.id
        elif auto:  # the row records the model that ran; the index compares it with the next run's route
            planned = row["model_id"] = ran
            row["strength"] = getattr(up, "meta", {}).get("strength")
            R.add_note(row, f"routed to {ran}")
        else:
            planned = row["model_id"]
        if ran != planned:
            R.fail(row, f"model {spec} is now {ran}, not the {planned} the run was planned with; rerun")
            return None
        row["model_ran"] = ran
        return up, lr

    def _timed(self, run: Callable[[], Any], limit: float) -> tuple[Any, float]:
        start = time.monotonic()
        self._deadline = start + limit
        try:
            out = run()
        finally:
            self._deadline = None
        elapsed = time.monotonic() - start
        if elapsed > limit:
            raise ImageTimeout(f"took {elapsed:.1f} s, over the per-image time limit of {self.image_timeout:g} s")
        return out, elapsed

    def upscale_row(self, row: dict[str, Any]) -> None:
        """One row on its own, as a plain loop would run it (raises where ``__call__`` records)."""
        prepared = self._prepare(row)
        if prepared is not None:
            self.upscale_one(row, *prepared)

    def upscale_one(self, row: dict[str, Any], up: Any, lr: np.ndarray) -> None:
        encoder = getattr(up, "encoder", None)
        embedding = None if encoder is None else up.embed(imaging.to_rgb(lr))
        sr, elapsed = self._timed(lambda: up.upscale(lr, embedding=embedding) if encoder is not None
                                  else up.upscale(lr), self.image_timeout)
        self._finish(row, up, sr, elapsed)
        if embedding is not None and R.pending(row):
            row["clip_cosine"] = float(np.dot(embedding, encoder.embed_images([imaging.to_rgb(sr)])[0]))

    def upscale_group(self, rows: list[dict[str, Any]], up: Any, lrs: list[np.ndarray]) -> None:
        """Small images of one model and size in one forward pass; each row gets its share of the time."""
        srs, elapsed = self._timed(lambda: up.upscale_batch(lrs), self.image_timeout * len(rows))
        for row, sr in zip(rows, srs):
            self._finish(row, up, sr, elapsed / len(rows))

    def _finish(self, row: dict[str, Any], up: Any, sr: np.ndarray, elapsed: float) -> None:
        if not np.isfinite(sr).all():
            R.fail(row, "model output has NaN or infinite values")
            return
        row.update(infer_s=elapsed, infer_node_id=self.node_id, infer_node_ip=self.node_ip,
                   precision=getattr(up, "last_precision", None))
        depth = output_bit_depth(int(row["input_bit_depth"]), row["output_format"])
        row["output_bit_depth"] = depth
        row["sr"] = R.pack(imaging.to_uint16(sr) if depth == 16 else imaging.to_uint8(sr))
        row["lr"] = None

    def _guard(self, row: dict[str, Any], work: Callable[[], Any]) -> Any:
        """Run one row's work and return its result; whatever goes wrong becomes that row's failure."""
        try:
            return work()
        except ImageTimeout as e:
            R.fail(row, f"inference stopped: {e}")
        except Exception as e:  # noqa: BLE001  one bad input must not fail the dataset
            R.fail(row, f"inference failed: {R.short_error(e)}")
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = R.from_table(batch)
        groups: dict[tuple[int, tuple[int, int]], list[tuple[dict[str, Any], Any, np.ndarray]]] = {}
        for row in rows:
            if not R.pending(row):
                continue
            prepared = self._guard(row, lambda: self._prepare(row))
            if prepared is None:
                continue
            up, lr = prepared
            limit = up.batch_limit(*lr.shape[:2]) if hasattr(up, "batch_limit") else 0
            if limit < 2:
                self._guard(row, lambda: self.upscale_one(row, up, lr))
                continue
            group = groups.setdefault((id(up), lr.shape[:2]), [])
            group.append((row, up, lr))
            if len(group) == limit:
                self._run_group(groups.pop((id(up), lr.shape[:2])))
        for group in groups.values():
            self._run_group(group)
        return R.to_table(rows)

    def _run_group(self, group: list[tuple[dict[str, Any], Any, np.ndarray]]) -> None:
        rows, up = [g[0] for g in group], group[0][1]
        try:
            self.upscale_group(rows, up, [g[2] for g in group])
        except Exception:  # noqa: BLE001  one at a time, so each row gets its own result or reason
            for row, _, lr in group:
                self._guard(row, lambda: self.upscale_one(row, up, lr))


class InferGroups(InferStage):
    """Ray Data actor UDF over groups of decoded rows (``rows.group``): one call upscales a group."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        return R.per_group(super().__call__, batch)
