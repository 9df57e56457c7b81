"""The driver side of source pretraining: Ray Train set-up, run, and export of the final model."""
from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from clipsr import storage
from clipsr.factory import create_model, load_checkpoint, save_checkpoint
from clipsr.train.data import list_training_images
from clipsr.train.embeddings import prepare_embeddings
from clipsr.train.loop import STATE_FILE, train_loop_per_worker

log = logging.getLogger("clipsr.train")


def run_dir(s: dict[str, Any]) -> str:
    return storage.join(s["storage_path"], s["name"])


def build_trainer(s: dict[str, Any], verbose: bool = False) -> TorchTrainer:
    """``verbose``: Ray Train's own INFO lines (resources, worker group, each report with its
    metrics, each checkpoint) reach the console too. Otherwise only its warnings do: the rest goes
    to its files under the Ray session's ``logs/train/``, but for each report's line, which repeats
    the step line and is dropped (see ``follow_log_level``)."""
    sc = s["scaling"]
    fs, path = storage.pyarrow_filesystem(s["storage_path"])
    level = "INFO" if verbose else "WARNING"
    return TorchTrainer(
        functools.partial(train_loop_per_worker, ray_train_log_level=level),
        train_loop_config=s,
        scaling_config=ScalingConfig(
            num_workers=sc["num_workers"], use_gpu=sc["use_gpu"],
            resources_per_worker={"CPU": sc["cpus_per_worker"], **({"GPU": 1} if sc["use_gpu"] else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if sc["use_gpu"] else "gloo"),
        run_config=RunConfig(
            name=s["name"],
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=s["checkpoint"]["keep"]),
            failure_config=FailureConfig(max_failures=s["failure"]["max_failures"]),
            logging_config=LoggingConfig(log_level=level),
        ),
    )


def export_model(s: dict[str, Any], checkpoint, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write the EMA weights of ``checkpoint`` as a clipsr model with its lineage; returns metadata."""
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    model = create_model(s["model"]["arch"], s["model"]["scale"])
    model.load_state_dict(state["ema"]["module"])
    if s["export"]["dtype"] == "float16":
        model = model.half()  # stored as float16; loading computes in float32
    parent = None
    if s["model"]["init_from"]:
        _, pmeta = load_checkpoint(s["model"]["init_from"])
        parent = {"id": pmeta["id"], "weights_sha256": pmeta["weights_sha256"]}
    clip = None
    if s["clip"]["arch"] is not None:
        from clipsr.clip import load_image_encoder

        clip = load_image_encoder(s["clip"]["arch"], s["clip"]["weights"], seed=s["clip"]["seed"]).identity.to_dict()
    uris = [u for u, _ in list_training_images(s["data"]["train"])]
    training_data = {
        "roots": s["data"]["train"], "images": len(uris), "steps": int(state["step"]),
        "attempt_start_steps": [int(x) for x in state["starts"]],
        "storage": f"{s['export']['dtype']} weights, computed in float32", "note": s["export"]["note"],
        "conditioning": ("learned null embedding, no CLIP encoder: no semantic prior" if clip is None
                         else f"CLIP embeddings of each image's x{s['model']['scale']} LR ({clip['arch']}, weights "
                              f"sha256 {clip.get('sha256')}); the null embedding trained on "
                              f"{s['clip']['null_rate']:.0%} of samples as the fallback without an encoder"),
    }
    out = storage.join(run_dir(s), "model.safetensors")
    meta = save_checkpoint(
        out, model, s["model"]["arch"], clip_encoder=clip, training_data=training_data, parent=parent,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))}, settings=s,
    )
    meta["uri"] = out
    return meta


def pretrain(s: dict[str, Any], verbose: bool = False) -> dict[str, Any]:
    """Train (or resume) the run ``s['name']`` under ``s['storage_path']`` and export its model."""
    prepare_embeddings(s)
    result = build_trainer(s, verbose).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint (error: {result.error})")
    meta = export_model(s, result.checkpoint, result.metrics or {})
    log.info("exported %s to %s", meta["id"], meta["uri"])
    return meta
