"""Adapting many domains at once: one Ray task per domain, each publishing to the registry.

A domain is an independent unit of work with its own CPU (or GPU) budget, so N domains given N
times ``cpus_per_domain`` CPUs take about the time of one, on one node or across nodes. Ray tasks
rather than Ray Train or Tune: each domain is a short single-process job with no gradient exchange
and no trial search across domains, and a task failure is just that domain's failure. Each task
publishes its own result, so a finished domain is kept even if the driver dies.

A task asks Ray for ``cpus_per_domain`` CPUs and trains on as many torch threads. One CPU per
domain is the default: a domain's small network gains little from a second thread (a step on two
threads takes more than half the time of one), so a node adapts as many domains at once as it
has CPUs. Each report row and registry entry records when its domain started and finished, and on
which node, which shows whether domains really ran side by side.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

from clipsr import imaging, storage
from clipsr.adapt.fast import STOP_STEPS, adapt_domain, resolve_precision
from clipsr.adapt.progress import DomainProgress
from clipsr.adapt.routing_fit import fit_domain
from clipsr.adapt.settings import AdaptSettings
from clipsr.adapt.spec import DomainSpec
from clipsr.factory import encode_checkpoint, load_checkpoint_files, load_encoder_for
from clipsr.provenance import code_revision

log = logging.getLogger(__name__)

REPORT_COLUMNS = (
    "domain", "status", "error", "version", "ref", "promoted", "heldout_psnr_y_before",
    "heldout_psnr_y_after", "gain_db", "steps", "stop_reason", "lr", "scope", "shots", "seconds", "model_id",
    "started", "finished", "node_id",
)

#: A domain's task reports its progress at most this often (and at its first step and each scoring).
PROGRESS_EVERY_S = 2.0


def _iso(epoch: float) -> str:
    """UTC time to the millisecond: spans of domains a few seconds long must be comparable."""
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _node_id() -> str | None:
    """The Ray node this runs on (None outside Ray, as in ``clipsr bench adapt``)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - informational only
        return None


def read_shots(uris: list[str]) -> tuple[list[np.ndarray], list[dict[str, str]]]:
    """Exemplars as uint8 RGB arrays, with their URIs and content hashes (for the lineage)."""
    shots, exemplars = [], []
    for uri in uris:
        data = storage.retry(lambda uri=uri: storage.read_bytes(uri))
        try:
            img = imaging.load_rgb_or_grey_uint8(data)
        except imaging.ImageDecodeError as e:
            raise ValueError(f"exemplar {uri} cannot be read: {e}") from None
        shots.append(imaging.to_rgb(img))
        exemplars.append({"uri": uri, "sha256": hashlib.sha256(data).hexdigest()})
    return shots, exemplars


def adapt_one(
    spec: DomainSpec, source_spec: str, settings: AdaptSettings, registry_uri: str,
    routing_encoder: dict[str, Any], threads: int, clip_weights: str | None = None,
    on_progress: Callable[[DomainProgress], None] | None = None,
) -> dict[str, Any]:
    """Adapt and publish one domain; never raises: a failure is a report row. ``clip_weights``: the
    weights of the CLIP encoder a conditioned source model was trained with (as for evaluate);
    ``on_progress``: called every ``PROGRESS_EVERY_S`` seconds of training, and around scoring."""
    from clipsr.registry import Registry

    torch.set_num_threads(threads)
    t0, started = time.perf_counter(), time.time()
    row: dict[str, Any] = {"domain": spec.name, "status": "failed", "started": _iso(started), "node_id": _node_id()}
    last, last_phase = -PROGRESS_EVERY_S, ""

    def report(steps: int, total: int, gain: float | None, phase: str) -> None:
        nonlocal last, last_phase
        now = time.perf_counter()
        if on_progress is None or (phase == last_phase and steps > 1 and now - last < PROGRESS_EVERY_S):
            return
        last, last_phase = now, phase
        on_progress(DomainProgress(spec.name, steps, total, now - t0, gain, phase))

    try:
        source, smeta, source_files = load_checkpoint_files(source_spec)
        if spec.scale is not None and spec.scale != source.scale:
            raise ValueError(f"domain asks for x{spec.scale}, the source model is x{source.scale}")
        # A conditioned model adapts with the encoder it will run with (refused if it differs).
        encoder = load_encoder_for(smeta, clip_weights)
        uris = spec.exemplar_uris()
        shots, exemplars = read_shots(uris)
        # Recorded as it ran: "auto" precision resolved on this worker's hardware, the patch side at this scale.
        settings = dataclasses.replace(settings, precision=resolve_precision(settings.precision, settings.device),
                                       lr_patch=settings.patch_side(source.scale))
        if spec.degradation_from is not None and spec.degradation is None:
            raise ValueError(f"domain {spec.name}: its archive {spec.degradation_from} was not measured "
                             "(clipsr.adapt.archive_degradation.with_archive_degradations)")
        if spec.degradation is not None:  # the domain's own archive, resolved before the run
            settings = dataclasses.replace(settings, degradation=spec.degradation,
                                           degradation_from=spec.degradation_from)
        result = adapt_domain(source, smeta, shots, settings, encoder, report)
        role = {**dict.fromkeys(result.train_shots, "train"), **dict.fromkeys(result.heldout_shots, "heldout")}
        exemplars = [{**e, "role": role[i]} for i, e in enumerate(exemplars)]
        routing, centroid = fit_domain(result.shot_lrs, source.scale, routing_encoder, settings.degradation)
        scores = {
            "heldout_psnr_y_before": result.heldout_before, "heldout_psnr_y_after": result.heldout_after,
            "gain_db": result.gain_db, "heldout_shots": len(result.heldout_shots),
            "gate": "heldout_psnr_y_after > heldout_psnr_y_before", "selection_curve": result.curve,
        }
        # steps: what the published weights trained; stop_reason: "steps" when that is every step
        # planned (settings.steps), "time cap" when the safety cap on seconds cut it short.
        chosen = {"scope": result.scope, "lr": result.lr, "steps": result.steps, "probe_steps": result.probe_steps,
                  "stop_reason": result.stop_reason, "selection": dataclasses.asdict(settings)}
        data, meta = encode_checkpoint(
            result.model, smeta["arch"]["name"], clip_encoder=smeta["clip_encoder"],
            training_data={"domain": spec.name, "exemplars": exemplars},
            parent={"id": smeta["id"], "weights_sha256": smeta["weights_sha256"],
                    "file_sha256": hashlib.sha256(source_files[0]).hexdigest()},
            parent_spec=source_spec,
            metrics=scores, settings=chosen,
            delta_keys=None if result.scope == "all" else result.model.adaptation_names(result.scope),
        )
        promoted = result.heldout_after > result.heldout_before
        entry = {
            "domain": spec.name,  # "created" is the registry's, stamped as it publishes
            "model": {"id": meta["id"], "weights_sha256": meta["weights_sha256"], "kind": meta["kind"]},
            "source_model": {"id": smeta["id"], "weights_sha256": smeta["weights_sha256"], "spec": source_spec},
            "clip_encoder": smeta["clip_encoder"],
            "centroid_encoder": routing["encoder"],
            "exemplars": exemplars,
            "settings": chosen,
            "scores": scores,
            "seconds": time.perf_counter() - t0,
            "run": {"started": row["started"], "finished": _iso(time.time()), "node_id": row["node_id"],
                    "threads": threads},
            "code_revision": code_revision(),
            "promoted": promoted,
            "reason": (f"the published weights' Y-PSNR on {len(result.heldout_shots)} held-out exemplars, never "
                       f"trained on: {result.gain_db:+.3f} dB vs the source model"
                       + ("" if promoted else ": not better, kept but not promoted")),
            "notes": spec.notes,
            "routing": routing,  # last but the centroid: its embeddings would bury the lineage
        }
        # The registry keeps the source files, so the delta outlives the file it was adapted from.
        published = Registry(registry_uri).publish(spec.name, data, entry, centroid=centroid, promote=promoted,
                                                   sources=source_files)
        row.update(
            status="ok", version=published.version, ref=published.ref, promoted=promoted,
            heldout_psnr_y_before=result.heldout_before, heldout_psnr_y_after=result.heldout_after,
            gain_db=result.gain_db, steps=result.steps, stop_reason=result.stop_reason, lr=result.lr,
            scope=result.scope,
            shots=len(shots), model_id=meta["id"],
        )
    except Exception as e:  # noqa: BLE001 - one domain's failure must not stop the others
        log.exception("domain %s failed", spec.name)
        row["error"] = f"{type(e).__name__}: {e}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["finished"] = _iso(time.time())
    return row


def adapt_streaming(*args: Any) -> Iterator[dict[str, Any]]:
    """:func:`adapt_one` as a Ray generator task: ``{"progress": DomainProgress}`` items as the
    domain trains, then ``{"row": row}``. The training runs in a thread of the task, so the
    generator can hand each event to the driver as it comes."""
    events: queue.Queue[DomainProgress] = queue.Queue()
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(row=adapt_one(*args, on_progress=events.put)), daemon=True)
    worker.start()
    while worker.is_alive() or not events.empty():
        try:
            yield {"progress": events.get(timeout=0.5)}
        except queue.Empty:
            continue
    yield {"row": result["row"]}


def domains_at_once(node_cpus: list[float], cpus_per_domain: float) -> int:
    """How many domains of ``cpus_per_domain`` CPUs the nodes (their CPU counts) run at once."""
    if cpus_per_domain <= 0:
        raise ValueError(f"cpus_per_domain must be > 0, got {cpus_per_domain}")
    return sum(int(cpus / cpus_per_domain + 1e-9) for cpus in node_cpus)


def _cluster_cpus() -> list[float]:
    import ray

    return [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


def adapt_many(
    specs: list[DomainSpec], source_spec: str, settings: AdaptSettings, registry_uri: str,
    routing_encoder: dict[str, Any], cpus_per_domain: float = 1.0, gpus_per_domain: float = 0.0,
    on_done: Callable[[dict[str, Any]], None] | None = None, clip_weights: str | None = None,
    on_progress: Callable[[DomainProgress], None] | None = None,
) -> list[dict[str, Any]]:
    """Run :func:`adapt_one` for every spec as Ray tasks; rows come back in spec order. Each
    task streams its progress to ``on_progress`` as it trains, and its row to ``on_done``."""
    import ray

    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be unique, got {names}")
    if gpus_per_domain > 0:
        settings = dataclasses.replace(settings, device="cuda")
    at_once = domains_at_once(_cluster_cpus(), cpus_per_domain)
    if at_once == 0:
        log.warning("no node has %g CPUs for a domain: the domains wait until one joins (an autoscaler's); "
                    "lower --cpus-per-domain to use the nodes there are", cpus_per_domain)
    else:
        log.info("%d domain(s), %g CPU(s) each: up to %d at once on this cluster", len(specs), cpus_per_domain, at_once)
    task = ray.remote(num_cpus=cpus_per_domain, num_gpus=gpus_per_domain, max_retries=0)(adapt_streaming)
    threads = max(1, int(round(cpus_per_domain)))
    streams = {task.remote(s, source_spec, settings, registry_uri, routing_encoder, threads, clip_weights): s.name
               for s in specs}
    rows: dict[str, dict[str, Any]] = {}
    pending = list(streams)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        stream = ready[0]
        name = streams[stream]
        try:
            item = ray.get(next(stream))
        except StopIteration:
            item = {"row": {"domain": name, "status": "failed", "error": "the task ended without a result"}}
        except Exception as e:  # noqa: BLE001 - the worker itself died (OOM, node lost)
            item = {"row": {"domain": name, "status": "failed", "error": f"{type(e).__name__}: {e}"}}
        if "progress" in item:
            pending.append(stream)
            if on_progress is not None:
                on_progress(item["progress"])
            continue
        rows[name] = item["row"]
        if on_done is not None:
            on_done(item["row"])
    return [rows[n] for n in names]


def write_report(rows: list[dict[str, Any]], uri_base: str) -> tuple[str, str]:
    """The report as JSON and Parquet (``uri_base`` + .json / .parquet)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: [r.get(c) for r in rows] for c in REPORT_COLUMNS})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(uri_base + ".parquet", buf.getvalue())
    storage.write_bytes_atomic(uri_base + ".json", json.dumps(rows, indent=2, default=str).encode())
    return uri_base + ".json", uri_base + ".parquet"


def format_report(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'domain':<16}{'status':<8}{'version':>8}{'before':>9}{'after':>9}{'gain dB':>9}"
             f"{'steps':>7}{'lr':>9}{'secs':>7}  note"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['domain']:<16}{r['status']:<8}{'':>57}  {r.get('error', '')}")
            continue
        note = "promoted" if r["promoted"] else "NOT promoted (no held-out gain)"
        if r.get("stop_reason") not in (None, STOP_STEPS):
            note += f"; stopped early: {r['stop_reason']}"
        lines.append(
            f"{r['domain']:<16}{r['status']:<8}{'v' + str(r['version']):>8}{r['heldout_psnr_y_before']:>9.3f}"
            f"{r['heldout_psnr_y_after']:>9.3f}{r['gain_db']:>+9.3f}{r['steps']:>7}{r['lr']:>9.1e}"
            f"{r['seconds']:>7.0f}  {note}"
        )
    return "\n".join(lines)
