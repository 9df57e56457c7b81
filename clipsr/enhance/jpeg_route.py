"""JPEG inputs to a model trained on JPEG-compressed LR; clean inputs to the clean model.

The bundled x4 model was trained on clean bicubic downscales and sharpens JPEG artefacts; a model
trained on LR that went through JPEG (``data.degradation`` in a pretraining config, as in
configs/default-x4-jpeg.yaml) serves those inputs better.
The decode stage reads each input's JPEG quality from its quantisation tables (or estimates it for
a non-JPEG that shows a JPEG grid, :mod:`clipsr.jpeg`); an input at or below ``below`` goes to the
JPEG model. The planner treats the pair as one model, whose id names both networks and the
threshold: an unchanged input is not enhanced again while the pair is unchanged, and changing
either model or the threshold redoes the archive, as changing ``--model`` does.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

from clipsr.enhance.routing import ModelRef

PREFIX = "jpeg-pair:"


@dataclass(frozen=True)
class JpegPair:
    id: str  # the pair's model id (what the index and manifest's model_id hold)
    clean: str  # model spec for clean inputs
    jpeg: str  # model spec for JPEG inputs
    below: int  # inputs of this JPEG quality or lower go to ``jpeg``
    ids: dict[str, str]  # model spec -> the id the run was planned with

    def choose(self, quality: int | None) -> str:
        return self.jpeg if quality is not None and quality <= self.below else self.clean


def pair_ref(clean: ModelRef, jpeg: ModelRef, below: int) -> ModelRef:
    """One ModelRef for the pair: the spec the inference stage decodes, an id naming both models."""
    if clean.scale != jpeg.scale:
        raise ValueError(f"--jpeg-model is a x{jpeg.scale} model but --model is x{clean.scale}")
    if clean.clip_encoder != jpeg.clip_encoder:
        raise ValueError("--jpeg-model and --model use different CLIP encoders; they cannot share a run")
    if not 1 <= below <= 100:
        raise ValueError(f"--jpeg-below takes a quality in 1..100, got {below}")
    pair_id = pair_model_id(clean.id, jpeg.id, below)
    spec = PREFIX + json.dumps({"id": pair_id, "clean": clean.spec, "jpeg": jpeg.spec, "below": below,
                                "ids": {clean.spec: clean.id, jpeg.spec: jpeg.id}}, sort_keys=True)
    return replace(clean, spec=spec, id=pair_id)


def pair_model_id(clean_id: str, jpeg_id: str, below: int) -> str:
    """The id a run records for a pair: a change of either model or of the threshold is a new id."""
    return "jpeg-pair-" + hashlib.sha256(f"{clean_id}|{jpeg_id}|{below}".encode()).hexdigest()[:12]


def parse(spec: str) -> JpegPair | None:
    """The pair a model spec names, None for a plain spec."""
    if not spec.startswith(PREFIX):
        return None
    data = json.loads(spec[len(PREFIX):])
    return JpegPair(id=data["id"], clean=data["clean"], jpeg=data["jpeg"], below=int(data["below"]), ids=data["ids"])
