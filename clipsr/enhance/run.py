"""``clipsr enhance``: one run, from listing to index update, and its exit status.

Order of events (each step's output is what makes the next one safe to rerun):

1. refuse overlapping prefixes and an output prefix that belongs to another input (owner.py),
   resolve the model and the router (fail fast: exit 1 before anything is written);
2. check that the store enforces conditional writes, take the lock on the output prefix, claim the
   output prefix for this input if no input has, register the run in the index (``in_progress``);
   from here on the lock is checked before every write of state and at every progress report, and
   a lost lock stops the run (exit 1);
3. plan on the driver (plan.py): every listed key becomes a plan row, or a skipped, unsupported or
   failed manifest row written at once;
4. run the Ray Data pipeline over the plan: each output is committed, then its row streams back to
   the driver, which writes the manifest in parts every ``--commit-every`` seconds;
5. fold this run's ok and permanently failed rows (and those of earlier unfinished runs) into a new
   index generation;
6. remove the plan, release the lock, print one summary line.

Exit status: 0 when the run finished and (failed + unsupported) / (ok + failed + unsupported) is at
most ``--max-failed-fraction`` (an unsupported image is never done, like a failed one; skipped
inputs and failures carried forward from an earlier run were not attempted, so they count on
neither side);
2 when it finished above that; 1 when it could not complete (bad options, unreachable storage,
a held lock, a crashed pipeline). Killed or failed at any point, a rerun finishes the rest: ok rows
already in the manifest are folded into the index and their inputs skipped.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from clipsr import storage
from clipsr.progress import Progress
from clipsr.ray_runtime import init_ray, worker_env
from clipsr.enhance import index as idx
from clipsr.enhance import owner, plan
from clipsr.enhance.layout import RunLayout, new_run_id
from clipsr.enhance.listing import iter_inputs
from clipsr.enhance.lock import RunLock, require_conditional_store
from clipsr.enhance.options import EnhanceOptions
from clipsr.enhance.routing import Router, build_router, resolve_model

log = logging.getLogger(__name__)

EXIT_OK, EXIT_INCOMPLETE, EXIT_FAILED_ABOVE_THRESHOLD = 0, 1, 2
#: Seconds between progress lines in a log (a terminal's live line is redrawn as images finish).
PROGRESS_EVERY_S = 10.0


@dataclass
class RunResult:
    run_id: str
    exit_code: int
    summary: str
    manifest_uri: str | None = None
    counts: Counter = field(default_factory=Counter)  # ok / failed / skipped / unsupported, carried_forward
    listed: int = 0
    dry_run: bool = False


def attempted(counts: Counter) -> tuple[int, int]:
    """(not done, attempted) of this run: failed or unsupported, less what was carried forward from an
    earlier run without being attempted again."""
    not_done = counts["failed"] + counts["unsupported"] - counts["carried_forward"]
    return not_done, counts["ok"] + not_done


def failed_fraction(counts: Counter) -> float:
    failed, tried = attempted(counts)
    return failed / tried if tried else 0.0


def _absolute_spec(spec: str | None) -> str | None:
    """Local model paths made absolute: Ray workers do not share the driver's working directory."""
    if spec is None:
        return spec
    from clipsr.factory import absolute_spec  # imports torch

    return absolute_spec(spec)


def run_enhance(opts: EnhanceOptions, progress: TextIO | None = None) -> RunResult:
    """Run (or with ``dry_run`` plan) one enhancement; never raises: failures are exit status 1.

    Progress lines go to ``progress`` (default: the current sys.stderr)."""
    run_id = new_run_id()
    layout, locked = None, False
    try:
        opts.check()
        layout = RunLayout.create(opts.input, opts.output, opts.manifest, run_id)
        owner.check(layout)
        model = resolve_model(_absolute_spec(opts.model), opts.scale)
        router = build_router(model, opts.models, opts.route, opts.route_map, opts.domain,
                              threshold=opts.route_threshold)
        if opts.dry_run:
            return _dry_run(opts, layout, router, model.scale)
        require_conditional_store(layout.index, opts.allow_unconditional_writes)
        with RunLock(layout.lock, run_id, opts.lock_ttl) as lock:
            locked = True
            return _run(opts, layout, router, model.scale, lock, progress)
    except Exception as e:  # noqa: BLE001  every failure becomes exit 1 with a one-line reason
        log.debug("run %s failed", run_id, exc_info=True)
        where = f"; partial manifest: {layout.manifest_run()}/" if locked else ""
        return RunResult(run_id, EXIT_INCOMPLETE, f"clipsr enhance: run {run_id} could not complete: "
                                                  f"{one_line(e)}{where} (exit {EXIT_INCOMPLETE})",
                         dry_run=opts.dry_run)


def one_line(exc: BaseException) -> str:
    """The root cause of a failure on one line (Ray wraps worker errors in tracebacks)."""
    while getattr(exc, "cause", None) is not None or exc.__cause__ is not None:
        exc = getattr(exc, "cause", None) or exc.__cause__
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (ValueError, OSError)):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= 500 else text[:497] + "..."


def _plan(db: sqlite3.Connection, opts: EnhanceOptions, layout: RunLayout, router: Router, scale: int,
          index: idx.IndexStore, unfinished: list[dict[str, str]], sink: plan.PlanSink) -> plan.PlanCounts:
    plan.create_tables(db)
    idx.create_table(db)
    loaded = index.load(db, index.read_meta())
    for run in unfinished:
        merged = idx.merge_run(db, f"{run['manifest']}/run={run['run_id']}")
        log.info("folded %d rows of unfinished run %s into the index", merged, run["run_id"])
    try:
        outputs = plan.load_outputs(db, storage.iter_objects(layout.output))
    except FileNotFoundError:  # a first run into a folder that does not exist yet
        outputs = 0
    listed = plan.load_listing(db, iter_inputs(layout.input, [], opts.limit), opts.format, opts.max_input_bytes)
    log.info("listed %d input keys, %d outputs; index holds %d keys", listed, outputs, loaded)
    return plan.decide(db, layout, router, scale, opts.format, sink, retry_failed=opts.retry_failed)


def _dry_run(opts: EnhanceOptions, layout: RunLayout, router: Router, scale: int) -> RunResult:
    index = idx.IndexStore(layout.index)
    with tempfile.TemporaryDirectory(prefix="clipsr-enhance-") as tmp:
        db = sqlite3.connect(f"{tmp}/plan.sqlite")
        try:
            counts = _plan(db, opts, layout, router, scale, index, index.read_meta().in_progress, plan.CountingSink())
        finally:
            db.close()
    models = ", ".join(f"{n} with {m}" for m, n in counts.models.most_common()) or "none"
    reasons = "; ".join(f"{n} {r}" for r, n in counts.reasons.most_common(5))
    summary = (f"clipsr enhance: dry run: {counts.listed} listed: would process {counts.to_process} ({models}), "
               f"skip {counts.statuses['skipped']}, fail {counts.statuses['failed']}{_carried(counts.carried)}, "
               f"unsupported {counts.statuses['unsupported']}"
               + (f" [{reasons}]" if reasons else "") + "; nothing written (exit 0)")
    return RunResult(layout.run_id, EXIT_OK, summary, counts=Counter(counts.statuses, carried_forward=counts.carried),
                     listed=counts.listed, dry_run=True)


def _carried(count: int) -> str:
    """Rows carried forward unread from an earlier run (failed ones, and unsupported ones if any)."""
    return f" ({count} carried forward)" if count else ""


def _run(opts: EnhanceOptions, layout: RunLayout, router: Router, scale: int, lock: RunLock,
         progress: TextIO | None) -> RunResult:
    index = idx.IndexStore(layout.index)
    owner.claim(layout)
    unfinished = index.begin(layout.run_id, layout.manifest)
    _remove_stale_run_folders(layout)
    with tempfile.TemporaryDirectory(prefix="clipsr-enhance-") as tmp:
        db = sqlite3.connect(f"{tmp}/plan.sqlite")
        try:
            sink = plan.StorageSink(layout, lock.check)
            counts = _plan(db, opts, layout, router, scale, index, unfinished, sink)
            plan_parts = sink.close()
            totals = Counter(counts.statuses, carried_forward=counts.carried)
            if plan_parts:
                done = _run_pipeline(opts, layout, plan_parts, counts.to_process, progress, lock.check)
                if done["rows"] != counts.to_process:
                    raise RuntimeError(f"the pipeline returned {done['rows']} manifest rows for "
                                       f"{counts.to_process} planned inputs")
                totals.update({"ok": done["ok"], "failed": done["failed"]})
            lock.check()
            idx.merge_run(db, layout.manifest_run())
            index.commit(db, layout.run_id, [r["run_id"] for r in unfinished] + [layout.run_id])
        finally:
            db.close()
    for info in _iter_or_empty(layout.plan):
        storage.delete(info.uri)
    storage.remove_empty_folders(layout.runs)
    return _finish(opts, layout, counts.listed, totals)


def _run_pipeline(opts: EnhanceOptions, layout: RunLayout, plan_parts: list[str], total: int,
                  progress: TextIO | None, check_lock: Callable[[], None]) -> Counter:
    import ray

    from clipsr.enhance import autoscale, pipeline
    from clipsr.enhance.manifest import ManifestWriter

    started_here = init_ray(dashboard=False)
    try:
        nodes, device, max_actors = autoscale.nodes_for_run(
            opts.device, bool(os.environ.get("RAY_ADDRESS")), opts.gpu_wait, opts.actors, opts.max_actors,
            opts.actors_per_gpu)
        res = pipeline.plan_resources(nodes, device, opts.actors, opts.threads, max_actors, opts.actors_per_gpu)
        log.info("inference: %s", res.describe())
        ds = pipeline.build_dataset(plan_parts, res, worker_env(), opts.max_output_pixels, opts.precision,
                                    opts.tile, _absolute_spec(opts.clip_weights), opts.image_timeout,
                                    opts.batch_size, opts.max_input_bytes, rows=total)
        writer = ManifestWriter(layout.run_id, layout.manifest_run(), fence=check_lock,
                                every_s=opts.commit_every)
        bar = Progress("clipsr enhance", total, stream=progress or sys.stderr, every_s=PROGRESS_EVERY_S)

        def report(done: Counter) -> None:
            check_lock()  # a lost lock stops the pipeline here, within one block of rows
            bar.update(done["rows"], {"ok": done["ok"], "failed": done["failed"]})

        totals = pipeline.execute(ds, writer, report)
        bar.close()
        return totals
    finally:
        if started_here:
            ray.shutdown()


def _finish(opts: EnhanceOptions, layout: RunLayout, listed: int, totals: Counter) -> RunResult:
    fraction = failed_fraction(totals)
    failed, tried = attempted(totals)
    above = fraction > opts.max_failed_fraction
    code = EXIT_FAILED_ABOVE_THRESHOLD if above else EXIT_OK
    manifest_uri = layout.manifest_run() + "/"
    summary = (f"clipsr enhance: run {layout.run_id} finished: {listed} listed, {totals['ok']} ok, "
               f"{totals['failed']} failed{_carried(totals['carried_forward'])}, {totals['skipped']} skipped, "
               f"{totals['unsupported']} unsupported; failed or unsupported {failed} of {tried} attempted "
               f"({fraction:.1%}) {'>' if above else '<='} {opts.max_failed_fraction:.1%}; "
               f"manifest {manifest_uri} (exit {code})")
    kinds = ("ok", "failed", "skipped", "unsupported", "carried_forward")
    return RunResult(layout.run_id, code, summary, manifest_uri, Counter({k: totals[k] for k in kinds}), listed)


def _iter_or_empty(uri: str):
    try:
        yield from storage.iter_objects(uri)
    except FileNotFoundError:
        return


def _remove_stale_run_folders(layout: RunLayout) -> None:
    """Plans left by killed runs (their manifests stay: the index folds them in)."""
    for info in _iter_or_empty(layout.runs):
        if not info.key.startswith(f"{layout.run_id}/"):
            storage.delete(info.uri)

