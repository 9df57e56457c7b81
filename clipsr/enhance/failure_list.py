"""The inputs a run's summary names, so that nobody has to open the manifest to learn which files
failed and why: failed and unsupported inputs with their reasons (the first :data:`LIMIT`, then
how many more the manifest holds), and, briefly, the keys left alone because they are not images
(a ``SOURCES.md`` beside the pictures). Failures carried forward unread from an earlier run are
counted, not named again: they were named by the run that found them.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Failed or unsupported inputs named in a summary.
LIMIT = 20
#: Keys named as "not an input" (the rest are counted).
NOT_INPUTS_LIMIT = 5


@dataclass
class FailureList:
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (key, status, reason), the first LIMIT
    failed_count: int = 0
    carried: int = 0
    not_inputs: list[str] = field(default_factory=list)
    not_inputs_count: int = 0

    def add(self, row: Mapping[str, Any]) -> None:
        """Note one manifest row (any status; only the ones worth naming are kept)."""
        status, error = row.get("status"), row.get("error") or ""
        if status in ("failed", "unsupported"):
            if row.get("carried_forward"):
                self.carried += 1
                return
            self.failed_count += 1
            if len(self.failed) < LIMIT:
                self.failed.append((str(row["input_key"]), status, error))
        elif status == "skipped" and error.endswith("not an input"):
            self.not_inputs_count += 1
            if len(self.not_inputs) < NOT_INPUTS_LIMIT:
                self.not_inputs.append(str(row["input_key"]))

    def lines(self, manifest_uri: str | None = None, predicted: bool = False) -> list[str]:
        """What the summary prints above its last line (nothing when there is nothing to name)."""
        out: list[str] = []
        if self.failed_count:
            head = "would fail" if predicted else "failed or unsupported"
            out.append(f"{head} ({self.failed_count}):")
            for key, status, reason in sorted(self.failed):
                what = f" ({status})" if status != "failed" else ""
                out.append(f"  {key}{what}: {reason}")
            more = self.failed_count - len(self.failed)
            if more:
                where = f" in the manifest {manifest_uri}" if manifest_uri else ""
                out.append(f"  ... and {more} more{where}")
        if self.carried:
            out.append(f"{self.carried} failed input(s) carried forward unread from earlier runs "
                       "(their reasons are in the manifest; --retry-failed reads them again)")
        if self.not_inputs_count:
            names = ", ".join(sorted(self.not_inputs))
            more = self.not_inputs_count - len(self.not_inputs)
            out.append(f"skipped as not inputs ({self.not_inputs_count}): {names}"
                       + (f" and {more} more" if more else ""))
        return out
