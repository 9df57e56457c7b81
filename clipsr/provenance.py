"""Where a result came from: code revision and timestamps, recorded in every artefact."""
from __future__ import annotations

import datetime as dt
import functools
import subprocess
from pathlib import Path

from clipsr import __version__


@functools.lru_cache(maxsize=1)
def code_revision() -> str:
    """The git commit of the running code (with ``+dirty`` if modified), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if rev.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=5,
            )
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"clipsr-{__version__}"


def utc_now() -> str:
    """ISO-8601 UTC timestamp with a Z suffix, second precision."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
