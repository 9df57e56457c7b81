"""Where a result came from: code revision and timestamps, recorded in every artefact.

The revision is resolved once, on the driver, and handed to Ray workers in ``CLIPSR_CODE_REVISION``
(see ``ray_runtime.worker_env``): workers on a cluster have no git checkout, and neither has a job
sent with ``ray job submit --working-dir``, since Ray uploads the directory without ``.git``. There
the submitter can set the variable on the entrypoint; otherwise the revision names the package
version and a digest of its source files, which a checkout reproduces with ``source_digest()``.
"""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
import subprocess
from pathlib import Path

from clipsr import __version__

#: Set by the driver for its workers, or by whoever submits a job without its .git.
REVISION_ENV = "CLIPSR_CODE_REVISION"

_PACKAGE = Path(__file__).resolve().parent
_SOURCE_SUFFIXES = (".py", ".json", ".yaml")


@functools.lru_cache(maxsize=1)
def code_revision() -> str:
    """``CLIPSR_CODE_REVISION`` if set, else the git commit of the running code (with ``+dirty``
    if modified), else ``clipsr-<version>+src.<12 hex of source_digest()>``."""
    return os.environ.get(REVISION_ENV) or _git_revision() or f"clipsr-{__version__}+src.{source_digest()[:12]}"


def _git_revision() -> str | None:
    root = str(_PACKAGE.parent)
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 over the package's code and configuration files (paths and contents, bundled weights
    and samples left out): the same for the same code wherever it was copied to."""
    h = hashlib.sha256()
    files = {p.relative_to(_PACKAGE).as_posix(): p for p in _PACKAGE.rglob("*")
             if p.suffix in _SOURCE_SUFFIXES and p.is_file()}
    for rel in sorted(files):
        data = files[rel].read_bytes()
        h.update(b"%d:%s%d:" % (len(rel.encode()), rel.encode(), len(data)) + data)
    return h.hexdigest()


def utc_now() -> str:
    """ISO-8601 UTC timestamp with a Z suffix, second precision."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
