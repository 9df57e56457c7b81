"""The per-worker training loop that Ray Train runs (one copy per worker).

Resumable: everything a step depends on (model, EMA, optimiser, schedule, step) is in the
checkpoint, and the patch sampler is reseeded from (seed, rank, step), so a resumed run
continues rather than restarts.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import ray.train
import torch
import torch.nn.functional as F

from clipsr import imaging, storage
from clipsr.evaluate import score_image
from clipsr.factory import create_model, load_checkpoint
from clipsr.inference import NetworkUpscaler
from clipsr.losses import CompositeLoss, LossWeights, PerceptualLoss
from clipsr.degradations import Degradation
from clipsr.train.data import PatchSampler, list_training_images, load_shard
from clipsr.train.ema import ModelEMA
from clipsr.train.embeddings import read_embeddings
from clipsr.train.episodes import reptile_episode

log = logging.getLogger("clipsr.train")

STATE_FILE = "state.pt"


class InjectedFailure(RuntimeError):
    """Raised on purpose by ``failure.fail_at_step`` to exercise recovery."""


def lr_at(step: int, s: dict[str, Any]) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``min_lr``."""
    o = s["optim"]
    if step < o["warmup"]:
        return o["lr"] * (step + 1) / o["warmup"]
    t = (step - o["warmup"]) / max(1, o["steps"] - o["warmup"])
    return o["min_lr"] + 0.5 * (o["lr"] - o["min_lr"]) * (1 + math.cos(math.pi * min(1.0, t)))


def _domain_pools(images, labels: dict[str, int] | None) -> dict[int, list[int]]:
    pools: dict[int, list[int]] = {}
    for i, img in enumerate(images):
        d = labels[img.uri] if labels is not None else img.domain
        pools.setdefault(d, []).append(i)
    return pools


def _validate(ema_model, s: dict[str, Any], val_images: dict[str, list[np.ndarray]], encoder) -> dict[str, float]:
    meta = {"id": "ema", "scale": s["model"]["scale"], "clip_encoder": None}
    up = NetworkUpscaler(ema_model, meta, encoder=encoder)
    return {
        f"val/{name}/psnr_y": float(np.mean([score_image(up, hr, up.scale)["psnr_y"] for hr in imgs]))
        for name, imgs in val_images.items()
    }


def follow_log_level(level: str) -> None:
    """Ray Train 2.60 logs each report (its metrics and checkpoint) at INFO from a logger named after
    its source file, outside ``ray.train``, where RunConfig's LoggingConfig does not reach: that
    logger gets the run's level too, so a quiet console shows the step lines once, not twice. The
    module is Ray's private one: where another Ray lacks it, the lines show and training goes on."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(level)


def train_loop_per_worker(s: dict[str, Any], ray_train_log_level: str = "INFO") -> None:
    follow_log_level(ray_train_log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = s["scaling"]["torch_threads"] or max(1, math.ceil(s["scaling"]["cpus_per_worker"]))
    torch.set_num_threads(threads)
    torch.manual_seed(s["seed"])  # identical initial weights on every worker
    device = ray.train.torch.get_device()
    scale, batch, lr_patch = s["model"]["scale"], s["batch"]["size"], s["batch"]["lr_patch"]

    model = create_model(s["model"]["arch"], scale)
    if s["model"]["init_from"]:
        # tensors of matching shape carry over: a x2 model can start from a x4 one's body
        own = model.state_dict()
        src, _ = load_checkpoint(s["model"]["init_from"])
        same = {k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(same, strict=False)
        if rank == 0:
            log.info("initialised %d of %d tensors from %s", len(same), len(own), s["model"]["init_from"])
    ema = ModelEMA(model, s["optim"]["ema_decay"])
    opt = torch.optim.AdamW(model.parameters(), lr=s["optim"]["lr"], weight_decay=s["optim"]["weight_decay"])
    step, starts = 0, []
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        starts = [int(x) for x in state["starts"]]
        if rank == 0:
            log.info("resumed from checkpoint at step %d", step)
    starts.append(step)  # where each attempt began: the run's recovery history
    ema.to(device)
    ddp = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, nccl on GPU) when world > 1
    net = ddp.module if hasattr(ddp, "module") else ddp

    items = list_training_images(s["data"]["train"])
    images = load_shard(items, rank, world, lr_patch * scale, s["data"]["max_pixels"])
    sampler = PatchSampler(images, scale, lr_patch, seed=s["seed"] * 1000003 + rank * 7919 + step,
                           degradation=Degradation.from_dict(s["data"].get("degradation")))
    emb_table, labels, encoder = read_embeddings(s, [img.uri for img in images])
    pools = _domain_pools(images, labels)

    def embed(idx: list[int]) -> torch.Tensor | None:
        """The CLIP vectors of the sampled patches' images (their whole LR; see train.embeddings)."""
        if emb_table is None or s["clip"]["arch"] is None:
            return None
        return torch.from_numpy(np.stack([emb_table[images[i].uri] for i in idx])).to(device)

    def null_mask(emb: torch.Tensor | None) -> torch.Tensor | None:
        """Which samples train the null embedding instead of their own (``clip.null_rate`` of them),
        so that a model run without an encoder falls back on a trained vector, not its random start."""
        if emb is None:
            return None
        return torch.from_numpy(sampler.rng.random(emb.shape[0]) < s["clip"]["null_rate"]).to(device)

    weights = LossWeights(**{k: s["loss"][k] for k in ("pixel", "perceptual", "semantic")})
    perceptual = (
        PerceptualLoss.from_weights(s["loss"]["perceptual_weights"]).to(device)
        if weights.perceptual > 0 else None
    )
    loss_fn = CompositeLoss(weights, perceptual=perceptual, encoder=encoder if weights.semantic > 0 else None)
    amp = s["optim"]["amp"] and device.type == "cuda"
    adapt_params = net.adaptation_parameters(s["episodes"]["scope"])

    val_images: dict[str, list[np.ndarray]] = {}
    if rank == 0:
        for name, uri in s["data"]["val"].items():
            val_images[name] = [imaging.load_rgb_or_grey_uint8(storage.read_bytes(u)) for u in storage.list_images(uri)]

    fail_at = s["failure"]["fail_at_step"]
    fail_rank = min(1, world - 1)
    total = s["optim"]["steps"]
    start_step, t0, running = step, time.perf_counter(), []
    t_window, patches_window = t0, 0
    while step < total:
        if fail_at is not None and step == fail_at and resumed is None and rank == fail_rank:
            raise InjectedFailure(f"injected failure at step {step} on rank {rank}")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s)
        lr_img, hr_img, idx = sampler.sample(batch)
        lr_img, hr_img = lr_img.to(device), hr_img.to(device)
        emb = embed(idx)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            sr = ddp(lr_img, emb, null_mask(emb))
            loss, terms = loss_fn(sr.float(), hr_img)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s["optim"]["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s["optim"]["grad_clip"])
        opt.step()
        ep = s["episodes"]
        if ep["enabled"] and len(pools) > 1 and (step + 1) % ep["every"] == 0:
            domain = list(pools)[int(sampler.rng.integers(len(pools)))]

            def episode_batches():
                for _ in range(ep["inner_steps"]):
                    a, b, i = sampler.sample(batch, pools[domain])
                    yield a.to(device), b.to(device), embed(i)

            reptile_episode(net, adapt_params, episode_batches(), ep["inner_lr"], ep["meta_lr"], F.l1_loss)
        ema.update(net)
        step += 1
        patches_window += batch * world
        running.append(float(loss.detach()))

        log_now = step % s["validation"]["log_every"] == 0 or step == total
        ckpt_now = step % s["checkpoint"]["every"] == 0 or step == total
        if not (log_now or ckpt_now):
            continue
        now = time.perf_counter()
        elapsed = now - t0
        metrics: dict[str, Any] = {  # patches_per_s: over the steps since the last report
            "step": step, "loss": float(np.mean(running)), "lr": lr_at(step - 1, s),
            "patches_per_s": patches_window / (now - t_window), **{f"loss/{k}": v for k, v in terms.items()},
        }
        t_window, patches_window = now, 0
        running.clear()
        if rank == 0 and val_images and (step % s["validation"]["every"] == 0 or step == total):
            metrics.update(_validate(ema.module, s, val_images, encoder))
        if rank == 0:
            eta_min = (total - step) * elapsed / max(1, step - start_step) / 60
            log.info("step %d/%d loss %.4f lr %.2e %.1f patches/s eta %.1f min %s", step, total,
                     metrics["loss"], metrics["lr"], metrics["patches_per_s"], eta_min,
                     " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith("val/")))
        if ckpt_now:
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    torch.save({"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                "step": step, "starts": torch.tensor(starts)}, os.path.join(d, STATE_FILE))
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics)
