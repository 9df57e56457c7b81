"""``clipsr enhance``: one run, from listing to index update, and its exit status.

Order of events (each step's output is what makes the next one safe to rerun):

1. refuse a missing input (or an object-store prefix with no objects), an output that is a file,
   overlapping prefixes and an output prefix that belongs to another input (owner.py), resolve
   the model and the router (fail fast: exit 1 before anything is written; ``--input`` may also
   name one file, keyed by its name);
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
6. remove the plan, release the lock; name the failed inputs (failure_list.py), then print one
   summary line, which names the file Ray's own output went to (clipsr.ray_logs).

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
from typing import Any, TextIO

from clipsr import storage
from clipsr import ray_logs
from clipsr.progress import Progress
from clipsr.ray_runtime import init_ray, ray_log, shutdown_ray, worker_env
from clipsr.enhance import index as idx
from clipsr.enhance import manifest, owner, plan
from clipsr.enhance.failure_list import FailureList
from clipsr.enhance.layout import RunLayout, new_run_id
from clipsr.enhance.listing import InputSource, iter_inputs, refuse_file, resolve_input
from clipsr.enhance.lock import RunLock, require_conditional_store
from clipsr.enhance.manifest import ManifestWriter
from clipsr.enhance.options import DEFAULT_JPEG_BELOW, EnhanceOptions
from clipsr.enhance import jpeg_route
from clipsr.enhance.routing import ModelRef, Router, at_strength, build_router, resolve_model

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
    named: list[str] = field(default_factory=list)  # lines printed above the summary: the inputs that failed


@dataclass
class _Notes:
    """What a run gathers for its summary, whether it finishes or not."""
    source: InputSource | None = None
    failures: FailureList = field(default_factory=FailureList)
    ray_log: str | None = None  # where Ray's own output went, when this run started Ray quietly


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


def run_enhance(opts: EnhanceOptions, progress: TextIO | None = None, verbose: bool = False) -> RunResult:
    """Run (or with ``dry_run`` plan) one enhancement; never raises: failures are exit status 1.

    Progress lines go to ``progress`` (default: the current sys.stderr). Unless ``verbose``, Ray's
    own output goes to a file (when this run starts Ray) and Ray Data draws no progress bars."""
    run_id = new_run_id()
    layout, locked, notes = None, False, _Notes()
    try:
        opts.check()
        notes.source = resolve_input(opts.input)
        refuse_file(opts.output, "--output")
        refuse_file(opts.manifest, "--manifest")
        single = notes.source.file.key if notes.source.file else None
        layout = RunLayout.create(notes.source.prefix, opts.output, opts.manifest, run_id, single_file=single)
        owner.check(layout)
        model, strength = _source_model(opts)
        router = build_router(model, opts.models, opts.route, opts.route_map, opts.domain,
                              threshold=opts.route_threshold, strength=strength)
        if opts.dry_run:
            return _dry_run(opts, layout, router, model.scale, notes)
        require_conditional_store(layout.index, opts.allow_unconditional_writes)
        with RunLock(layout.lock, run_id, opts.lock_ttl) as lock:
            locked = True
            return _run(opts, layout, router, model.scale, lock, progress, verbose, notes)
    except Exception as e:  # noqa: BLE001  every failure becomes exit 1 with a one-line reason
        log.debug("run %s failed", run_id, exc_info=True)
        where = ""
        if locked and any(True for _ in manifest.iter_parts(layout.manifest_run())):
            where = f"; partial manifest: {layout.manifest_run()}/"
        if notes.ray_log:
            where += f"; Ray's log: {notes.ray_log}"
        return RunResult(run_id, EXIT_INCOMPLETE, f"clipsr enhance: run {run_id} could not complete: "
                                                  f"{one_line(e)}{where} (exit {EXIT_INCOMPLETE})",
                         dry_run=opts.dry_run, named=notes.failures.lines())


def _bundled_pins(jpeg_below: int) -> dict[str, str]:
    """Model id a run records -> the options that bring that model back: a bundled model's own id
    (with ``--jpeg-model none`` where it has a JPEG companion that would pair it), and the id of its
    pair with that companion at this run's ``--jpeg-below``."""
    from clipsr.factory import BUNDLED_JPEG, bundled_file_ids, pin_name  # imports torch

    files = bundled_file_ids()
    pins = {}
    for file, model_id in files.items():
        jpeg = BUNDLED_JPEG.get(file)
        pins[model_id] = f"--model {pin_name(file)}" + (" --jpeg-model none" if jpeg else "")
        if jpeg in files:
            pins[jpeg_route.pair_model_id(model_id, files[jpeg], jpeg_below)] = f"--model {pin_name(file)}"
    return pins


def _source_model(opts: EnhanceOptions) -> tuple[ModelRef, float | None]:
    """``--model`` as the run records it, and the strength left for the router's domain models.

    ``--scale`` must match the model unless ``--outscale`` sets the output size (bicubic runs at
    ``--scale`` either way). Without routing, ``--strength`` applies to ``--model`` itself (refused
    below 1 unless it is adapted); with routing, to the domain models only."""
    spec = _absolute_spec(opts.model)
    model = resolve_model(spec, opts.scale if opts.outscale is None or spec == "bicubic" else None)
    if opts.scale is not None and model.scale != opts.scale:
        log.info("--scale %d: %s is a x%d model; --outscale %g sets the output size", opts.scale, model.id,
                 model.scale, opts.outscale)
    model = _with_jpeg_model(model, opts)
    if any(x is not None for x in (opts.route, opts.route_map, opts.domain)):
        return model, opts.strength
    return at_strength(model, opts.strength), None


def _with_jpeg_model(model: ModelRef, opts: EnhanceOptions) -> ModelRef:
    """``--model`` paired with ``--jpeg-model`` (:mod:`clipsr.enhance.jpeg_route`), or as it is."""
    from clipsr.factory import BUNDLED, BUNDLED_JPEG

    jpeg_model = opts.jpeg_model
    if jpeg_model == "auto":
        jpeg_model = BUNDLED_JPEG.get(BUNDLED.get(opts.model, ""))
    if jpeg_model in (None, "none"):
        return model
    if opts.strength != 1.0 and not model.adapted:
        return model  # --strength refuses a plain model below 1 with its own message
    return jpeg_route.pair_ref(model, resolve_model(_absolute_spec(jpeg_model), None), opts.jpeg_below)


def one_line(exc: BaseException) -> str:
    """The root cause of a failure on one line (Ray wraps worker errors in tracebacks)."""
    while getattr(exc, "cause", None) is not None or exc.__cause__ is not None:
        exc = getattr(exc, "cause", None) or exc.__cause__
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (ValueError, OSError)):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= 500 else text[:497] + "..."


def _plan(db: sqlite3.Connection, opts: EnhanceOptions, layout: RunLayout, router: Router, scale: int,
          index: idx.IndexStore, unfinished: list[dict[str, str]], sink: plan.PlanSink,
          source: InputSource) -> plan.PlanCounts:
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
    inputs = [source.file] if source.file else iter_inputs(layout.input, [], opts.limit)
    listed = plan.load_listing(db, inputs, opts.format, opts.max_input_bytes)
    log.info("listed %d input keys, %d outputs; index holds %d keys", listed, outputs, loaded)
    counts = plan.decide(db, layout, router, scale, opts.format, sink, retry_failed=opts.retry_failed,
                         settings=opts.output_settings())
    _warn_model_changed(counts.model_changed, opts.jpeg_below)
    return counts


def _warn_model_changed(changed: Counter, jpeg_below: int = DEFAULT_JPEG_BELOW) -> None:
    """Name the inputs redone only because their model is not the one that made their output:
    after an upgrade that replaced a bundled model, the versioned name keeps the earlier one."""
    pins = _bundled_pins(jpeg_below) if changed else {}
    ranked = changed.most_common()
    for (before, now), n in ranked[:_MODEL_CHANGES_NAMED]:
        pin = f"; to keep the earlier model, run with {pins[before]}" if before in pins else ""
        log.warning("%d unchanged inputs are enhanced again: their output is from model %s, this run's is %s%s",
                    n, before, now, pin)
    if len(ranked) > _MODEL_CHANGES_NAMED:
        rest = ranked[_MODEL_CHANGES_NAMED:]
        log.warning("%d more unchanged inputs are enhanced again, under %d other changes of model",
                    sum(n for _, n in rest), len(rest))


#: Changes of model named one per line before a run (the most inputs first); the rest in one line.
_MODEL_CHANGES_NAMED = 5


class _NamingSink:
    """A plan sink that also notes, for the summary, the rows worth naming; in a dry run, inputs
    listed with zero bytes are named as the failures they will be (``predict_empty``)."""

    def __init__(self, inner: plan.PlanSink, failures: FailureList, predict_empty: bool = False) -> None:
        self.inner, self.failures, self.predict_empty = inner, failures, predict_empty
        self.predicted: Counter = Counter()  # model id -> inputs that will fail for want of bytes

    def process(self, row: dict[str, Any]) -> None:
        if self.predict_empty and row.get("input_size") == 0:
            self.predicted[row["model_id"]] += 1
            self.failures.add({**row, "status": "failed", "error": EMPTY_FILE})
        self.inner.process(row)

    def record(self, row: dict[str, Any]) -> None:
        self.failures.add(row)
        self.inner.record(row)


#: The reason imaging.decode gives a zero-byte input, predicted from the listing by a dry run.
EMPTY_FILE = "empty file (0 bytes)"


def _dry_run(opts: EnhanceOptions, layout: RunLayout, router: Router, scale: int, notes: _Notes) -> RunResult:
    index = idx.IndexStore(layout.index)
    sink = _NamingSink(plan.CountingSink(), notes.failures, predict_empty=True)
    with tempfile.TemporaryDirectory(prefix="clipsr-enhance-") as tmp:
        db = sqlite3.connect(f"{tmp}/plan.sqlite")
        try:
            counts = _plan(db, opts, layout, router, scale, index, index.read_meta().in_progress, sink, notes.source)
        finally:
            db.close()
    predicted = sum(sink.predicted.values())
    statuses = counts.statuses + Counter({"failed": predicted})
    reasons = counts.reasons + Counter({f"failed: {EMPTY_FILE}": predicted})
    models = ", ".join(f"{n} with {m}" for m, n in (counts.models - sink.predicted).most_common()) or "none"
    reasons_text = "; ".join(f"{n} {r}" for r, n in reasons.most_common(5))
    summary = (f"clipsr enhance: dry run: {counts.listed} listed: would process {counts.to_process - predicted} "
               f"({models}), skip {statuses['skipped']}, fail {statuses['failed']}{_carried(counts.carried)}, "
               f"unsupported {statuses['unsupported']}"
               + (f" [{reasons_text}]" if reasons_text else "") + "; nothing written (exit 0)")
    return RunResult(layout.run_id, EXIT_OK, summary, counts=Counter(statuses, carried_forward=counts.carried),
                     listed=counts.listed, dry_run=True, named=notes.failures.lines(predicted=True))


def _carried(count: int) -> str:
    """Rows carried forward unread from an earlier run (failed ones, and unsupported ones if any)."""
    return f" ({count} carried forward)" if count else ""


def _run(opts: EnhanceOptions, layout: RunLayout, router: Router, scale: int, lock: RunLock,
         progress: TextIO | None, verbose: bool, notes: _Notes) -> RunResult:
    index = idx.IndexStore(layout.index)
    owner.claim(layout)
    unfinished = index.begin(layout.run_id, layout.manifest)
    _remove_stale_run_folders(layout)
    with tempfile.TemporaryDirectory(prefix="clipsr-enhance-") as tmp:
        db = sqlite3.connect(f"{tmp}/plan.sqlite")
        try:
            sink = plan.StorageSink(layout, lock.check)
            counts = _plan(db, opts, layout, router, scale, index, unfinished, _NamingSink(sink, notes.failures),
                           notes.source)
            plan_parts = sink.close()
            totals = Counter(counts.statuses, carried_forward=counts.carried)
            if plan_parts:
                done = _run_pipeline(opts, layout, plan_parts, counts.to_process, progress, lock.check, verbose,
                                     notes)
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
    return _finish(opts, layout, counts.listed, totals, notes)


class _NamingWriter(ManifestWriter):
    """The manifest writer, noting the failed rows for the summary as they arrive."""

    def __init__(self, failures: FailureList, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures = failures

    def add(self, batch: Any) -> Counter:
        statuses = super().add(batch)
        if statuses["failed"]:
            for row in batch.select(["input_key", "status", "error"]).to_pylist():
                self.failures.add(row)
        return statuses


def _run_pipeline(opts: EnhanceOptions, layout: RunLayout, plan_parts: list[str], total: int,
                  progress: TextIO | None, check_lock: Callable[[], None], verbose: bool, notes: _Notes) -> Counter:
    import ray
    import ray.data

    from clipsr.enhance import autoscale, pipeline

    try:
        started_here = init_ray(dashboard=False, quiet=not verbose)
    except Exception:
        notes.ray_log = None if verbose else ray_logs.last_path()  # why Ray did not start is there
        raise
    notes.ray_log = ray_log()
    try:
        ray_logs.quiet_data(ray.data.DataContext.get_current(), verbose)
        nodes, device, max_actors = autoscale.nodes_for_run(
            opts.device, bool(os.environ.get("RAY_ADDRESS")), opts.gpu_wait, opts.actors, opts.max_actors,
            opts.actors_per_gpu)
        res = pipeline.plan_resources(nodes, device, opts.actors, opts.threads, max_actors, opts.actors_per_gpu)
        log.info("inference: %s", res.describe())
        ds = pipeline.build_dataset(plan_parts, res, worker_env(), opts.max_output_pixels, opts.precision,
                                    opts.tile, _absolute_spec(opts.clip_weights), opts.image_timeout,
                                    opts.batch_size, opts.max_input_bytes, rows=total)
        writer = _NamingWriter(notes.failures, layout.run_id, layout.manifest_run(), fence=check_lock,
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
            shutdown_ray()


def _finish(opts: EnhanceOptions, layout: RunLayout, listed: int, totals: Counter, notes: _Notes) -> RunResult:
    fraction = failed_fraction(totals)
    failed, tried = attempted(totals)
    above = fraction > opts.max_failed_fraction
    code = EXIT_FAILED_ABOVE_THRESHOLD if above else EXIT_OK
    manifest_uri = layout.manifest_run() + "/"
    ray_note = f"; Ray's log: {notes.ray_log}" if notes.ray_log else ""
    summary = (f"clipsr enhance: run {layout.run_id} finished: {listed} listed, {totals['ok']} ok, "
               f"{totals['failed']} failed{_carried(totals['carried_forward'])}, {totals['skipped']} skipped, "
               f"{totals['unsupported']} unsupported; failed or unsupported {failed} of {tried} attempted "
               f"({fraction:.1%}) {'>' if above else '<='} {opts.max_failed_fraction:.1%}; "
               f"manifest {manifest_uri}{ray_note} (exit {code})")
    kinds = ("ok", "failed", "skipped", "unsupported", "carried_forward")
    return RunResult(layout.run_id, code, summary, manifest_uri, Counter({k: totals[k] for k in kinds}), listed,
                     named=notes.failures.lines(manifest_uri))


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

