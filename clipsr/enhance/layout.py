"""Where a run's artefacts live, relative to the output prefix, and the names reserved for them.

    <output>/<relative key>                      enhanced images (same relative key as the input)
    <output>/_owner.json                         the input prefix this output prefix belongs to (owner.py)
    <output>/_lock                               the run lock (lock.py)
    <output>/_index/index.json, gen=<run>/...    latest ok or permanently failed state per key (index.py)
    <output>/_runs/<run_id>/plan/part-*.parquet  the work list of a running job; removed when it ends
    <manifest>/run=<run_id>/part-*.parquet       manifest rows (default manifest: <output>/_manifests)

An input whose output key would start with one of RESERVED is refused (a failed row), so that no
image can overwrite the job's own state. Outputs are keyed by the relative key alone, so an input
prefix and an output (or manifest) prefix that lie one inside the other are refused: the job would
read its own outputs as inputs, or write over its originals (``archive/archive/x.png`` onto
``archive/x.png``).
"""
from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass

from clipsr import storage

RESERVED = ("_owner.json", "_lock", "_index", "_runs", "_manifests")
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
    def create(cls, input_uri: str, output_uri: str, manifest_uri: str | None, run_id: str,
               single_file: str | None = None) -> "RunLayout":
        """``single_file``: the one file of ``input_uri`` that is listed (``--input`` named a file).
        Nothing else of that folder is read, so only an output prefix that is the folder itself
        is refused: the output would replace the input."""
        inp, out = _prefix(input_uri), _prefix(output_uri)
        man = _prefix(manifest_uri) if manifest_uri else f"{out}/_manifests"
        if single_file is None:
            _refuse_overlap("--output", out, inp)
            _refuse_overlap("--manifest", man, inp)
        elif out == inp:
            raise ValueError(f"--output {out} is the folder of --input {inp}/{single_file}, so the output would "
                             "replace the input; choose another --output")
        return cls(input=inp, output=out, manifest=man, run_id=run_id)

    @property
    def owner(self) -> str:
        return f"{self.output}/_owner.json"

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


def _refuse_overlap(flag: str, prefix: str, input_prefix: str) -> None:
    """Raise ValueError when ``flag``'s prefix and the input prefix are one, or one lies inside the other."""
    if prefix == input_prefix:
        problem = "they are the same prefix, so the job would write over its inputs"
    elif _inside(input_prefix, prefix):
        problem = f"{flag} lies inside --input, so the job would list its own files as inputs"
    elif _inside(prefix, input_prefix):
        problem = f"--input lies inside {flag}, so the job would write among its inputs"
        if flag == "--output":
            rel = storage.relative_key(prefix, input_prefix)
            problem += f" (the input key '{rel}/x.png' would be written over the input 'x.png')"
    else:
        return
    raise ValueError(f"{flag} {prefix} and --input {input_prefix} overlap: {problem}; "
                     "choose prefixes that do not contain each other")


def _inside(parent: str, child: str) -> bool:
    return child.startswith(parent.rstrip("/") + "/")
