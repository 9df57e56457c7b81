"""Where a run's artefacts live, relative to the output prefix, and the names reserved for them.

    <output>/<relative key>                      enhanced images (same relative key as the input)
    <output>/_lock                               the run lock (lock.py)
    <output>/_index/index.json, gen=<run>/...    latest ok state per key (index.py)
    <output>/_runs/<run_id>/plan/part-*.parquet  the work list of a running job; removed when it ends
    <manifest>/run=<run_id>/part-*.parquet       manifest rows (default manifest: <output>/_manifests)

An input whose output key would start with one of RESERVED is refused (a failed row), so that no
image can overwrite the job's own state.
"""
from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass

from clipsr import storage

RESERVED = ("_lock", "_index", "_runs", "_manifests")
RUN_ID_PATTERN = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}$")


def new_run_id(now: dt.datetime | None = None) -> str:
    """``20261126T221500Z-3fa9c1``: the UTC start time first, so run ids sort by time."""
    now = now or dt.datetime.now(dt.timezone.utc)
    if now.tzinfo is None:
        raise ValueError("run ids are made from timezone-aware times")
    stamp = now.astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def _prefix(uri: str) -> str:
    """Absolute (for local paths), without a trailing slash: the form every URI here is joined in."""
    uri = storage.absolute(uri)
    stripped = uri.rstrip("/")
    return stripped or uri


@dataclass(frozen=True)
class RunLayout:
    input: str
    output: str
    manifest: str
    run_id: str

    @classmethod
    def create(cls, input_uri: str, output_uri: str, manifest_uri: str | None, run_id: str) -> "RunLayout":
        inp, out = _prefix(input_uri), _prefix(output_uri)
        man = _prefix(manifest_uri) if manifest_uri else f"{out}/_manifests"
        if inp == out:
            raise ValueError("--output must differ from --input (outputs would overwrite the originals)")
        if _inside(out, inp) and storage.relative_key(out, inp).split("/", 1)[0] in RESERVED:
            raise ValueError(f"--input {input_uri} lies inside the job's own state under {output_uri}")
        return cls(input=inp, output=out, manifest=man, run_id=run_id)

    @property
    def lock(self) -> str:
        return f"{self.output}/_lock"

    @property
    def index(self) -> str:
        return f"{self.output}/_index"

    @property
    def runs(self) -> str:
        return f"{self.output}/_runs"

    @property
    def plan(self) -> str:
        return f"{self.runs}/{self.run_id}/plan"

    def manifest_run(self, run_id: str | None = None) -> str:
        return f"{self.manifest}/run={run_id or self.run_id}"

    def output_uri(self, output_key: str) -> str:
        return storage.join(self.output, output_key)

    def excluded_input_prefixes(self) -> list[str]:
        """Relative prefixes (ending in '/') inside the input that hold this job's outputs or
        manifests: listing them as inputs would feed the job its own results."""
        found = []
        for uri in (self.output, self.manifest):
            if _inside(self.input, uri):
                found.append(storage.relative_key(self.input, uri) + "/")
        return found


def _inside(parent: str, child: str) -> bool:
    return child.startswith(parent + "/")
