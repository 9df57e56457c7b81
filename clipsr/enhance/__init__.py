"""The archive-enhancement job: object storage in, enhanced images and Parquet manifests out.

Data flows one way (see run.py for the order of events):

    listing ──> plan (driver, SQLite on local disk) ──> Ray Data: read+decode ──> infer (actor pool)
            ──> encode+write ──> manifest part ──> index update at the end of the run

Modules: layout (where a run's artefacts live), owner (which input an output prefix belongs to),
listing (key rules, output keys), routing (which model an input goes to), index (latest ok or
permanently failed state per key, for incremental runs), failures (which failures are permanent),
plan (decide process / skip / fail for every listed key), rows (the row schema between stages),
decode, infer, write (one stage each), quality (no-reference figures), manifest (columns, Parquet
parts), lock (one run per output prefix), pipeline (the Ray Data graph), options (the command line),
run (orchestration, exit status: ``run_enhance(EnhanceOptions(...)) -> RunResult``).
Nothing is imported here, so that ``clipsr --help`` stays fast.
"""
