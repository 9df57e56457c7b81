"""Per-domain progress of an adaptation run: the events a domain's task sends, and the driver's board.

A domain's task reports, every few seconds, its steps done out of planned, its seconds so far and
its latest held-out estimate (a probe's, or the final one once scored). The driver folds them into
one :class:`clipsr.progress.Progress`: steps over all domains, domains finished per status, the
rate and the time left, with a note per running domain (its steps, rate, held-out estimate and
time left). On a terminal that is one live line; in a log, a line every ``every_s`` seconds plus
one per running domain, and a line per domain as it finishes.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from clipsr.progress import Progress, duration


@dataclass(frozen=True)
class DomainProgress:
    """Where one domain stands (sent from its task to the driver)."""

    domain: str
    steps: int  # training steps done, every candidate's included
    total: int  # steps planned, every candidate's probe included
    seconds: float  # since the domain's task started
    heldout_gain_db: float | None = None  # the latest held-out estimate, None before any
    phase: str = "train"  # "train", "probe SCOPE@LR", or "scoring"

    def rate(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0

    def note(self) -> str:
        """The domain's part of the progress display."""
        parts = [f"{self.domain}: {self.steps}/{self.total} steps"]
        if self.phase != "train":
            parts[0] += f" ({self.phase})"
        rate = self.rate()
        parts.append(f"{rate:.2f} steps/s")
        if self.heldout_gain_db is not None:
            parts.append(f"held-out {self.heldout_gain_db:+.3f} dB")
        if rate > 0 and self.steps < self.total:
            parts.append(f"about {duration((self.total - self.steps) / rate)} left")
        return ", ".join(parts)


class ProgressBoard:
    """The driver's view of every domain; ``update`` with each event, ``finished`` with each row."""

    def __init__(self, planned: dict[str, int], stream: TextIO | None = None, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.planned = dict(planned)
        self.latest: dict[str, DomainProgress] = {}
        self.done: dict[str, str] = {}  # domain -> status
        # steps arrive steadily for minutes: a line every every_s is enough (no line per twentieth)
        self.progress = Progress("adapt", sum(planned.values()), unit="steps", stream=stream, every_s=every_s,
                                 clock=clock, steps=None)

    def update(self, event: DomainProgress) -> None:
        self.latest[event.domain] = event
        self.planned[event.domain] = event.total
        self.progress.total = sum(self.planned.values())
        self._refresh()

    def finished(self, row: dict[str, Any], message: str) -> None:
        """A domain ended (its report row): the steps it ran are all it will run (fewer than planned
        when it failed or met the time cap)."""
        domain = row["domain"]
        self.done[domain] = row["status"]
        self.planned[domain] = self.latest[domain].steps if domain in self.latest else 0
        self.progress.total = sum(self.planned.values())
        self.progress.message(message)
        self._refresh()

    def _refresh(self) -> None:
        steps = sum(e.steps for e in self.latest.values())
        counts = {status: sum(s == status for s in self.done.values()) for status in ("ok", "failed")}
        counts["running"] = sum(d not in self.done for d in self.latest)
        notes = [e.note() for d, e in self.latest.items() if d not in self.done]
        self.progress.update(steps, counts, notes)

    def close(self) -> None:
        self.progress.close()
