"""Which input prefix an output prefix belongs to, so that two jobs never share one output prefix.

Outputs and the index are keyed by the relative key alone: a job with another input and the same
output would overwrite the first job's outputs with its own images of the same names, and each
job's index update would undo the other's rows. ``<output>/_owner.json`` names the input prefix of
the first run that wrote to the output prefix. It is created with a conditional write (only if
absent), so two first runs cannot both claim it, and a run with another input is refused (exit 1)
before it writes anything: :func:`check` only reads, and runs before the lock is taken.
"""
from __future__ import annotations

import datetime as dt
import json

from clipsr import storage
from clipsr.enhance.layout import RunLayout


class OwnerMismatchError(ValueError):
    """The output prefix belongs to another input prefix."""


def check(layout: RunLayout) -> None:
    """Raise OwnerMismatchError when the output prefix belongs to another input prefix; reads only."""
    try:
        data = storage.read_bytes(layout.owner)
    except FileNotFoundError:
        return
    try:
        doc = json.loads(data)
        owner, run_id = str(doc["input"]), doc.get("run_id")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{layout.owner} does not name an input prefix; restore it, or delete it to let this "
                         f"run's --input {layout.input} claim {layout.output}") from None
    if owner != layout.input:
        raise OwnerMismatchError(
            f"--output {layout.output} belongs to --input {owner} (claimed by run {run_id} in {layout.owner}), "
            f"not to --input {layout.input}: two inputs in one output prefix overwrite each other's outputs and "
            f"index rows; use another --output, or delete {layout.owner} if the archive moved from {owner} "
            f"to {layout.input}")


def claim(layout: RunLayout) -> None:
    """Make this run's input prefix the owner of its output prefix, unless there is one already
    (then it must be this input: OwnerMismatchError otherwise)."""
    doc = {"input": layout.input, "run_id": layout.run_id,
           "claimed": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if not storage.write_bytes_if_absent(layout.owner, json.dumps(doc, indent=1).encode()):
        check(layout)
