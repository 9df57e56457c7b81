"""The code revision recorded in checkpoints, reports and registry entries: the git commit in a
checkout, and an informative stand-in where Ray runs code without its .git."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clipsr import __version__
from clipsr.provenance import REVISION_ENV, code_revision, source_digest

REPO = Path(__file__).resolve().parents[1]
_PRINT_REVISION = "from clipsr.provenance import code_revision; print(code_revision())"


@pytest.fixture
def fresh_revision(monkeypatch):
    """code_revision() resolved again, without a revision passed down from a driver."""
    monkeypatch.delenv(REVISION_ENV, raising=False)
    code_revision.cache_clear()
    yield code_revision
    code_revision.cache_clear()


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_in_a_git_checkout_the_revision_is_the_commit(fresh_revision):
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    revision = fresh_revision()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", revision), f"fell back to {revision!r} in a git checkout"
    assert revision.split("+")[0] == _git("rev-parse", "HEAD")
    assert revision.endswith("+dirty") == bool(_git("status", "--porcelain", "--untracked-files=no"))


def _revision_of_copy(root: Path, env: dict[str, str] | None = None) -> str:
    """code_revision() in a new interpreter running a copy of clipsr that sits in no git checkout."""
    clean = {k: v for k, v in os.environ.items() if k != REVISION_ENV} | {"PYTHONPATH": str(root)} | (env or {})
    done = subprocess.run([sys.executable, "-c", _PRINT_REVISION], cwd=root, env=clean,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_without_git_the_revision_names_the_version_and_the_source(tmp_path):
    """What `ray job submit --working-dir .` runs: the package without .git."""
    shutil.copytree(REPO / "clipsr", tmp_path / "clipsr",
                    ignore=shutil.ignore_patterns("__pycache__", "weights", "samples"))
    unchanged = f"clipsr-{__version__}+src.{source_digest()[:12]}"
    assert _revision_of_copy(tmp_path) == unchanged
    assert _revision_of_copy(tmp_path, {REVISION_ENV: "0123abc"}) == "0123abc"  # passed down by a driver
    with open(tmp_path / "clipsr" / "metrics.py", "a") as f:
        f.write("\n# changed\n")
    changed = _revision_of_copy(tmp_path)
    assert changed.startswith(f"clipsr-{__version__}+src.") and changed != unchanged
